"""The whole benchmark suite in one command: markdown tables on stdout as each one finishes, all of them
(with the date, the machine and the exact command lines) in one results file.

    python benchmarks/run_all.py                       # ~0.9B random GLM-shaped model, then the packaged default model
    python benchmarks/run_all.py --quick               # smoke run: the default model only, few tokens
    python benchmarks/run_all.py --model DIR --model default --threads 2 --out results.md

For each model: generation speed (benchmarks/bench_generate.py: localglm, transformers, llama.cpp, each in its
own subprocess), quantization (benchmarks/bench_quant.py: our q8/q4/q2 beside llama.cpp's Q8_0/Q4_K_M/Q2_K
made from the same weights: size, KL vs bf16, speed), and for the packaged default model the offload
benchmark (benchmarks/bench_offload.py: cache simulator beside Belady, next-layer prediction) and the
busy-machine row (benchmarks/bench_busy.py: decode with 1 and the default threads beside a CPU-bound process), and once
the GGUF-as-stored row (benchmarks/bench_gguf_kquant.py: a K-quant mix by llama.cpp's quantizer at Air widths) and the Air-width
rows (benchmarks/bench_air_widths.py: our q8 / q4 / q2 beside llama.cpp's Q8_0 / Q4_K_M / Q2_K of the same Air-width weights). Ratios
(ours / llama.cpp, best policy / Belady) are between figures measured in this run, minutes apart.

llama.cpp is the optional `llama-cpp-python` extra: without it its cells say "not installed" and the run goes
on. Derived models (GGUFs, quantized directories) are cached (under --work; the bf16 GGUF beside the model or in
the bench cache) and remade when older than the model or made by other exporter/quantizer code; reference
logits are made afresh every run. Speed runs interleave engines and report medians of --repeat runs; on a
machine shared with other work, --threads 1 is far steadier than 2 on 2 cores. The results file is rewritten (temp name, then rename) after every table, so an
interrupted run leaves the tables it finished.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from datetime import date, datetime
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench_air_widths as ba  # noqa: E402
import bench_busy as bb  # noqa: E402
import bench_generate as bg  # noqa: E402
import bench_gguf_kquant as bk  # noqa: E402
import bench_quant as bq  # noqa: E402

ENGINES = ["localglm", "transformers", "llama.cpp"]
SECTIONS = ["generate", "quant", "offload", "busy", "gguf", "air"]
# (full, quick) settings
SETTINGS = {
    False: dict(prompt_tokens=128, new_tokens=64, kl_tokens=512, kl_ctx=128, ours=list(bq.OURS), profile_tokens=150, eval_tokens=300, repeat=3),
    True: dict(prompt_tokens=32, new_tokens=16, kl_tokens=128, kl_ctx=64, ours=["q8", "q4", "q2"], profile_tokens=40, eval_tokens=80, repeat=1),
}  # fmt: skip


# ---- facts ----------------------------------------------------------------------------------------
def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def git_commit() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "?"


def machine_facts(threads: int) -> list[str]:
    import psutil

    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in info)
    except OSError:
        pass
    llama = version("llama-cpp-python")
    if llama != "not installed" and not bg.available("llama.cpp"):
        llama += " (installed but not importable: not installed for this run)"
    return [
        f"- CPU: {cpu_model()} ({flags or 'flags unknown'}); {os.cpu_count()} logical cores "
        f"({psutil.cpu_count(logical=False)} physical); {psutil.virtual_memory().total / 2**30:.0f} GiB RAM; "
        f"benchmark threads: {threads}",
        f"- software: Python {platform.python_version()}, torch {version('torch')}, transformers {version('transformers')}, "
        f"llama-cpp-python {llama}, localglm {version('localglm')} (git {git_commit()}); {platform.platform()}",
        f"- load average (1 / 5 / 15 min) at the start: {load_avg()}",
        *busy_warning(threads),
    ]


def busy_warning(threads: int) -> list[str]:
    """Other work on the cores makes multi-threaded timings swing by 10-100x (a descheduled thread stalls
    every barrier); say so where the figures are."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return []
    cores = os.cpu_count() or 1
    if load + threads <= cores + 0.5:
        return []
    msg = (f"- WARNING: the machine is busy (load average {load:.1f} on {cores} cores, {threads} benchmark threads): "
           f"speed figures and their ratios are unreliable; sizes, KL and the offload tables are not affected"
           + (" (--threads 1 is steadier on a shared machine)" if threads > 1 else ""))  # fmt: skip
    print(msg[2:], file=sys.stderr)
    return [msg]


