"""Speculative decoding with the MTP head: decode tok/s with and without speculation, acceptance length
and the depths chosen, on a random GLM-shaped model.

    python benchmarks/bench_mtp.py                  # glm4_moe, 8 layers, hidden 512, 32 experts top-4, fp32
    python benchmarks/bench_mtp.py --steps 300      # first distil the MTP head on the model's own output
    python benchmarks/bench_mtp.py --air-widths --prompts 4 --new 48   # GLM-4.5-Air's widths, 4 layers + MTP, q4

A random MTP head drafts what no model would say (acceptance ~0: the floor, where the depth policy
should settle on depth 0). Two ways to non-trivial acceptance, both labelled in the table:
- "oracle a=0.8": the block runs as in real use (its cost counted), but its proposals are replaced by
  the main model's own greedy continuation with every fifth token wrong: the engine's verification and
  rollback at a known acceptance, i.e. what a head that good buys on this machine (greedy only).
- `--steps N`: Adam steps distilling the block (eh_proj, attention, shared expert) on the main model's
  greedy continuations of random prompts, so that from (h_i, t_{i+1}) it predicts the model's t_{i+2}, as
  GLM trains it on data; slow on 2 busy cores, and a random model's continuations are hard to predict
  from little data, so held-out acceptance stays low.
`--llama-cpp`: the peer, llama.cpp's own kernels drafting with the same MTP block (llama_mtp_peer.py, in
its own subprocess, on the model's GGUF and the same prompt ids): its plain greedy decode and greedy MTP
speculation at draft 1/2/3, checked token for token against its own plain output.
Figures are decode tok/s on this machine: compare them within one run only, beside the load average.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import localglm  # noqa: E402
from localglm.layers import attention as attention_mod  # noqa: E402
from localglm.layers import experts as experts_mod  # noqa: E402
from localglm.layers import norm as norm_mod  # noqa: E402
from localglm.layers import rope as rope_mod  # noqa: E402
from localglm.layers import router as router_mod  # noqa: E402
from localglm.models.glm4_moe.tiny import TinySpec  # noqa: E402
from localglm.sampling import SamplingParams  # noqa: E402
from localglm.speculative import DepthPolicy  # noqa: E402
from localglm.speculative_prices import PriceMemory  # noqa: E402
from localglm.stats import GenerationStats  # noqa: E402
from localglm.tiny import make_tiny  # noqa: E402


def air_width_model() -> Path:
    """GLM-4.5-Air's per-layer widths (bench_gguf_kquant's BENCH_SPEC: 4 layers, 32 experts top-8) with an MTP
    layer, random weights, quantized by `localglm quantize --experts 4`; both cached in the bench cache. The
    default model's tokens are compute-bound; these stream their weights from RAM, as a real GLM's do (but the MTP
    layer is one of five layers here, one of 47 in GLM-4.5-Air: a draft costs more than it would there)."""
    import bench_quant as bq
    from bench_generate import BENCH_ROOT
    from bench_gguf_kquant import BENCH_SPEC

    work = BENCH_ROOT / "air-widths-mtp"
    bf16 = work / "air-mtp-bf16"
    if not (bf16 / "config.json").is_file():
        print(f"writing {bf16} (random GLM-4.5-Air-width weights with an MTP layer) ...", file=sys.stderr, flush=True)
        make_tiny(bf16, TinySpec(**{**BENCH_SPEC, "num_nextn_predict_layers": 1}), overwrite=True)
    out = bq.make_ours(bf16, work, "q4")
    if out is None:
        raise SystemExit(f"{bf16}: localglm quantize failed")
    return out


SPEC = dict(
    vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
    head_dim=64, moe_intermediate_size=256, n_routed_experts=32, num_experts_per_tok=4, first_k_dense_replace=1, dtype="float32",
)  # fmt: skip


CHAT_PROMPTS = [  # --model with a tokenizer: requests like the default model's held-out ones
    "Write a function that returns the sum of a list of numbers.",
    "Write a function that checks whether a string is a palindrome.",
    "How do I read a JSON file in Python?",
    "Sort a list of dictionaries by a key.",
    "Write a function that counts the words in a text file.",
    "Return the n-th Fibonacci number.",
    "Parse a date string in ISO format.",
    "Remove duplicate items from a list, keeping the order.",
]


def teacher_data(model: localglm.Model, n: int, prompt_len: int, new: int, seed: int) -> torch.Tensor:
    """Prompts of random ids, each continued greedily by the main model: [n, prompt_len + new]."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    model.speculation.set_draft(0)
    for _ in range(n):
        prompt = torch.randint(0, model.config.vocab_size - 32, (prompt_len,), generator=g).tolist()
        out = list(model.stream_tokens(prompt, max_new_tokens=new, sampling=SamplingParams(temperature=0), reuse_prefix=False))
        rows.append(prompt + out)
    return torch.tensor(rows)


