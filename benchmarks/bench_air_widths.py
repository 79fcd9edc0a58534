"""Air-width rows: localglm's q8 / q4 / q2 beside llama.cpp's Q8_0 / Q4_K_M / Q2_K at GLM-4.5-Air's real per-layer widths.

    python benchmarks/bench_air_widths.py                       # 2 threads, prompt 128, 32 new tokens, KL too
    python benchmarks/bench_air_widths.py --kl-tokens 0 --repeat 3
    python benchmarks/bench_air_widths.py --pairs q4:Q4_K_M     # one pair only (default: q8, q4, q2 and the equal-size q4-all, q2-all)

The model is bench_gguf_kquant's BENCH_SPEC: hidden 4096, 96 query / 8 KV heads x 128, experts 1408 wide, top-8 of
32, a first dense layer 10944 wide, 4 layers, random weights made here (cached under the bench cache's
`air-widths/`, never shipped; ~4.6 GB of bf16 plus its bf16 GGUF). Ours: `localglm quantize --experts 8` / `4` / `2`
(bench_quant's recipes). llama.cpp's: its own quantizer (llama-cpp-python's bundled libllama) on the bf16 GGUF of
the same weights. Each engine runs in its own subprocess on the same prompt ids (bench_generate's workers),
interleaved `--repeat` times (medians); decode and prefill tok/s and their ratios come from this one run. KL (mean
next-token KL against localglm on the bf16 checkpoint, bench_quant's workers) is the quality check at equal bits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quant as bq  # noqa: E402
from bench_generate import BENCH_ROOT, available, fill_speed, run_workers  # noqa: E402
from bench_gguf_kquant import BENCH_SPEC  # noqa: E402

WORK = BENCH_ROOT / "air-widths"
PAIRS = (("q8", "Q8_0"), ("q4", "Q4_K_M"), ("q2", "Q2_K"))  # ours, llama.cpp's (bench_quant's OURS / LLAMA names)
# The equal-size comparisons: our default recipes keep the dense layer and the shared expert (and, above 2-bit
# experts, attention) at 8 bits (a q4 file is 1.07x the Q4_K_M one at these widths); the -all recipes put them at 4.
EQUAL_SIZE = (("q4-all", "Q4_K_M"), ("q2-all", "Q2_K"))


def ensure_model(work: Path = WORK) -> Path:
    """The random Air-width bf16 checkpoint, made once under `work`."""
    from localglm.models.glm4_moe.tiny import TinySpec
    from localglm.tiny import make_tiny

    model = work / "air-bf16"
    if not (model / "config.json").is_file():
        print(f"writing {model} (random GLM-4.5-Air-width weights) ...", file=sys.stderr, flush=True)
        make_tiny(model, TinySpec(**BENCH_SPEC), overwrite=True)
    return model


def measure(threads: int = 2, prompt: int = 128, new: int = 32, repeat: int = 1, pairs: tuple[tuple[str, str], ...] = PAIRS,
            kl_tokens: int = 128, kl_ctx: int = 64, work: Path = WORK) -> dict:  # fmt: skip
    """Make (cached) and measure every pair: sizes and KL through bench_quant.measure, then the speed runs of the
    quantized models only, all round-robin in one go. Returns rows in bench_quant's form plus the run's facts."""
    model = ensure_model(work)
    # A llama.cpp type may pair with several of ours (q2 and q2-all beside Q2_K): measured once, listed once.
    ours, llama = list(dict.fromkeys(o for o, _ in pairs)), list(dict.fromkeys(t for _, t in pairs)) if available("llama.cpp") else []
    load0 = os.getloadavg()
    t0 = time.time()
    rows, n_params = bq.measure(model, work, ours, llama, "kl" if kl_tokens else "sizes", threads, kl_tokens, kl_ctx)
    targets = {r["label"]: r for r in rows if "bytes" in r and r["level"] != "bf16"}
    paths = {label: (work / f"{model.name}-{label.split(' ', 1)[1]}{'.gguf' if label.startswith('llama') else ''}") for label in targets}
    order = list(dict.fromkeys(lab for o, t in pairs for lab in (f"localglm {o}", f"llama.cpp {t}") if lab in targets))
    jobs = [(label, label.split(" ", 1)[0], paths[label]) for label in order]
    load1 = os.getloadavg()
    speed = run_workers(jobs, prompt, new, threads, BENCH_SPEC["vocab_size"], repeat)
    for row in rows:
        fill_speed(row, speed.get(row["label"]))
    return {"rows": rows, "n_params": n_params, "threads": threads, "prompt": prompt, "new": new, "repeat": repeat,
            "kl_tokens": kl_tokens, "kl_ctx": kl_ctx, "load_start": load0, "load_speed": load1, "load_end": os.getloadavg(),
            "seconds": time.time() - t0}  # fmt: skip


def table(res: dict) -> str:
    """The figures (bench_quant's table) and each pair's ratios, ours / llama.cpp, with the load averages."""
    la = lambda v: " ".join(f"{x:.2f}" for x in v)  # noqa: E731
    head = (f"GLM-4.5-Air widths, 4 layers x 32 experts, random weights ({res['n_params'] / 1e9:.2f}B parameters): "
            f"{res['threads']} threads, prompt {res['prompt']} tokens, {res['new']} new, {res['repeat']} run(s) per model "
            f"interleaved (medians); KL over {res['kl_tokens'] or 'no'} tokens (windows of {res['kl_ctx']}). Load average "
            f"{la(res['load_start'])} at the start, {la(res['load_speed'])} before the speed runs, {la(res['load_end'])} at the "
            f"end ({res['seconds']:.0f} s).")  # fmt: skip
    return "\n\n".join([head, bq.table(res["rows"]), bq.ratio_table(res["rows"])])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--new", type=int, default=32, help="new tokens (default 32)")
    ap.add_argument("--repeat", type=int, default=1, help="speed runs per model, interleaved, medians reported (default 1)")
    ap.add_argument("--kl-tokens", type=int, default=128, help="KL tokens (default 128; 0 skips KL)")
    ap.add_argument("--kl-ctx", type=int, default=64, help="KL window (default 64)")
    ap.add_argument("--pairs", default=",".join(f"{o}:{t}" for o, t in PAIRS + EQUAL_SIZE), help="ours:llama.cpp's pairs (default %(default)s)")
    ap.add_argument("--work", type=Path, default=WORK, help="cache of the random model and its quantizations (default %(default)s)")
    args = ap.parse_args()
    pairs = []
    for item in args.pairs.split(","):
        o, _, t = item.partition(":")
        if o not in bq.OURS or t not in bq.LLAMA:
            ap.error(f"--pairs: {item!r} is not ours:theirs with ours in {', '.join(bq.OURS)} and theirs in {', '.join(bq.LLAMA)}")
        pairs.append((o, t))
    if not available("llama.cpp"):
        print("llama.cpp: llama-cpp-python not installed: ours only, no ratios", file=sys.stderr)
    print(table(measure(args.threads, args.prompt, args.new, args.repeat, tuple(pairs), args.kl_tokens, args.kl_ctx, args.work)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