def count_params(model: Path) -> int:
    from localglm.checkpoint.source import SafetensorsSource

    with SafetensorsSource(model) as src:
        return sum(src.info(n).numel for n in src.names())


def describe(model: Path) -> str:
    c = json.loads((model / "config.json").read_text())
    quant = (c.get("quantization_config") or {}).get("quant_method")
    return (f"`{model}`: {count_params(model) / 1e6:.0f}M parameters stored as {quant or c.get('torch_dtype', '?')}, "
            f"{c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c.get('n_routed_experts', '?')} experts "
            f"top-{c.get('num_experts_per_tok', '?')}, vocab {c['vocab_size']}")  # fmt: skip


def is_packaged(model: Path) -> bool:
    from localglm.default_model import DEFAULT_MODEL_DIR

    return model.resolve() == DEFAULT_MODEL_DIR.resolve()


def work_dir(base: Path, model: Path) -> Path:
    """Per-model cache folder: derived files are named after the model, and two models may share a name."""
    return base / f"{model.name}-{hashlib.sha1(str(model.resolve()).encode()).hexdigest()[:8]}"


def cmd_line(*parts: object) -> str:
    return shlex.join(str(p) for p in parts)


# ---- report ---------------------------------------------------------------------------------------
class Report:
    """Markdown blocks, printed as they come and rewritten to `out` (temp name, then rename) every time."""

    def __init__(self, out: Path, head: list[str]) -> None:
        self.out, self.head, self.blocks, self.failed = out, head, [], []
        out.parent.mkdir(parents=True, exist_ok=True)

    def add(self, text: str) -> None:
        print(text + "\n", flush=True)
        self.blocks.append(text)
        self.write(done=False)

    def write(self, done: bool) -> None:
        status = f"finished {datetime.now():%Y-%m-%d %H:%M}" if done else "partial: the run was still going (or was interrupted) after the last table"
        if self.failed:
            status += "; failed: " + ", ".join(self.failed)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text("\n".join(self.head + [f"- status: {status}", ""]) + "\n" + "\n\n".join(self.blocks) + "\n")
        os.replace(tmp, self.out)


def fmt(v: float, digits: int) -> str:
    return f"{v:.{digits}f}"


# ---- sections -------------------------------------------------------------------------------------
GEN_METRICS = [  # (label, key, formatter)
    ("prefill tok/s", "prompt_tok_s", lambda v: fmt(v, 1)),
    ("decode tok/s", "decode_tok_s", lambda v: fmt(v, 2)),
    ("time to first token, s", "ttft_s", lambda v: fmt(v, 3)),
    ("peak RSS, GiB", "peak_rss_bytes", lambda v: fmt(v / 2**30, 2)),
    ("load, s", "load_s", lambda v: fmt(v, 2)),
]


