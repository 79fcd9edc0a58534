"""Decode speed of GLM-5's sparse attention (DSA) against dense attention as the context grows (issue 14, item 2).

The model is bench_generate.py's GLM-5-shaped random checkpoint (`glm5-1b-bf16`, written on first use): GLM-5's
head dimensions (MLA kv_lora 512 + rope 64, qk_nope 192, v 256; indexer 32 heads x 128, top-2048) at about 1B
parameters -- hidden 2048, 16 heads, q_lora 1024, 8 layers with GLM-5.2's IndexShare (FFFSSSFS: four layers run
the indexer, four reuse its pick), 32 experts top-8 -- with routed experts at q4, at 2 threads, decoding through
the fused native path. "Dense" is the same checkpoint loaded again with index_topk above every context measured,
so nothing is scored and every row is attended (which is what DSA computes while the context fits the top-k).

How the context is made: prefilling 32k tokens on 2 cores would take most of an hour, so the cache is filled
instead. A prefill of 256 random tokens writes real latent rows and indexer keys; they are tiled up to the largest
context, each copy re-rotated to its new position (RoPE composes: the roped dims of a row at position p rotated by
d are that row at p + d), as if the 256 tokens were repeated. The rows therefore have a real model's statistics,
the indexer's scores are not exact ties between copies, and a decode step at position C does the work it would do
after a real prefill of C tokens. Decode steps are then timed at positions C, C+1, ... (2 warm-up steps, then
--steps timed), for the sparse and the dense model in turn, --reps times; the table shows medians.

"attention ms/layer" times the attention alone at context C, averaged over the layers, through the same native
kernels the fused decode runs, called one at a time: on a full layer the indexer's key, its scores against every
cached key and the top-k, then MLA over the picked rows; on a shared layer MLA over a pick; dense: MLA over every
row. It is cheap, so a finer sweep of it shows where the two curves part.

    python benchmarks/bench_dsa_context.py                        # 1k, 8k, 32k; 3 repetitions
    python benchmarks/bench_dsa_context.py --contexts 1024 4096 --steps 4 --reps 1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import localglm
from localglm.layers.native import native
from localglm.layers.rope import apply_rope

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import BENCH_ROOT, ensure_model  # noqa: E402

FILL = 256  # tokens prefilled for real, then tiled
WARMUP = 2


def load(model: Path, topk: int | None) -> Any:
    """The model's forward pass, q4 experts; `topk` replaces index_topk (None: the checkpoint's)."""
    net = localglm.load(str(model), experts_bits=4).net
    if topk is not None:
        net.index_shape = dataclasses.replace(net.index_shape, topk=topk)
    return net


def filled_cache(net: Any, tokens: int, seed: int = 0) -> Any:
    """A cache for `tokens` positions whose first FILL are a real prefill and the rest its re-rotated copies."""
    cache = net.new_cache(tokens)
    ids = torch.randint(0, net.cfg.vocab_size - 100, (1, FILL), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        net.hidden_states(ids, cache, 0)
    lat, rope = net.cfg.kv_lora_rank, net.cfg.qk_rope_head_dim
    for start in range(FILL, tokens, FILL):
        n = min(FILL, tokens - start)
        cos, sin = net.rope(torch.tensor([start]), net.dtype)  # a rotation by `start` positions
        rows = cache.kv[:, :, :n].clone()
        rows[..., lat:] = apply_rope(rows[..., lat:], cos, sin)  # stored de-interleaved: halves paired
        cache.kv[:, :, start : start + n] = rows
        keys = cache.index_keys[:, :, :n].clone()
        keys[..., :rope] = apply_rope(keys[..., :rope], cos, sin)
        cache.index_keys[:, :, start : start + n] = keys
    return cache


def decode_tok_s(net: Any, cache: Any, context: int, steps: int) -> float:
    """Tokens per second of `steps` decode steps at positions context + WARMUP.. (after WARMUP untimed ones)."""
    ids = torch.randint(0, net.cfg.vocab_size - 100, (WARMUP + steps,), generator=torch.Generator().manual_seed(context)).tolist()
    with torch.inference_mode():
        for i, tok in enumerate(ids):
            if i == WARMUP:
                t0 = time.perf_counter()
            net.lm_head(net.hidden_states(torch.tensor([[tok]]), cache, context + i)[0, -1])
    return steps / (time.perf_counter() - t0)


def attention_ms(net: Any, cache: Any, context: int, sparse: bool, reps: int = 5) -> float:
    """Median ms of one layer's attention core at position `context` (see the module docstring), averaged over layers."""
    lib, dtype, cfg, s = native(), net.dtype, net.cfg, net.mla_shape
    g = torch.Generator().manual_seed(context)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    cos, sin = net.rope(torch.tensor([context]), dtype)
    x, q_resid = randn(1, 1, cfg.hidden_size), randn(1, 1, cfg.q_lora_rank)
    q_nope, q_rope = randn(1, s.heads, 1, s.qk_nope_head_dim), randn(1, s.heads, 1, s.qk_rope_head_dim)
    times = []
    for _ in range(reps):
        total, picked = 0.0, None
        for i, lw in enumerate(net.w.layers):
            attn = lw.attn
            w_uk, w_uv = attn.mla.absorbed(s, dtype)
            rows = cache.kv[i, :, : context + 1]
            t0 = time.perf_counter()
            if sparse and attn.indexer is not None:
                view = attn.indexer.native_view(net.index_shape, dtype)
                lib.dsa_index_key(view.desc, x, cos, sin)
                keys = cache.index_keys[cache.index_slot[i], :, : context + 1]
                picked = lib.dsa_topk(view.desc, x, q_resid, keys, cos, sin) if context + 1 > net.index_shape.topk else None
            lib.mla_decode_attention(q_nope, q_rope, rows[..., : s.kv_lora_rank], rows[..., s.kv_lora_rank :], w_uk, w_uv, s.scale,
                                     picked if sparse else None)  # fmt: skip
            total += time.perf_counter() - t0
        times.append(total / len(net.w.layers) * 1e3)
    return statistics.median(times)


