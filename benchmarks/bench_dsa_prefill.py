"""A prompt chunk at long context on GLM-5's sparse attention (DSA), beside llama.cpp on the same weights.

Past index_topk (2,048) cached tokens, DSA lets each query read only its top-k rows. A prompt chunk (an agent's
long tool output, the rest of a long prompt) runs MLA's expanded or absorbed form over every cached row with all
but the top-k masked out (layers/mla.py), so its cost grows with the context; this measures by how much.

The model is bench_generate.py's GLM-5-shaped random checkpoint (`glm5-1b-bf16`: GLM-5's head dimensions, 16
heads, top-2048 indexer, GLM-5.2's IndexShare) with max_position_embeddings raised (a sibling directory of
links and an edited config). Per context C: C tokens prefilled, then a chunk of --chunk new tokens timed,
rolled back, --rounds times (ours, in one process); llama.cpp
(llama-cpp-python, bf16 GGUF of the same weights) evaluates the same C tokens, then the same chunk, in its own
process.

    python benchmarks/bench_dsa_prefill.py                       # contexts 4096, 8192; 512-token chunks
    python benchmarks/bench_dsa_prefill.py --contexts 8192 --rounds 2 --no-llama-cpp
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_generate import BENCH_ROOT, ensure_gguf, ensure_model  # noqa: E402

LONG = 32768


def long_context_model() -> Path:
    """glm5-1b-bf16 with max_position_embeddings LONG: links to its files and an edited config."""
    base = ensure_model(BENCH_ROOT / "glm5-1b-bf16")
    out = BENCH_ROOT / "glm5-1b-long-bf16"
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        target = out / f.name
        if f.name == "config.json":
            cfg = json.loads(f.read_text())
            cfg["max_position_embeddings"] = LONG
            target.write_text(json.dumps(cfg, indent=1))
        elif not target.exists():
            target.symlink_to(f)
    return out


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 4000) for _ in range(n)]


def ours(model_dir: Path, contexts: list[int], chunk: int, rounds: int, threads: int) -> dict:
    import torch

    import localglm

    torch.set_num_threads(threads)
    model = localglm.load(model_dir, ctx=max(contexts) + chunk + 16, mtp=False)
    net, cache = model.net, model.net.new_cache(max(contexts) + chunk + 16)
    out: dict = {}
    with torch.inference_mode():
        done = 0
        for c in sorted(contexts):
            prompt = ids(c, 1)
            for s in range(done, c, 512):  # the prompt in the engine's 512-token chunks
                part = prompt[s : min(c, s + 512)]
                net.residual(torch.tensor([part]), cache, s)
                cache.tokens.extend(part)
            done = c
            new = torch.tensor([ids(chunk, 2)])
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                net.residual(new, cache, c)
                times.append(time.perf_counter() - t0)
                cache.truncate(c)
            out[str(c)] = {"localglm": times}
    return out


def llama(gguf: Path, contexts: list[int], chunk: int, rounds: int, threads: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), n_ctx=max(contexts) + chunk + 16, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    out: dict = {}
    for c in sorted(contexts):
        llm.reset()
        llm.eval(ids(c, 1))
        times = []
        for _ in range(rounds):
            llm.n_tokens = c  # eval trims the KV cache past n_tokens first
            t0 = time.perf_counter()
            llm.eval(ids(chunk, 2))
            times.append(time.perf_counter() - t0)
        out[str(c)] = {"llama.cpp": times}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192], help="cached tokens before the chunk (default 4096 8192)")
    ap.add_argument("--chunk", type=int, default=512, help="new tokens timed (default 512: the engine's prefill chunk)")
    ap.add_argument("--rounds", type=int, default=3, help="timed chunks per context and form (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp")
    ap.add_argument("--worker", choices=("ours", "llama.cpp"), help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run = ours if args.worker == "ours" else llama
        print(json.dumps(run(Path(args.target), args.contexts, args.chunk, args.rounds, args.threads)))
        return 0
    model_dir = long_context_model()
    targets = [("ours", model_dir)]
    if not args.no_llama_cpp:
        gguf = ensure_gguf(model_dir)
        if gguf is not None:
            targets.append(("llama.cpp", gguf))
    results: dict[str, dict] = {}
    for worker, target in targets:
        cmd = [sys.executable, __file__, "--worker", worker, "--target", str(target), "--chunk", str(args.chunk),
               "--rounds", str(args.rounds), "--threads", str(args.threads), "--contexts", *map(str, args.contexts)]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{worker}: failed\n{r.stderr[-1500:]}", file=sys.stderr)
            continue
        for c, rows in json.loads(r.stdout.strip().splitlines()[-1]).items():
            results.setdefault(c, {}).update(rows)
    print(f"model: {model_dir.name}; a {args.chunk}-token chunk after C cached tokens; {args.threads} threads; median of {args.rounds}")
    print("| context | localglm | llama.cpp | ours vs llama.cpp's time |")
    print("|---:|---:|---:|---:|")
    for c in sorted(results, key=int):
        med = {k: statistics.median(v) for k, v in results[c].items()}
        peer = med.get("llama.cpp")
        peer_ms = "-" if peer is None else f"{peer * 1000:.0f} ms"
        ratio = "-" if peer is None else f"{med['localglm'] / peer:.2f}x"
        print(f"| {int(c):,} | {med['localglm'] * 1000:.0f} ms | {peer_ms} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