def generation_table(rows: list[tuple[str, dict | str]]) -> str:
    """Metrics down, engines across, then localglm / peer for each peer that has figures."""
    res = dict(rows)
    engines = [e for e, _ in rows]
    ours = res.get("localglm")
    peers = [p for p in ("llama.cpp", "transformers") if p in res]
    head = ["metric", *engines, *(f"localglm / {p}" for p in peers)]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, key, f in GEN_METRICS:
        cells = [f(r[key]) if isinstance(r, dict) else r for r in (res[e] for e in engines)]
        for p in peers:
            ok = isinstance(ours, dict) and isinstance(res[p], dict) and res[p][key]
            cells.append(f"{ours[key] / res[p][key]:.2f}x" if ok else "-")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    same = ["-" if e == "localglm" or not isinstance(ours, dict) or not isinstance(res[e], dict) else bg.same_tokens(res[e], ours) for e in engines]
    out.append("| greedy tokens equal to localglm's | " + " | ".join(same + ["" for _ in peers]) + " |")
    if any(isinstance(r, dict) and r.get("runs", 1) > 1 for r in res.values()):
        spread = [f"{r['decode_range'][0]:.2f}-{r['decode_range'][1]:.2f} ({r['runs']} runs)" if isinstance(r, dict) else "-" for r in (res[e] for e in engines)]
        out.append("| decode tok/s, min-max over runs | " + " | ".join(spread + ["" for _ in peers]) + " |")
    return "\n".join(out)


def section_generate(rep: Report, model: Path, engines: list[str], args: argparse.Namespace, s: dict) -> None:
    t0 = time.time()
    load0 = load_avg()
    rows = bg.measure_model(model, engines, args.threads, s["prompt_tokens"], s["new_tokens"], s["repeat"])
    cmd = cmd_line("python", "benchmarks/bench_generate.py", "--model", model, "--engines", ",".join(engines), "--threads",
                   args.threads, "--prompt-tokens", s["prompt_tokens"], "--new-tokens", s["new_tokens"], "--repeat", s["repeat"])  # fmt: skip
    rep.add(f"### Generation speed: {model.name}\n\n"
            f"Prompt {s['prompt_tokens']} tokens (fixed pseudo-random ids), {s['new_tokens']} new tokens, greedy, {args.threads} threads, "
            f"each engine in its own process, {s['repeat']} run(s) each, interleaved (figures: medians); "
            f"llama.cpp runs the bf16 GGUF `localglm export-gguf` writes from the same weights. "
            f"Ratios: localglm / peer (above 1 is faster for tok/s, is worse for time and memory). "
            f"Load average {load0} before, {load_avg()} after ({time.time() - t0:.0f} s). Same as `{cmd}`.\n\n"
            + generation_table(rows))  # fmt: skip


def section_quant(rep: Report, model: Path, engines: list[str], args: argparse.Namespace, s: dict) -> None:
    t0 = time.time()
    load0 = load_avg()
    llama = list(bq.LLAMA) if "llama.cpp" in engines else []
    work = work_dir(args.work, model)
    rows, n_params = bq.measure(model, work, s["ours"], llama, "all", args.threads, s["kl_tokens"], s["kl_ctx"], s["prompt_tokens"],
                                s["new_tokens"], s["repeat"])  # fmt: skip
    cmd = cmd_line("python", "benchmarks/bench_quant.py", "--model", model, "--work", work, "--ours", ",".join(s["ours"]), "--llama",
                   ",".join(llama), "--threads", args.threads, "--kl-tokens", s["kl_tokens"], "--kl-ctx", s["kl_ctx"],
                   "--prompt-tokens", s["prompt_tokens"], "--new-tokens", s["new_tokens"], "--repeat", s["repeat"])  # fmt: skip
    ref = rows[0]["label"]
    text = (f"### Quantization: {model.name}\n\n"
            f"Reference: {ref} (localglm on the checkpoint as stored). KL: mean next-token KL(reference || quantized) over "
            f"{s['kl_tokens']} pseudo-random tokens in windows of {s['kl_ctx']}; \"own bf16\" is llama.cpp's bf16 GGUF for "
            f"llama.cpp rows. Bits/weight: file bytes over {n_params / 1e6:.1f}M stored parameters. Speed: prompt "
            f"{s['prompt_tokens']}, {s['new_tokens']} new tokens, {args.threads} threads, {s['repeat']} run(s) per model, "
            f"interleaved (medians). Load average {load0} before, {load_avg()} after ({time.time() - t0:.0f} s). "
            f"Same as `{cmd}`.\n\n" + bq.table(rows))  # fmt: skip
    if llama:
        text += ("\n\nEach of our levels beside its llama.cpp counterpart, ours / theirs (below 1 is better for size, KL, "
                 "TTFT and RSS; above 1 is better for tok/s):\n\n" + bq.ratio_table(rows))  # fmt: skip
        times = bq.quantize_times(model, work, args.threads, s["repeat"])
        text += (f"\n\nThe quantizers' own speed, each a fresh process on {args.threads} threads, {s['repeat']} run(s) "
                 f"interleaved (medians; llama.cpp from its bf16 GGUF, whose conversion is not timed). Same as "
                 f"`{cmd_line('python', 'benchmarks/bench_quant.py', '--model', model, '--work', work, '--only', 'time', '--threads', args.threads, '--repeat', s['repeat'])}`:"
                 f"\n\n" + bq.time_table(times))  # fmt: skip
    else:
        text += "\n\nllama.cpp not selected (--engines): no ratios."
    rep.add(text)