def distil(model: localglm.Model, data: torch.Tensor, steps: int, lr: float, skip: int) -> list[float]:
    """Train the MTP block to predict t_{i+2} from (h_i, t_{i+1}) on the continuation part of each row."""
    head = model.speculation.head
    layer = head.block.w.layers[0]
    params = [head.w.eh_proj, layer.attn.qkv_weight, layer.attn.o_weight, layer.shared.gate_up, layer.shared.down]
    if any(not isinstance(p, torch.Tensor) for p in params):
        raise SystemExit("bench_mtp: distilling needs float weights (load without quantizing)")
    with torch.no_grad():
        h = model.net.residual(data[:, :-2])  # the main model's streams, the block's input
    for p in params:
        p.requires_grad_(True)
    # The native CPU kernels (norms, RoPE, router) have no backward: torch's ops while training.
    patched = [(m, m.native) for m in (norm_mod, rope_mod, router_mod, attention_mod, experts_mod) if hasattr(m, "native")]
    for m, _ in patched:
        m.native = lambda: None
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        logits = head.logits(head.forward(h, data[:, 1:-1], None, 0))
        target = data[:, 2:]
        loss = torch.nn.functional.cross_entropy(logits[:, skip:].reshape(-1, logits.shape[-1]), target[:, skip:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for p in params:
        p.requires_grad_(False)
    for m, fn in patched:
        m.native = fn
    return losses


def run(model: localglm.Model, prompts: list[list[int]], new: int, draft: int, adaptive: bool, sampling: SamplingParams,
        kept: DepthPolicy | None = None, memory: PriceMemory | None = None) -> tuple[float, GenerationStats, float]:
    """Decode tok/s over all prompts (decode time summed), their stats summed, with drafting `draft`,
    and generated tokens per second of this process's CPU time over the whole requests (prompt included:
    on a shared CPU the time other processes take from this one does not count). `kept`: a depth policy
    this setting keeps from round to round, as a server keeps its model's (else one from the prior).
    `memory`: the run starts from the prices this setting's earlier rounds left there and leaves its
    own, as a new process does with the prices file (speculative_prices.py); else none are kept."""
    spec = model.speculation
    shared = spec.policy
    if kept is not None:
        spec.policy = kept
    spec.set_draft(draft, adaptive=adaptive)
    if kept is None:
        spec.policy.reset()  # each run starts from the prior, not from what another setting measured
    spec.memory = memory
    if memory is not None:
        memory.saved_at = -math.inf  # a new process: its first generation writes
    try:
        return _run(model, prompts, new, sampling)
    finally:
        spec.policy = shared
        spec.memory = None


def _run(model: localglm.Model, prompts: list[list[int]], new: int, sampling: SamplingParams) -> tuple[float, GenerationStats, float]:
    tokens, seconds, generated, cpu0 = 0, 0.0, 0, time.process_time()
    total = GenerationStats()
    for p in prompts:
        stats = GenerationStats()
        list(model.stream_tokens(p, max_new_tokens=new, sampling=sampling, reuse_prefix=False, stats=stats))  # unseeded: a seed pins the untimed depth choice
        tokens += stats.decode_tokens - 1
        seconds += stats.decode_s
        generated += stats.decode_tokens
        total.decode_tokens += stats.decode_tokens
        total.draft_tokens += stats.draft_tokens
        total.accepted_tokens += stats.accepted_tokens
        for d, n in stats.draft_depths.items():
            total.draft_depths[d] = total.draft_depths.get(d, 0) + n
    steps = sum(total.draft_depths.values())
    total.acceptance_length = (total.accepted_tokens + steps) / steps if steps else 0.0
    return tokens / seconds if seconds else 0.0, total, generated / max(time.process_time() - cpu0, 1e-9)


def oracle(model: localglm.Model, prompts: list[list[int]], references: list[list[int]], wrong_every: int = 5) -> None:
    """Replace the block's proposals by the greedy reference of the prompt being decoded, every
    `wrong_every`-th token wrong (the block still runs: its cost and its cache are as in real use)."""
    spec = model.speculation
    real = type(spec)._draft
    by_prompt = {tuple(p): r for p, r in zip(prompts, references)}
    current: dict[str, list[int]] = {}

    def draft(self, *args):  # type: ignore[no-untyped-def]
        drafts, qs, guide = real(self, *args)
        ref, at = current["ref"], len(args[-1])  # the last argument: the tokens generated so far
        good = ref[at : at + len(drafts)]
        return [t if (at + i + 1) % wrong_every else (t + 1) % model.config.vocab_size for i, t in enumerate(good)], qs, guide

    original = model.stream_tokens

    def stream_tokens(ids, **kw):  # type: ignore[no-untyped-def]
        current["ref"] = by_prompt[tuple(ids)]
        return original(ids, **kw)

    spec._draft = draft.__get__(spec)  # type: ignore[method-assign]
    model.stream_tokens = stream_tokens  # type: ignore[method-assign]


def draft_cost_rows(model: localglm.Model, prompts: list[list[int]], new: int, plain_speed: float, repeat: int) -> None:
    """What the drafts alone cost: the native draft call (the block's catch-up over the accepted tokens, the chained
    drafts and their head) timed in the loop, a step at each fixed depth, greedy; and the most speculation could give
    if a verification of k + 1 tokens cost one plain token's time and nothing else cost anything: tokens a step x
    plain / (plain + drafts)."""
    from localglm.layers.native import native

    lib = native()
    if lib is None:
        return
    real, spent = lib.mtp_draft, [0.0]

    def timed(*a, **kw):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            spent[0] += time.perf_counter() - t

    plain_us = 1e6 / plain_speed
    print(f"drafts' own cost (the native draft call, timed in the loop; the least of {repeat} rounds), against {plain_us:.0f} us a plain token:")
    lib.mtp_draft = timed  # type: ignore[method-assign]
    try:
        for depth in (1, 2, 3):
            best: tuple[float, float] | None = None
            for _ in range(repeat):
                spent[0] = 0.0
                _, st, _ = run(model, prompts, new, depth, False, SamplingParams(temperature=0))
                steps = sum(st.draft_depths.values())
                if steps:
                    per = spent[0] / steps * 1e6
                    best = (per, st.acceptance_length) if best is None or per < best[0] else best
            if best is not None:
                per, tokens = best
                print(f"  depth {depth}: {per:.0f} us a step, {tokens:.2f} tokens a step: at most {tokens * plain_us / (plain_us + per):.2f}x "
                      "even with a verification at one token's cost")  # fmt: skip
    finally:
        del lib.mtp_draft


def llama_cpp_rows(path: Path, prompts: list[list[int]], new: int, threads: int, repeat: int, ours: list[list[int]]) -> None:
    """The peer's rows (llama_mtp_peer.py in a subprocess, on the model's bf16 GGUF with its MTP block): as
    llama.cpp hands the block its hidden states (after the final norms), then with the norms' weights
    undone (the streams GLM's MTP, and localglm, take)."""
    from bench_generate import available, ensure_gguf

    if not available("llama.cpp"):
        print("llama.cpp: skipped (llama_cpp is not installed)")
        return
    gguf = ensure_gguf(path, "bf16")
    if gguf is None:
        print("llama.cpp: skipped (its GGUF could not be made)")
        return
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    peer = Path(__file__).with_name("llama_mtp_peer.py")
    results = []
    try:
        for raw in (True, False):
            cmd = [sys.executable, str(peer), "--gguf", str(gguf), "--ids", f.name, "--new", str(new), "--threads", str(threads),
                   "--drafts", "1,2,3", "--rounds", str(repeat)]  # fmt: skip
            r = subprocess.run(cmd + (["--raw-h"] if raw else []), capture_output=True, text=True)
            if r.returncode != 0:
                print(f"llama.cpp failed:\n{r.stderr[-1500:]}")
                return
            results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    finally:
        os.unlink(f.name)
    for res in results:
        plain = res["plain"]
        drafter = "llama.cpp raw" if res["raw_h"] else "llama.cpp"
        rows = [(plain, "plain")] + [(row, str(row["draft"])) for row in res["spec"]]
        for row, label in rows:
            speed, cpu = row["tok_s"], row["tok_cpu_s"]
            acc = f"{row['accepted']}/{row['drafted']}" if row["draft"] else "-"
            depths = ",".join(f"{d}x{n}" for d, n in sorted((int(d), n) for d, n in row["depths"].items())) or "-"
            print(f"{'greedy':<10} {drafter:<13} {label:<8} {speed:>12.1f} {speed / plain['tok_s']:>8.2f}x {cpu:>10.1f} "
                  f"{cpu / plain['tok_cpu_s']:>8.2f}x {acc:>17} {row['per_step']:>9.2f}  {depths}")  # fmt: skip
    same = [f"{row['same_as_plain']}/{res['prompts']}" for res in results for row in res["spec"]]
    theirs = results[0]["tokens"]
    agree = sum(a == b for a, b in zip(theirs, ours))
    prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(theirs, ours))
    if repeat > 1:
        print(f"llama.cpp rows: each setting's fastest of {repeat} rounds, the settings taken in turn")
    print(f"llama.cpp {results[0]['llama_cpp']}: speculative output == its own plain greedy output on {', '.join(same)} prompts "
          f"(raw draft 1/2/3, then draft 1/2/3); its plain greedy output == ours on {agree}/{len(ours)} prompts "
          f"(the same up to the first difference: {prefix} of {sum(map(len, ours))} tokens; bf16 rounding tips near-ties)")  # fmt: skip
    for row in [results[-1]["plain"], *results[-1]["spec"]]:
        calls = ", ".join(f"{k} {ms:.2f}" for k, ms in row["ms_per_call"].items())
        print(f"llama.cpp {'plain' if not row['draft'] else 'draft ' + str(row['draft'])}: ms per decode by context and batch rows: {calls}")
    print("llama.cpp raw: its MTP block gets the hidden states after output_norm / shared_head.norm (as this llama.cpp build "
          "hands them); llama.cpp: those norms' weights undone, the streams GLM's MTP takes (RMSNorm ignores their scale)")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a checkpoint with an MTP block (default: make the random one)")
    ap.add_argument("--air-widths", action="store_true", help="GLM-4.5-Air's widths, 4 layers + MTP, q4 (made and cached; MTP head random)")
    ap.add_argument("--steps", type=int, default=0, help="distillation steps for the MTP head (0: leave it random)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--train-rows", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=4, help="held-out prompts per setting")
    ap.add_argument("--new", type=int, default=64, help="tokens generated per prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-multi-token", action="store_true",
                    help="verification, prompts and the MTP block through the torch ops, as before the native multi-token forward (the peer)")
    ap.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                    help="the drafter scores the N most frequent tokens (load's draft_vocab; default: the checkpoint's default, 0: the whole head)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="N rounds of every setting, each setting's fastest kept (on a shared CPU, other processes only ever slow a run)")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="also llama.cpp's kernels drafting with the same MTP block (llama_mtp_peer.py): plain and draft 1/2/3, greedy")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = air_width_model() if args.air_widths else args.model
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="bench-mtp-")) / "m"
        make_tiny(path, TinySpec(**SPEC))
    model = localglm.load(path, ctx=1024, **({} if args.draft_vocab is None else {"draft_vocab": args.draft_vocab}))
    if model.speculation is None:
        raise SystemExit(f"{path}: no MTP block")
    if args.torch_multi_token:  # the peer: as before the native multi-token forward
        block = model.speculation.head.block
        model.net.fused_prefill = block.fused_prefill = block.fused_decode = False
    t0 = time.perf_counter()
    losses = distil(model, teacher_data(model, args.train_rows, 16, 96, seed=1), args.steps, args.lr, skip=14) if args.steps else []
    trained = time.perf_counter() - t0
    g = torch.Generator().manual_seed(99)
    if model.tokenizer is not None and args.model is not None:  # a trained model: chat requests, as users send them
        prompts = [model.encode_chat([{"role": "user", "content": text}]).ids for text in CHAT_PROMPTS[: args.prompts]]
    else:
        prompts = [torch.randint(0, model.config.vocab_size - 32, (16,), generator=g).tolist() for _ in range(args.prompts)]
    print(f"model: {path} ({model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
          f"{model.config.n_routed_experts} experts top-{model.config.num_experts_per_tok}, {str(model.dtype).removeprefix('torch.')}), {args.threads} threads, "
          f"multi-token forwards through {'the torch ops' if args.torch_multi_token else 'the native layers'}")  # fmt: skip
    if args.model is not None:
        print(f"MTP head as in the checkpoint; {len(prompts)} chat requests" if model.tokenizer is not None else "MTP head as in the checkpoint")
    elif losses:
        print(f"MTP head distilled on {args.train_rows} greedy continuations: {args.steps} steps, loss {losses[0]:.2f} -> {losses[-1]:.2f} ({trained:.0f} s)")
    else:
        print("MTP head as made (random): acceptance is the floor")
    vocab = getattr(model.speculation.head, "vocab", None)
    print(f"drafter's vocabulary: {'the whole head' if vocab is None else f'{len(vocab)} most frequent tokens'}"
          + (f"; each setting the fastest of {args.repeat} rounds" if args.repeat > 1 else ""))
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'sampling':<10} {'drafter':<13} {'draft':<8} {'decode tok/s':>12} {'vs plain':>9} {'tok/CPU-s':>10} {'vs plain':>9} {'accepted/drafted':>17} {'tok/step':>9}  depths")
    greedy, warm = SamplingParams(temperature=0), SamplingParams(temperature=0.7)
    model.speculation.set_draft(0)
    references = [list(model.stream_tokens(p, max_new_tokens=args.new, sampling=greedy, reuse_prefix=False)) for p in prompts]
    settings = [("greedy", greedy, "head", d, a) for d, a in ((1, False), (2, False), (3, False), (3, True))]
    settings += [("greedy", greedy, "oracle a=0.8", d, a) for d, a in ((1, False), (2, False), (3, False), (4, False), (4, True))]
    settings += [("t=0.7", warm, "head", d, a) for d, a in ((2, False), (3, True))]
    settings += [(name, sp, "head, kept", 3, True) for name, sp in (("greedy", greedy), ("t=0.7", warm))]
    settings += [(name, sp, "head, remembered", 3, True) for name, sp in (("greedy", greedy), ("t=0.7", warm))]
    prices = Path(tempfile.mkdtemp(prefix="bench-mtp-prices-")) / "mtp_prices.json"
    memories = {name: PriceMemory(prices, f"bench {name}") for name in ("greedy", "t=0.7")}  # empty at round 1: as fresh
    kept = {name: copy.deepcopy(model.speculation.policy) for name in ("greedy", "t=0.7")}  # from the prior, then their own
    for policy in kept.values():
        policy.reset()
    base: dict[str, float] = {}
    settings = [("greedy", greedy, "-", 0, False), ("t=0.7", warm, "-", 0, False), *settings]
    runs: dict[int, list[tuple[float, GenerationStats, float]]] = {i: [] for i in range(len(settings))}
    order = random.Random(0)
    for _ in range(max(1, args.repeat)):  # rounds, every setting once a round: a slow spell of the machine hits them all alike
        turn = list(enumerate(settings))
        order.shuffle(turn)  # in a new order each round: a setting's place (after which others, late in a drifting round) is no bias
        for i, (_name, sampling, drafter, draft, adaptive) in turn:
            if drafter.startswith("oracle"):
                oracle(model, prompts, references)
            runs[i].append(run(model, prompts, args.new, draft, adaptive, sampling, kept[_name] if drafter.endswith("kept") else None,
                               memories[_name] if drafter.endswith("remembered") else None))
            model.speculation.__dict__.pop("_draft", None)
            model.__dict__.pop("stream_tokens", None)
    for i, (name, sampling, drafter, draft, adaptive) in enumerate(settings):
        speed, st, cpu = max(r[0] for r in runs[i]), runs[i][-1][1], max(r[2] for r in runs[i])
        base.setdefault(name, speed)
        base.setdefault(name + " cpu", cpu)
        depths = ",".join(f"{d}x{n}" for d, n in sorted(st.draft_depths.items())) or "-"
        acc = f"{st.accepted_tokens}/{st.draft_tokens}" if draft else "-"
        per = f"{st.acceptance_length:.2f}" if draft and st.draft_depths else "1.00"  # no step recorded: the plain loop decoded every token
        label = "plain" if not draft else f"{'<=' if adaptive else ''}{draft}"
        print(f"{name:<10} {drafter:<13} {label:<8} {speed:>12.1f} {speed / base[name]:>8.2f}x {cpu:>10.1f} {cpu / base[name + ' cpu']:>8.2f}x {acc:>17} {per:>9}  {depths}")
    if model.tokenizer is not None and args.model is not None:  # a trained drafter: what its drafts alone cost
        draft_cost_rows(model, prompts, args.new, base["greedy"], max(1, args.repeat))
    if args.llama_cpp:
        llama_cpp_rows(path, prompts, args.new, args.threads, max(1, args.repeat), references)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
