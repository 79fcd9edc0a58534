"""What verifying k drafted tokens costs: one forward over T = 1..5 tokens (every layer, then the lm_head
for every row, as a speculative verification runs) at a context of C tokens, against one token's forward,
localglm beside llama.cpp on the same model in the same format.

    python benchmarks/bench_verify_width.py --model default --levels bf16,q4 --threads 1
    python benchmarks/bench_verify_width.py --model ~/.cache/localglm-bench/glm09b-bf16 --levels bf16,q8,q4,q2

Speculative decoding pays when a (k + 1)-token step costs little more than a one-token one: a step of
depth k yields 1 + a + ... + a^k tokens for that price plus k drafts. Where the weights stream from RAM
(a real GLM) the extra tokens ride on the same bytes; where they sit in the caches, or the kernels are
compute-bound per token (quantized rows: every token's codes times activations), each extra token costs
nearly a whole one, and no acceptance makes drafting pay. This prints both engines' ratios per format.

Levels: bf16 (the checkpoint as stored: ours computes the packaged model's FP8 in bf16; llama.cpp its bf16
GGUF), q8 / q4 / q2 (`localglm quantize --experts N`, beside llama.cpp's Q8_0 / Q4_K_M / Q2_K from its own
quantizer; bench_quant.py makes and caches both); Q8_0 / Q4_K_M / Q2_K: llama.cpp's quantized file itself, run
by both engines (ours reads its blocks as stored: the GGUF a user downloads). Each engine runs in its own subprocess; inside it the
widths are timed in a new random order each round, each figure the median of the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_generate import BENCH_ROOT, PACKAGED, ensure_gguf, ensure_model, prompt_ids  # noqa: E402
from bench_quant import LLAMA, PEER, llama_cpp_installed, make_llama, make_ours  # noqa: E402

WIDTHS = (1, 2, 3, 4, 5)


def time_localglm(target: Path, ctx_ids: list[int], widths: tuple[int, ...], rounds: int) -> dict[int, float]:
    """Seconds per forward of T tokens after the context (rolled back after each), median of the rounds."""
    import torch

    import localglm

    model = localglm.load(target, ctx=len(ctx_ids) + max(widths) + 64, mtp=False)
    net = model.net
    cache = net.new_cache(len(ctx_ids) + max(widths) + 64)
    rng = random.Random(7)
    with torch.inference_mode():
        net.residual(torch.tensor([ctx_ids]), cache, 0)
        cache.tokens.extend(ctx_ids)
        at = cache.length
        times: dict[int, list[float]] = {t: [] for t in widths}
        for _ in range(rounds):
            order = list(widths)
            rng.shuffle(order)
            for t in order:
                ids = torch.tensor([[rng.randrange(0, model.config.vocab_size - 64) for _ in range(t)]])
                t0 = time.perf_counter()
                net.lm_head(net.hidden_states(ids, cache, at)[0])
                times[t].append(time.perf_counter() - t0)
                cache.truncate(at)
    return {t: statistics.median(v) for t, v in times.items()}


def time_llama_cpp(target: Path, ctx_ids: list[int], widths: tuple[int, ...], rounds: int, threads: int) -> dict[int, float]:
    """The same for llama.cpp: eval of T tokens with every row's logits, the KV cache trimmed back after each."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(target), n_ctx=len(ctx_ids) + max(widths) + 64, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          logits_all=True, verbose=False)  # fmt: skip
    llm.eval(ctx_ids)
    at = llm.n_tokens
    rng = random.Random(7)
    vocab = llm.n_vocab()
    times: dict[int, list[float]] = {t: [] for t in widths}
    for _ in range(rounds):
        order = list(widths)
        rng.shuffle(order)
        for t in order:
            ids = [rng.randrange(0, vocab - 64) for _ in range(t)]
            llm.n_tokens = at  # eval trims the KV cache past n_tokens first
            t0 = time.perf_counter()
            llm.eval(ids)
            times[t].append(time.perf_counter() - t0)
    llm.n_tokens = at
    return {t: statistics.median(v) for t, v in times.items()}


def worker(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    ctx_ids = prompt_ids(args.ctx, args.vocab)
    widths = tuple(int(w) for w in args.widths.split(","))
    target = Path(args.target)
    if args.engine == "localglm":
        res = time_localglm(target, ctx_ids, widths, args.rounds)
    else:
        res = time_llama_cpp(target, ctx_ids, widths, args.rounds, args.threads)
    print(json.dumps({str(k): v for k, v in res.items()}))
    return 0


def run_worker(engine: str, target: Path, args: argparse.Namespace, vocab: int) -> dict[int, float] | None:
    cmd = [sys.executable, __file__, "--worker", engine, "--target", str(target), "--ctx", str(args.ctx), "--vocab", str(vocab),
           "--widths", args.widths, "--rounds", str(args.rounds), "--threads", str(args.threads)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"{engine} {target.name}: failed\n{r.stderr[-1500:]}", file=sys.stderr)
        return None
    return {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=PACKAGED, help="'default' (the packaged model) or a model directory (default: %(default)s)")
    ap.add_argument("--levels", default="bf16,q4", help="comma-separated: bf16, q8, q4, q2, or Q8_0, Q4_K_M, Q2_K: llama.cpp's file run by both (default: %(default)s)")
    ap.add_argument("--ctx", type=int, default=128, help="context tokens before the timed forwards (default: %(default)s)")
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="tokens per forward (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=40, help="timed forwards per width and engine (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=BENCH_ROOT / "verify-width", help="where the quantized models are cached")
    ap.add_argument("--worker", choices=("localglm", "llama.cpp"), help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.engine = args.worker
        return worker(args)
    model = ensure_model(Path(args.model) if args.model != PACKAGED else PACKAGED)  # type: ignore[arg-type]
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    widths = [int(w) for w in args.widths.split(",")]
    have_llama = llama_cpp_installed()
    print(f"model: {model}; context {args.ctx} tokens; {args.threads} thread(s); median of {args.rounds} forwards per width; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{'level':<8} {'engine':<10} {'1 token ms':>10} " + " ".join(f"{f'{w} tokens':>9}" for w in widths[1:]) + "   (x one token's time)")
    for level in args.levels.split(","):
        if level in LLAMA:  # llama.cpp's own file, run by both engines (ours reads its blocks as stored)
            peer_name = level
            ours = theirs = make_llama(model, args.work, level) if have_llama else None
        else:
            ours = model if level == "bf16" else make_ours(model, args.work, level)
            peer_name = PEER.get(level, level)
            theirs = (ensure_gguf(model, "bf16") if level == "bf16" else make_llama(model, args.work, peer_name)) if have_llama else None
        for engine, target, label in (("localglm", ours, level), ("llama.cpp", theirs, peer_name)):
            if target is None:
                print(f"{label:<8} {engine:<10} {'skipped' if engine == 'llama.cpp' and not have_llama else 'failed'}")
                continue
            res = run_worker(engine, target, args, vocab)
            if res is None:
                continue
            one = res[widths[0]]
            print(f"{label:<8} {engine:<10} {one * 1e3:>10.3f} " + " ".join(f"{res[w] / one:>8.2f}x" for w in widths[1:]))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