def section_offload(rep: Report, model: Path, args: argparse.Namespace, s: dict) -> None:
    t0 = time.time()
    load0 = load_avg()
    out = work_dir(args.work, model) / "offload"
    cmd = ["python", "benchmarks/bench_offload.py", str(model), "--out", str(out), "--profile-tokens", str(s["profile_tokens"]),
           "--eval-tokens", str(s["eval_tokens"]), "--threads", str(args.threads)]  # fmt: skip
    (out / "results.json").unlink(missing_ok=True)
    r = subprocess.run([sys.executable, *cmd[1:]], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"bench_offload failed: {r.stderr.strip()[-1500:]}")
    res = json.loads((out / "results.json").read_text())
    policies = ["lru", "lfu", "stat"]
    lines = ["| trace, paging | cache (share of experts, slots) | " + " | ".join(f"{p} hit" for p in policies)
             + " | step-oracle hit (bound) | Belady hit | best / Belady | bytes moved, best / Belady |",
             "|---|---|" + "---:|" * (len(policies) + 4)]  # fmt: skip
    for key, rows in res.items():
        if not (isinstance(rows, list) and rows and "belady" in rows[0]):
            continue
        for row in rows:
            best = max(policies, key=lambda p: row[p]["hit_rate"])
            opt = row["belady"]
            oracle = f"{100 * row['step-oracle']['hit_rate']:.1f}%" if "step-oracle" in row else "-"
            lines.append(f"| {key} | {100 * row['fraction']:.0f}% ({row['capacity']}) | " + " | ".join(f"{100 * row[p]['hit_rate']:.1f}%" for p in policies)
                         + f" | {oracle} | {100 * opt['hit_rate']:.1f}% | " + (f"{100 * row[best]['hit_rate'] / opt['hit_rate']:.0f}%" if opt["hit_rate"] else "-")
                         + f" | {row[best]['bytes'] / opt['bytes']:.2f}x |" if opt["bytes"] else " | - |")  # fmt: skip
    pred = ["| predictor | precision | recall |", "|---|---:|---:|"]
    for name, c in res["prediction"].items():
        pred.append(f"| {name} | {100 * c['precision']:.1f}% | {100 * c['recall']:.1f}% |")
    per_layer = ", ".join(f"layer {layer}: {100 * r:.1f}%" for layer, r in res.get("prediction_recall_by_layer", {}).items())
    rep.add(f"### Expert offloading: {model.name}\n\n"
            f"Routing traced while generating: a profile run of {s['profile_tokens']} new tokens (prompt A) seeds the `stat` "
            f"policy; the eval run (prompt B, {s['eval_tokens']} new tokens at temperature 0.7: {res.get('trace_tokens', '?')} "
            f"traced tokens with the prompt) is "
            f"replayed by the cache simulator at 10-50% of the {res.get('moe_layers', '?')} x {res.get('n_experts', '?')} routed experts. "
            f"Belady (the optimum, demand paging) is the peer: with prefetch an online policy can pass it. The step-oracle is a "
            f"bound, not a policy: LFU that knows the rest of each token's routing, the most a demand policy could gain from "
            f"predicting this token's layers. "
            f"Load average {load0} before, {load_avg()} after ({time.time() - t0:.0f} s). Same as `{cmd_line(*cmd)}`.\n\n"
            + "\n".join(lines) + "\n\nExpert prediction on the eval run (each MoE layer's router applied to the residual stream "
            "entering it, i.e. the previous layer's output; 'two layers ahead': the next MoE layer's router on the same state):\n\n"
            + "\n".join(pred)
            + (f"\n\nRecorded predictions of the default predictor, decode recall by MoE layer: {per_layer}; "
               f"MoE layer to MoE layer (all but the first, which is predicted from a dense layer's output): "
               f"{100 * res['prediction_recall_after_first_moe_layer']:.1f}%." if per_layer else ""))  # fmt: skip