def parting_point(net: Any, sweep: list[tuple[int, float, float]]) -> str:
    """Where the sparse attention curve leaves the dense one, in words."""
    cfg, topk = net.cfg, net.index_shape.topk
    per_row = cfg.num_attention_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) / (cfg.index_n_heads * cfg.index_head_dim)
    cheaper = [c for c, sp, de in sweep if c > topk and sp < de]
    first = f"sparse attention is cheaper from {cheaper[0]} tokens on" if cheaper else "sparse attention is not cheaper in this sweep"
    return (
        f"The curves are one up to index_topk = {topk}: nothing is scored and every row is attended. Past it, a full "
        f"layer scores every cached key and attends to {topk} rows, a shared layer only attends, while dense attention "
        f"reads every row at {per_row:.1f}x the indexer's multiply-adds per row: {first}, and the gap widens with the context."
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=BENCH_ROOT / "glm5-1b-bf16", help="a glm_moe_dsa checkpoint (default: bench_generate's, made on first use)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--sweep", type=int, nargs="+", default=[1024, 2048, 2304, 2560, 3072, 4096, 8192, 16384, 32768],
                    help="contexts of the attention-only sweep")  # fmt: skip
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per context")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if native() is None:
        raise SystemExit("the native kernels are not built (no C compiler?): this benchmark measures them")

    model = ensure_model(args.model)
    longest = max(args.contexts + args.sweep) + WARMUP + args.steps
    sparse, dense = load(model, None), load(model, longest + 1)
    topk = sparse.index_shape.topk
    print(f"load average {os.getloadavg()[0]:.2f}; filling {longest} positions ...", file=sys.stderr)
    cache = filled_cache(sparse, longest)

    runs: dict[tuple[str, int], list[float]] = {}
    for rep in range(args.reps):
        for context in args.contexts:
            for name, net in (("sparse", sparse), ("dense", dense)):
                runs.setdefault((name, context), []).append(decode_tok_s(net, cache, context, args.steps))
        print(f"rep {rep + 1}/{args.reps} done (load average {os.getloadavg()[0]:.2f})", file=sys.stderr)
    with torch.inference_mode():
        sweep = [(c, attention_ms(sparse, cache, c, True), attention_ms(dense, cache, c, False)) for c in sorted(set(args.contexts + args.sweep))]
    att = {c: (sp, de) for c, sp, de in sweep}

    cfg = sparse.cfg
    print(f"\n{model.name}: {cfg.num_hidden_layers} layers ({''.join(t[0].upper() for t in cfg.indexer_types)}), index_topk {topk}, "
          f"q4 experts, {args.threads} threads, medians of {args.reps} x {args.steps} decode steps\n")  # fmt: skip
    print("| context | sparse tok/s | dense tok/s | sparse / dense | attention ms/layer, sparse | attention ms/layer, dense |")
    print("|---|---|---|---|---|---|")
    for c in args.contexts:
        sp, de = statistics.median(runs[("sparse", c)]), statistics.median(runs[("dense", c)])
        print(f"| {c} | {sp:.2f} | {de:.2f} | {sp / de:.2f} | {att[c][0]:.2f} | {att[c][1]:.2f} |")
    print("\nattention only (ms per layer, median of 5):\n")
    print("| context | sparse | dense | dense / sparse |")
    print("|---|---|---|---|")
    for c, sp, de in sweep:
        print(f"| {c} | {sp:.2f} | {de:.2f} | {de / sp:.2f} |")
    print("\n" + parting_point(sparse, sweep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
