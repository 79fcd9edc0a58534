"""Decode on a busy machine: the default model's decode speed with 1 thread and with the default
thread count, first as the machine is, then beside CPU-bound neighbour processes (python busy loops,
what a compile job looks like to the scheduler).

    python benchmarks/bench_busy.py                        # the packaged default model, 1 neighbour
    python benchmarks/bench_busy.py --neighbours 2 --repeat 5 --json out.json

Each run is its own process (`localglm` imported first, as the command line does, so OpenMP's wait
policy is set before torch loads; threads chosen by the same `set_threads` as `--threads`), runs
interleaved, medians reported. The peer is our own 1-thread run in the same minute: target
default / 1 thread >= 1.0 beside a neighbour. Two more rows show why: 2 threads forced, and 2 threads
with OpenMP's old spin-waiting (GOMP_SPINCOUNT=300000, libgomp's default), which collapses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_generate as bg  # noqa: E402

# (label, --threads value or None for the default, extra environment)
CONFIGS: list[tuple[str, int | None, dict[str, str]]] = [
    ("1 thread", 1, {}),
    ("default threads", None, {}),
    ("2 threads", 2, {}),
    ("2 threads, spinning OpenMP (GOMP_SPINCOUNT=300000, libgomp's default)", 2, {"GOMP_SPINCOUNT": "300000"}),
]


def worker(model: Path, threads: int | None, prompt_tokens: int, new_tokens: int) -> dict:
    """One decode run in this process: what `localglm generate` does about threads, then greedy decoding."""
    import localglm  # first: sets the OpenMP wait policy before torch loads
    from localglm.commands.flags import set_threads

    set_threads(threads)
    import torch

    m = localglm.load(model)
    ids = bg.prompt_ids(prompt_tokens, m.config.vocab_size)
    stats = localglm.GenerationStats()
    list(m.stream_tokens(ids, max_new_tokens=new_tokens, sampling=localglm.SamplingParams(temperature=0), stats=stats))
    return {"threads": torch.get_num_threads(), "decode_tok_s": stats.decode_tok_s, "prompt_tok_s": stats.prompt_tok_s}


def run_once(model: Path, threads: int | None, env: dict[str, str], prompt_tokens: int, new_tokens: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", str(model), "--prompt-tokens", str(prompt_tokens),
           "--new-tokens", str(new_tokens)] + ([] if threads is None else ["--threads", str(threads)])  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    r = subprocess.run(cmd, capture_output=True, text=True, env={**base, **env}, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"decode run failed: {r.stderr.strip()[-1500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def start_neighbours(n: int) -> list[subprocess.Popen]:
    """n CPU-bound processes (a python busy loop each), started a second before measuring."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(1.0)
    return procs


def stop_neighbours(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=10)


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(model: Path, neighbours: int, repeat: int, prompt_tokens: int, new_tokens: int) -> dict:
    """{phase: {label: {threads, decode_tok_s (median), prompt_tok_s (median), runs}}} for phases
    'as is' and 'busy', with the load average before each phase."""
    out: dict = {"neighbours": neighbours, "repeat": repeat, "phases": {}}
    for phase in ("as is", "busy"):
        procs = start_neighbours(neighbours) if phase == "busy" else []
        try:
            load0 = load_avg()
            runs: dict[str, list[dict]] = {label: [] for label, _, _ in CONFIGS}
            for _ in range(repeat):  # interleaved: each round runs every configuration once
                for label, threads, env in CONFIGS:
                    runs[label].append(run_once(model, threads, env, prompt_tokens, new_tokens))
        finally:
            stop_neighbours(procs)
        out["phases"][phase] = {
            "load_before": load0,
            "rows": {label: {"threads": sorted({r["threads"] for r in rs}),
                             "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs),
                             "prompt_tok_s": statistics.median(r["prompt_tok_s"] for r in rs),
                             "decode_range": [min(r["decode_tok_s"] for r in rs), max(r["decode_tok_s"] for r in rs)]}
                     for label, rs in runs.items()},
        }  # fmt: skip
    return out


def table(res: dict) -> str:
    """Machine state and configuration down; decode, prefill and the ratio to 1 thread in the same phase across."""
    lines = ["| machine | threads | decode tok/s (median; min-max) | prefill tok/s | decode / 1 thread |", "|---|---|---:|---:|---:|"]
    for phase, p in res["phases"].items():
        one = p["rows"]["1 thread"]["decode_tok_s"]
        what = f"{phase} (load {p['load_before']})" if phase == "as is" else f"{res['neighbours']} CPU-bound neighbour(s) (load {p['load_before']})"
        for label, r in p["rows"].items():
            used = "/".join(map(str, r["threads"]))
            lo, hi = r["decode_range"]
            lines.append(f"| {what} | {label}: {used} | {r['decode_tok_s']:.1f} ({lo:.1f}-{hi:.1f}) | {r['prompt_tok_s']:.1f} | {r['decode_tok_s'] / one:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path(bg.PACKAGED), help=f"model dir, or '{bg.PACKAGED}' (the packaged default model)")
    ap.add_argument("--neighbours", type=int, default=1, help="CPU-bound processes beside the busy phase's runs (default 1)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration and phase, interleaved; medians (default 3)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    model = bg.ensure_model(args.model)
    if args.worker:
        print(json.dumps(worker(model, args.threads, args.prompt_tokens, args.new_tokens)))
        return 0
    res = measure(model, args.neighbours, args.repeat, args.prompt_tokens, args.new_tokens)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