def section_busy(rep: Report, model: Path, args: argparse.Namespace, s: dict) -> None:
    """The busy-machine row: decode with 1 thread and the default threads, as is and beside a CPU-bound neighbour."""
    t0 = time.time()
    res = bb.measure(model, 1, s["repeat"], s["prompt_tokens"], s["new_tokens"])
    cmd = cmd_line("python", "benchmarks/bench_busy.py", "--model", model, "--neighbours", 1, "--repeat", s["repeat"],
                   "--prompt-tokens", s["prompt_tokens"], "--new-tokens", s["new_tokens"])  # fmt: skip
    rep.add(f"### Decode on a busy machine: {model.name}\n\n"
            f"Each run its own process, {s['repeat']} run(s) per row, interleaved (medians); the busy rows run beside one "
            f"CPU-bound neighbour process (a python busy loop). The peer is our 1-thread run in the same phase: target "
            f"default / 1 thread >= 1.0. The last row of each phase shows the collapse the fix removes (OpenMP threads "
            f"spinning between loops). {time.time() - t0:.0f} s. Same as `{cmd}`.\n\n" + bb.table(res))  # fmt: skip


def section_gguf(rep: Report, args: argparse.Namespace, s: dict) -> None:
    """The GGUF-as-stored row: a K-quant mix made by llama.cpp's quantizer on Air-width random weights, ours beside llama.cpp."""
    t0 = time.time()
    res = bk.measure(args.threads, s["prompt_tokens"], s["new_tokens"], s["repeat"])
    cmd = cmd_line("python", "benchmarks/bench_gguf_kquant.py", "--threads", args.threads, "--prompt", s["prompt_tokens"],
                   "--new", s["new_tokens"], "--repeat", s["repeat"])  # fmt: skip
    rep.add(f"### GGUF K-quant mix run as stored (GLM-4.5-Air widths)\n\nEach engine its own process, {s['repeat']} run(s), "
            f"interleaved (medians). {time.time() - t0:.0f} s. Same as `{cmd}`.\n\n" + bk.table(res))  # fmt: skip


