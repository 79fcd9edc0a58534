"""Quantized models: bits/weight, file size, KL vs the bf16 model, CPU prefill/decode tok/s -- localglm's
q2/q4/q8 recipes beside llama.cpp's Q2_K / Q4_K_M / Q8_0 made from the same weights.

    python benchmarks/bench_quant.py --model ~/.cache/localglm-bench/glm09b-bf16 --work /tmp/qbench
    python benchmarks/bench_quant.py --model default --work /tmp/qbench   # the packaged default model
    python benchmarks/bench_quant.py --only kl          # skip the speed runs

Every measurement runs in its own subprocess. KL is mean KL(reference || quantized) over the next-token
distributions of fixed pseudo-random token windows, the reference being localglm on the checkpoint as stored
(bf16; the packaged default model is FP8). The benchmark model has random weights, so text perplexity would
mean nothing. llama.cpp's GGUFs come from its own converter (`--llama-converter PATH`) or `localglm
export-gguf --type bf16`, then llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`). Speed uses benchmarks/bench_generate.py's
workers (same prompt ids, greedy, 2 threads by default).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_generate import (  # noqa: E402
    DEFAULT_DIR, PACKAGED, add_converter_option, code_stamp, ensure_gguf, ensure_model, fill_speed, is_current, is_fresh, run_workers, use_converter, write_stamp,
)  # fmt: skip

# name -> localglm quantize flags
OURS = {
    "q8": ["--experts", "8"],
    "q4": ["--experts", "4"],
    "q4-all": ["--experts", "4", "--attn", "4", "--shared", "4", "--dense", "4", "--embed", "4"],
    "q4-attn4": ["--experts", "4", "--attn", "4"],  # attention at 4 bits, shared/dense/embed/lm_head at 8
    "q2": ["--experts", "2"],  # attention at 4 bits too (quant.recipe.default_bits), shared/dense/embed/lm_head at 8
    "q2-all": ["--experts", "2", "--attn", "4", "--shared", "4", "--dense", "4", "--embed", "4"],
}
LLAMA = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K"}
# Each localglm level's llama.cpp counterpart (the -all recipes are the matched-size comparisons).
PEER = {"bf16": "bf16", "q8": "Q8_0", "q4": "Q4_K_M", "q4-all": "Q4_K_M", "q4-attn4": "Q4_K_M", "q2": "Q2_K", "q2-all": "Q2_K"}


def windows(n_tokens: int, ctx: int, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(4321)
    ids = [rng.randrange(0, vocab - 64) for _ in range(n_tokens)]
    return [ids[i : i + ctx] for i in range(0, n_tokens, ctx)]


# ---- workers ----------------------------------------------------------------------------------
def logits_localglm(target: str, wins: list[list[int]], threads: int) -> list:
    import torch

    import localglm

    torch.set_num_threads(threads)
    m = localglm.load(target)
    return [m.logits(torch.tensor([w]))[0].float() for w in wins]


def logits_llama(target: str, wins: list[list[int]], threads: int) -> list:
    import llama_cpp
    import numpy as np
    import torch

    llm = llama_cpp.Llama(model_path=target, n_ctx=max(map(len, wins)) + 8, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)  # fmt: skip
    out = []
    for w in wins:
        llm.reset()
        llm.eval(w)
        out.append(torch.from_numpy(np.array(llm.scores[: len(w)], dtype=np.float32)))
    return out


def worker(args: argparse.Namespace) -> int:
    import torch

    wins = json.loads(Path(args.wins).read_text())
    fn = logits_llama if args.target.endswith(".gguf") else logits_localglm
    logits = fn(args.target, wins, args.threads)
    if args.save:
        torch.save(logits, args.save)
        return 0
    res = {}
    for key, path in zip(("kl", "kl_own"), args.ref.split(",")):  # vs localglm bf16, and vs the engine's own bf16
        ref = torch.load(path)
        kl = n = 0.0
        top1 = 0
        for a, b in zip(ref, logits):
            la, lb = a.log_softmax(-1), b.log_softmax(-1)
            kl += float((la.exp() * (la - lb)).sum())
            top1 += int((a.argmax(-1) == b.argmax(-1)).sum())
            n += a.shape[0]
        res[key] = kl / n
        res["top1" if key == "kl" else "top1_own"] = top1 / n
    print(json.dumps(res))
    return 0


# ---- quantizer speed ------------------------------------------------------------------------------
LLAMA_QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, sys.argv[3])
p.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def quantize_times(model: Path, work: Path, threads: int, repeat: int = 1, ours: str = "q4", llama: str = "Q4_K_M") -> list[dict]:
    """Wall time of `localglm quantize` (from the safetensors) and of llama.cpp's quantizer (from its bf16
    GGUF, made beforehand and not timed: llama.cpp's own path needs that conversion first), each a fresh
    process on `threads` threads, interleaved `repeat` times; rows: quantizer, seconds (median), range, MB/s
    of the model's safetensors."""
    work.mkdir(parents=True, exist_ok=True)
    src_mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e6
    jobs = [(f"localglm quantize {' '.join(OURS[ours])}", [sys.executable, "-m", "localglm", "quantize", str(model), str(work / "time-ours"),
             *OURS[ours], "--threads", str(threads), "-q", "--overwrite"])]  # fmt: skip
    bf16 = make_llama_bf16(model, work) if llama_cpp_installed() else None
    if bf16 is not None:
        jobs.append((f"llama.cpp quantize {llama}", [sys.executable, "-c", LLAMA_QUANTIZE, str(bf16), str(work / "time-llama.gguf"), LLAMA[llama], str(threads)]))
    times: dict[str, list[float]] = {label: [] for label, _ in jobs}
    for _ in range(repeat):
        for label, cmd in jobs:
            t0 = time.perf_counter()
            r = run(cmd)
            if r.returncode == 0:
                times[label].append(time.perf_counter() - t0)
    rows = []
    for label, ts in times.items():
        ts.sort()
        rows.append({"quantizer": label, "threads": threads, "s": ts[len(ts) // 2] if ts else None, "range": (ts[0], ts[-1]) if ts else None, "mb_s": src_mb / ts[len(ts) // 2] if ts else None})
    if bf16 is None:
        rows.append({"quantizer": "llama.cpp", "threads": threads, "s": None, "range": None, "mb_s": None, "status": "not installed"})
    return rows


def time_table(rows: list[dict]) -> str:
    lines = ["| quantizer | threads | seconds (median) | min-max | MB/s of bf16 | llama.cpp time / ours |", "|---|---:|---:|---:|---:|---:|"]
    ours = rows[0]["s"]
    peer = next((r["s"] for r in rows[1:] if r["s"]), None)
    for r in rows:
        if r["s"] is None:
            lines.append(f"| {r['quantizer']} | {r['threads']} | {r.get('status', 'failed')} | - | - | - |")
            continue
        ratio = f"{peer / ours:.2f}x" if r is rows[0] and peer and ours else ""
        lines.append(f"| {r['quantizer']} | {r['threads']} | {r['s']:.1f} | {r['range'][0]:.1f}-{r['range'][1]:.1f} | {r['mb_s']:.0f} | {ratio} |")
    return "\n".join(lines)


# ---- driver ---------------------------------------------------------------------------------------
def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        print(f"FAILED {' '.join(cmd)}\n{r.stderr[-2000:]}", file=sys.stderr)
    return r


def quantizer_stamp(name: str) -> str:
    """The recipe and the quantizer's sources: a quantization cached from other code is remade."""
    import localglm
    import quant

    pkg = Path(localglm.__file__).parent
    files = [*sorted(Path(quant.__file__).parent.rglob("*.py")), *sorted((pkg / "checkpoint").glob("*.py")), pkg / "quantize.py", pkg / "commands" / "quantize.py"]
    return code_stamp(" ".join(OURS[name]), *files)


def make_ours(model: Path, work: Path, name: str) -> Path | None:
    out = work / f"{model.name}-{name}"
    stamp = quantizer_stamp(name)
    if not is_current(out, model, stamp) or not (out / "localglm_quant.json").is_file():
        r = run([sys.executable, "-m", "localglm", "quantize", str(model), str(out), *OURS[name], "-q", "--overwrite"])
        if r.returncode != 0:
            return None
        write_stamp(out, stamp)
    return out


def make_llama_bf16(model: Path, work: Path) -> Path | None:
    """The bf16 GGUF bench_generate.py uses too (one export per model, next to it or in the bench cache)."""
    return ensure_gguf(model, "bf16")


def make_llama(model: Path, work: Path, name: str) -> Path | None:
    """llama.cpp's quantizer (through llama-cpp-python's bundled libllama: no `llama-quantize` binary needed)."""
    out = work / f"{model.name}-{name}.gguf"
    bf16 = make_llama_bf16(model, work)
    if bf16 is None:
        return None
    if is_fresh(out, bf16):
        return out
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, LLAMA[name])
    p.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(bf16).encode(), str(out).encode(), ctypes.byref(p))
    return out if rc == 0 else None


def size_of(target: Path) -> int:
    if target.is_file():
        return target.stat().st_size
    return sum(p.stat().st_size for p in target.iterdir() if p.suffix == ".safetensors")


def llama_cpp_installed() -> bool:
    try:
        import llama_cpp  # noqa: F401

        return True
    except ImportError:
        return False


def measure(model: Path, work: Path, ours: list[str], llama: list[str], only: str = "all", threads: int = 2,
            kl_tokens: int = 512, kl_ctx: int = 128, prompt_tokens: int = 128, new_tokens: int = 64,
            repeat: int = 1) -> tuple[list[dict], int]:  # fmt: skip
    """Make the quantized models (cached in `work`, remade when older than `model` or made by other quantizer
    code; llama.cpp's bf16 GGUF is bench_generate.ensure_gguf's), measure them.

    Returns (rows, parameter count). A row: label, engine, level, peer (the llama.cpp row it is compared
    with, for localglm rows), bytes, bpw, kl / kl_own / top1 / top1_own, prefill / decode (tok/s) / ttft (s)
    / rss (bytes) / load_s (medians of `repeat` interleaved runs), or status (why figures are missing). The
    first row is the reference: localglm on the checkpoint as stored (bf16; the packaged model is FP8)."""
    work.mkdir(parents=True, exist_ok=True)
    config = json.loads((model / "config.json").read_text())
    ref_level = (config.get("quantization_config") or {}).get("quant_method") or "bf16"
    targets: list[tuple[str, Path | None]] = [(f"localglm {ref_level}", model)]
    for name in ours:
        targets.append((f"localglm {name}", make_ours(model, work, name)))
    have_llama = bool(llama) and llama_cpp_installed()
    if llama and not have_llama:
        print("llama.cpp: llama-cpp-python not installed, skipped", file=sys.stderr)
    if llama:
        targets.append(("llama.cpp bf16", make_llama_bf16(model, work) if have_llama else None))
        for name in llama:
            targets.append((f"llama.cpp {name}", make_llama(model, work, name) if have_llama else None))
    from localglm.checkpoint.source import SafetensorsSource

    with SafetensorsSource(model) as src:  # every stored weight (the MTP layer included, as in the GGUFs)
        n_params = sum(src.info(n).numel for n in src.names())

    # Reference logits are made afresh every run (they depend on the engines' code, not only on the weights),
    # named per model (a shared --work must not mix models).
    wins_path = work / f"kl_windows-{model.name}.json"
    wins_path.write_text(json.dumps(windows(kl_tokens, kl_ctx, config["vocab_size"])))
    ref_path = work / f"kl_ref-{model.name}.pt"
    llama_ref = work / f"kl_ref_llama_bf16-{model.name}.pt"
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", "--wins", str(wins_path), "--threads", str(threads)]
    if only in ("kl", "all"):
        for path in (ref_path, llama_ref):
            path.unlink(missing_ok=True)
        run([*me, "--target", str(model), "--save", str(ref_path)])
        llama_bf16 = dict(targets).get("llama.cpp bf16")
        if llama_bf16 is not None:
            run([*me, "--target", str(llama_bf16), "--save", str(llama_ref)])
    rows = []
    for label, target in targets:
        engine, name = label.split(" ", 1)
        row: dict = {"label": label, "engine": engine, "level": name}
        if engine == "localglm" and llama and (name == ref_level or PEER.get(name) in llama):
            row["peer"] = f"llama.cpp {PEER.get(name, 'bf16')}"
        if target is None:
            row["status"] = "not installed" if engine == "llama.cpp" and not have_llama else "failed"
            rows.append(row)
            continue
        row.update(bytes=size_of(target), bpw=8 * size_of(target) / n_params)
        if only in ("kl", "all") and target != model:
            refs = f"{ref_path},{llama_ref}" if engine == "llama.cpp" and llama_ref.is_file() else f"{ref_path},{ref_path}"
            r = run([*me, "--target", str(target), "--ref", refs]) if ref_path.is_file() else None
            if r is not None and r.returncode == 0:
                row.update(json.loads(r.stdout.strip().splitlines()[-1]))
            else:
                row["status"] = "KL failed" if ref_path.is_file() else "KL failed (reference run failed)"
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    if only in ("speed", "all"):  # after every KL run, all targets round-robin `repeat` times
        jobs = [(label, label.split(" ", 1)[0], target) for label, target in targets if target is not None]
        speed = run_workers(jobs, prompt_tokens, new_tokens, threads, config["vocab_size"], repeat)
        for row in rows:
            if not fill_speed(row, speed.get(row["label"])) and "bytes" in row:
                row["status"] = "; ".join(filter(None, [row.get("status"), "speed run failed"]))
    return rows, n_params


def _f(r: dict, k: str, fmt: str) -> str:
    return (fmt % r[k]) if k in r else "-"


def table(rows: list[dict]) -> str:
    """One row per model: its figures (a row without any says why in the file-size column)."""
    ref = rows[0]["label"] if rows else "localglm"
    spread = any(r.get("runs", 1) > 1 for r in rows)
    out = [f"| model | bits/weight (file) | file MiB | KL vs {ref} | KL vs own bf16 | top-1 agree | prefill tok/s | decode tok/s | TTFT s | peak RSS GiB |"
           + (" decode min-max (runs) |" if spread else ""), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if spread else "")]  # fmt: skip
    for r in rows:
        if "bytes" not in r:
            out.append(f"| {r['label']} | {r.get('status', '-')} | | | | | | | | |" + (" |" if spread else ""))
            continue
        rss = "%.2f" % (r["rss"] / 2**30) if "rss" in r else "-"
        label = f"{r['label']} ({r['status']})" if r.get("status") else r["label"]
        line = (f"| {label} | {r['bpw']:.2f} | {r['bytes'] / 2**20:.1f} | {_f(r, 'kl', '%.3g')} | {_f(r, 'kl_own', '%.3g')} | "
                f"{_f(r, 'top1', '%.3f')} | {_f(r, 'prefill', '%.1f')} | {_f(r, 'decode', '%.2f')} | {_f(r, 'ttft', '%.3f')} | {rss} |")  # fmt: skip
        if spread:
            line += f" {r['decode_range'][0]:.2f}-{r['decode_range'][1]:.2f} ({r['runs']}) |" if "decode_range" in r else " - |"
        out.append(line)
    return "\n".join(out)


RATIO_KEYS = [("bytes", "file size"), ("kl", "KL vs reference"), ("prefill", "prefill tok/s"), ("decode", "decode tok/s"),
              ("ttft", "TTFT"), ("rss", "peak RSS")]  # fmt: skip


def ratio_table(rows: list[dict]) -> str:
    """Each localglm level beside its llama.cpp peer: ours / theirs for every figure both rows have."""
    by_label = {r["label"]: r for r in rows}
    out = ["| ours vs llama.cpp (ours / theirs) | " + " | ".join(h for _, h in RATIO_KEYS) + " |",
           "|---|" + "---:|" * len(RATIO_KEYS)]  # fmt: skip
    for r in rows:
        if r["engine"] != "localglm" or not r.get("peer"):
            continue
        peer = by_label.get(r["peer"], {})
        cells = []
        for k, _ in RATIO_KEYS:
            if k in r and k in peer and peer[k]:
                cells.append(f"{r[k] / peer[k]:.2f}x")
            else:
                cells.append(peer.get("status") or r.get("status") or "-")
        out.append(f"| {r['level']} vs {r['peer'].split(' ', 1)[1]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_DIR,
                    help=f"HF-layout model dir, or '{PACKAGED}' for the packaged default model (default: {DEFAULT_DIR}, made if missing)")  # fmt: skip
    ap.add_argument("--work", type=Path, default=Path("/tmp/qbench"))
    ap.add_argument("--ours", default=",".join(OURS))
    ap.add_argument("--llama", default=",".join(LLAMA))
    ap.add_argument("--only", choices=["kl", "speed", "time", "all"], default="all",
                    help="time: only the quantizers' own speed, ours (--experts 4) against llama.cpp's (Q4_K_M)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kl-tokens", type=int, default=512)
    ap.add_argument("--kl-ctx", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="speed runs per model, interleaved; the table shows medians")
    add_converter_option(ap)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--wins", help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    use_converter(args)
    if args.worker:
        return worker(args)

    model = ensure_model(args.model)
    if args.only == "time":
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(time_table(quantize_times(model, args.work, args.threads, args.repeat)))
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return 0
    rows, n_params = measure(model, args.work, [n for n in args.ours.split(",") if n], [n for n in args.llama.split(",") if n],
                             args.only, args.threads, args.kl_tokens, args.kl_ctx, args.prompt_tokens, args.new_tokens, args.repeat)  # fmt: skip
    print(f"\n{time.strftime('%Y-%m-%d')}  model={model.name} ({n_params / 1e6:.0f}M params)  threads={args.threads}  "
          f"KL over {args.kl_tokens} tokens (windows of {args.kl_ctx}); speed: prompt {args.prompt_tokens}, new {args.new_tokens}\n")  # fmt: skip
    print(table(rows))
    if any(r.get("peer") for r in rows):
        print()
        print(ratio_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