def section_air(rep: Report, args: argparse.Namespace, s: dict) -> None:
    """The Air-width rows: our q4 / q2 (and the all-4-bit recipes, equal size) beside llama.cpp's Q4_K_M / Q2_K on the
    same random GLM-4.5-Air-width weights: decode, 128-token prefill, KL."""
    kl_tokens, kl_ctx = (s["kl_tokens"] // 4, s["kl_ctx"] // 2)
    res = ba.measure(args.threads, s["prompt_tokens"], s["new_tokens"] // 2, s["repeat"], ba.PAIRS + ba.EQUAL_SIZE, kl_tokens, kl_ctx)
    pairs = ",".join(f"{o}:{t}" for o, t in ba.PAIRS + ba.EQUAL_SIZE)
    cmd = cmd_line("python", "benchmarks/bench_air_widths.py", "--threads", args.threads, "--prompt", s["prompt_tokens"], "--new",
                   s["new_tokens"] // 2, "--repeat", s["repeat"], "--kl-tokens", kl_tokens, "--kl-ctx", kl_ctx, "--pairs", pairs)  # fmt: skip
    rep.add("### Air-width rows: q4 / q2 beside llama.cpp's Q4_K_M / Q2_K (GLM-4.5-Air widths)\n\n"
            f"Same as `{cmd}`.\n\n" + ba.table(res))  # fmt: skip


# ---- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", default=None,
                    help=f"HF-layout model dir, or '{bg.PACKAGED}' for the packaged default model; repeatable (default: "
                         f"{bg.DEFAULT_DIR}, made if missing, then '{bg.PACKAGED}'; with --quick: '{bg.PACKAGED}')")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer tokens and levels, the default model only")
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default: benchmarks/results/DATE.md, DATE-quick.md with --quick)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=None,
                    help="speed runs per engine and model, interleaved, medians reported (default 3; 1 with --quick)")  # fmt: skip
    ap.add_argument("--engines", default=",".join(ENGINES), help="engines to run (llama.cpp also gates the quantization peers)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"which of {','.join(SECTIONS)} to run")
    ap.add_argument("--work", type=Path, default=bg.DEFAULT_DIR.parent / "suite",
                    help="cache for GGUFs, quantized models and traces (default: %(default)s)")  # fmt: skip
    args = ap.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    sections = [x for x in args.sections.split(",") if x]
    for bad in set(engines) - set(ENGINES):
        ap.error(f"unknown engine {bad!r} (known: {', '.join(ENGINES)})")
    for bad in set(sections) - set(SECTIONS):
        ap.error(f"unknown section {bad!r} (known: {', '.join(SECTIONS)})")
    s = dict(SETTINGS[args.quick])
    if args.repeat:
        s["repeat"] = args.repeat
    models = args.model or ([Path(bg.PACKAGED)] if args.quick else [bg.DEFAULT_DIR, Path(bg.PACKAGED)])
    today = date.today().isoformat()
    out = args.out or HERE / "results" / f"{today}{'-quick' if args.quick else ''}.md"

    command = cmd_line(sys.executable, *sys.argv) if argv is None else cmd_line(sys.executable, HERE / "run_all.py", *argv)
    head = [f"# Benchmark suite, {today}{' (quick smoke run: figures not for publishing)' if args.quick else ''}", "",
            f"- command (in {Path.cwd()}): `{command}`", f"- started {datetime.now():%Y-%m-%d %H:%M}", *machine_facts(args.threads)]  # fmt: skip
    rep = Report(out, head)
    print("\n".join(head) + "\n", flush=True)
    for arg in models:
        try:
            if str(arg) != bg.PACKAGED and arg.expanduser() != bg.DEFAULT_DIR and not (arg.expanduser() / "config.json").is_file():
                raise FileNotFoundError(f"{arg}: no config.json (only {bg.DEFAULT_DIR} is made when missing)")
            model = bg.ensure_model(arg.expanduser())
            rep.add(f"## {'packaged default model' if is_packaged(model) else model.name}\n\n{describe(model)}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rep.failed.append(f"{arg}: {e}")
            continue
        jobs = {"generate": lambda: section_generate(rep, model, engines, args, s),
                "quant": lambda: section_quant(rep, model, engines, args, s),
                "offload": lambda: section_offload(rep, model, args, s) if is_packaged(model) else None,
                "busy": lambda: section_busy(rep, model, args, s) if is_packaged(model) else None,
                "gguf": lambda: section_gguf(rep, args, s) if arg is models[0] and "llama.cpp" in engines else None,
                "air": lambda: section_air(rep, args, s) if arg is models[0] else None}  # fmt: skip
        for name in sections:
            try:
                jobs[name]()
            except Exception as e:  # noqa: BLE001  (one failed table must not lose the others)
                traceback.print_exc()
                rep.failed.append(f"{name} on {model.name}")
                rep.add(f"### {name}: {model.name}\n\nFAILED: {type(e).__name__}: {str(e)[-800:]}")
    rep.write(done=True)
    print(f"wrote {out}", flush=True)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
