"""Prefill/decode speed, time to first token and peak RSS: localglm beside transformers and llama.cpp.

    python benchmarks/bench_generate.py                   # the ~0.9B GLM-shaped random model, bf16, 2 threads,
                                                          # then the packaged default model (fp8 weights)
    python benchmarks/bench_generate.py --model DIR --engines localglm,transformers
    python benchmarks/bench_generate.py --model ~/.cache/localglm-bench/flash-bf16   # GLM-4.7-Flash widths
    python benchmarks/bench_generate.py --model default --mtp --draft 3   # + localglm drafting with the MTP layer

Every engine runs in its own subprocess (so peak RSS is its own) on the same prompt token ids,
greedy, ignoring end-of-turn tokens. llama.cpp (the optional `llama-cpp-python` extra) runs a GGUF
of the same weights: written by llama.cpp's own converter when `--llama-converter PATH` (or
LOCALGLM_LLAMA_CONVERTER) names its convert_hf_to_gguf.py, else by `localglm export-gguf` (the same
tensors and keys; tests/test_glm4_moe_lite.py checks them against the converter's). A model
directory named in BENCH_MODELS is made when missing. Figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

BENCH_SPEC = dict(
    vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=24,
    num_key_value_heads=2, head_dim=128, moe_intermediate_size=352, n_routed_experts=64, num_experts_per_tok=8,
    first_k_dense_replace=1, max_shard_bytes=500_000_000,
)  # fmt: skip
# GLM-4.7-Flash's real widths (hidden 2048, 20 MLA heads, 64 experts top-4 of width 1536); 4 layers (1 dense) and the
# 4K vocabulary the tiny tokenizer trains, so the per-layer work is the real model's and the file stays a few GB.
FLASH_SPEC = dict(
    vocab_size=4096, hidden_size=2048, intermediate_size=10240, num_hidden_layers=4, num_attention_heads=20, q_lora_rank=768,
    kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, moe_intermediate_size=1536, n_routed_experts=64,
    num_experts_per_tok=4, first_k_dense_replace=1, routed_scaling_factor=1.8, num_nextn_predict_layers=0, max_shard_bytes=500_000_000,
)  # fmt: skip
# GLM-5's head dimensions (MLA kv_lora 512 + rope 64, qk_nope 192, v 256; indexer 32 heads x 128, top-2048), scaled
# down elsewhere to ~1B parameters: hidden 2048, 16 heads, q_lora 1024, 8 layers (1 dense) with GLM-5.2-style
# IndexShare (full, full, full, then shared x3, full, shared), 32 experts top-8 of width 512.
GLM5_SPEC = dict(
    vocab_size=4096, hidden_size=2048, intermediate_size=8192, num_hidden_layers=8, num_attention_heads=16, q_lora_rank=1024,
    kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, moe_intermediate_size=512, n_routed_experts=32,
    num_experts_per_tok=8, first_k_dense_replace=1, routed_scaling_factor=2.5, index_n_heads=32, index_head_dim=128,
    index_topk=2048, indexer_pattern="FFFSSSFS", num_nextn_predict_layers=0, max_shard_bytes=500_000_000,
)  # fmt: skip
# directory name -> (model_type, spec): what `ensure_model` writes when the directory is missing
BENCH_MODELS = {"glm09b-bf16": ("glm4_moe", BENCH_SPEC), "flash-bf16": ("glm4_moe_lite", FLASH_SPEC), "glm5-1b-bf16": ("glm_moe_dsa", GLM5_SPEC)}
BENCH_ROOT = Path(os.environ.get("LOCALGLM_BENCH_DIR", Path.home() / ".cache" / "localglm-bench"))
DEFAULT_DIR = BENCH_ROOT / "glm09b-bf16"
PACKAGED = "default"  # --model default: the trained model shipped in localglm/data/default_model
DEFAULT_DRAFT = 3  # --draft: localglm.speculative.DEFAULT_DRAFT (not imported: this orchestrator stays torch-free)


def prompt_ids(n: int, vocab: int) -> list[int]:
    """Fixed pseudo-random prompt ids below the special tokens (same for every engine)."""
    import random

    rng = random.Random(1234)
    return [rng.randrange(0, vocab - 64) for _ in range(n)]


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- workers (one engine each, in a subprocess) -----------------------------------------------
def cpu_speeds(prompt: int, prompt_cpu_s: float, decoded: int, decode_cpu_s: float) -> dict:
    """Tokens per second of this process's CPU time (all its threads): on a machine other jobs share, wall
    time counts their turns too, CPU time far less (what they do to the caches remains)."""
    return dict(prompt_cpu_tok_s=prompt / max(prompt_cpu_s, 1e-9), decode_cpu_tok_s=decoded / max(decode_cpu_s, 1e-9))


def run_localglm(model: Path, ids: list[int], new: int, threads: int, draft: int | None = None) -> dict:
    """localglm without speculation; with `draft` (the `localglm+mtp` engine), speculative decoding with
    the checkpoint's MTP layer drafting up to that many tokens a step, depth chosen per step (as --mtp does)."""
    import torch

    import localglm

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    m = localglm.load(model, mtp=draft is not None)
    load_s = time.perf_counter() - t0
    if draft is not None:
        if m.speculation is None:
            raise SystemExit(f"{model}: no MTP layer to draft with")
        m.speculation.set_draft(draft)
    stats = localglm.GenerationStats()
    out: list[int] = []
    c0 = first = time.process_time()
    for tok in m.stream_tokens(ids, max_new_tokens=new, sampling=localglm.SamplingParams(temperature=0), stats=stats):
        first = first if out else time.process_time()
        out.append(tok)
    res = dict(load_s=load_s, prompt_tok_s=stats.prompt_tok_s, decode_tok_s=stats.decode_tok_s, ttft_s=stats.ttft_s, tokens=out,
               **cpu_speeds(len(ids), first - c0, len(out) - 1, time.process_time() - first))  # fmt: skip
    if draft is not None:
        res.update(acceptance_length=stats.acceptance_length, draft_depths=stats.draft_depths)
    return res


def run_transformers(model: Path, ids: list[int], new: int, threads: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    m = transformers.Glm4MoeForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    out: list[int] = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        res = m(torch.tensor([ids]), use_cache=True)
        tok = int(res.logits[0, -1].argmax())
        ttft = time.perf_counter() - t0
        out.append(tok)
        past = res.past_key_values
        t1 = time.perf_counter()
        for _ in range(new - 1):
            res = m(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = res.past_key_values
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
        decode_s = time.perf_counter() - t1
    return dict(load_s=load_s, prompt_tok_s=len(ids) / ttft, decode_tok_s=(new - 1) / decode_s, ttft_s=ttft, tokens=out)


def _llama_last_logits(llm: object) -> object:
    """The last evaluated position's logits (llama-cpp-python keeps `scores` only with logits_all)."""
    import llama_cpp
    import numpy as np

    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def run_llama_cpp(gguf: Path, ids: list[int], new: int, threads: int) -> dict:
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(ids) + new + 8, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    out: list[int] = []
    t0, c0 = time.perf_counter(), time.process_time()
    llm.eval(ids)
    tok = int(_llama_last_logits(llm).argmax())
    ttft, c1 = time.perf_counter() - t0, time.process_time()
    out.append(tok)
    t1 = time.perf_counter()
    for _ in range(new - 1):
        llm.eval([tok])
        tok = int(_llama_last_logits(llm).argmax())
        out.append(tok)
    decode_s = time.perf_counter() - t1
    return dict(load_s=load_s, prompt_tok_s=len(ids) / ttft, decode_tok_s=(new - 1) / decode_s, ttft_s=ttft, tokens=out,
                **cpu_speeds(len(ids), c1 - c0, new - 1, time.process_time() - c1))  # fmt: skip


WORKERS = {"localglm": run_localglm, "transformers": run_transformers, "llama.cpp": run_llama_cpp}
MTP_ENGINE = "localglm+mtp"  # localglm with speculative decoding by the MTP layer (--mtp; depth up to --draft)


# ---- driver -------------------------------------------------------------------------------------
def ensure_model(path: Path) -> Path:
    if str(path) == PACKAGED:
        from localglm.default_model import default_model_path

        return default_model_path()
    if (path / "config.json").is_file():
        return path
    if path.name not in BENCH_MODELS:
        raise SystemExit(f"{path}: no config.json, and not one of the benchmark models made on demand ({', '.join(BENCH_MODELS)})")
    from localglm.models import ARCHITECTURES
    from localglm.tiny import make_tiny

    model_type, spec = BENCH_MODELS[path.name]
    print(f"writing the benchmark model to {path} ...", file=sys.stderr)
    return make_tiny(path, ARCHITECTURES[model_type].tiny.spec(**spec))


def is_fresh(made: Path, model: Path) -> bool:
    """Whether `made` (a file or directory derived from `model`) exists and is newer than the model's weights.

    Derived files are cached by name; a model rewritten in place (the packaged default model is retrained
    from time to time) must not be benchmarked through a GGUF or quantization of its old weights."""
    if not made.exists():
        return False
    sources = [p for p in model.iterdir() if p.suffix == ".safetensors" or p.name == "config.json"] if model.is_dir() else [model]
    return made.stat().st_mtime >= max(p.stat().st_mtime for p in sources)


def code_stamp(*parts: str | Path) -> str:
    """A hash of strings (flags) and of files' contents (the code that makes a derived file)."""
    import hashlib

    h = hashlib.sha1()
    for part in parts:
        h.update(part.read_bytes() if isinstance(part, Path) and part.is_file() else str(part).encode())
    return h.hexdigest()


def is_current(made: Path, model: Path, stamp: str) -> bool:
    """`made` is newer than `model` and was made by the code `stamp` describes (saved beside it as NAME.stamp):
    the exporter and the quantizer change under active development, and a cache must not outlive them."""
    stamp_file = made.with_name(made.name + ".stamp")
    return is_fresh(made, model) and stamp_file.is_file() and stamp_file.read_text() == stamp


def write_stamp(made: Path, stamp: str) -> None:
    made.with_name(made.name + ".stamp").write_text(stamp)


def llama_converter() -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py, when LOCALGLM_LLAMA_CONVERTER (or --llama-converter) names it."""
    path = os.environ.get("LOCALGLM_LLAMA_CONVERTER")
    return Path(path).expanduser() if path else None


# Runs llama.cpp's converter on a benchmark checkpoint. Its tokenizer check identifies a pre-tokenizer by
# hashing a known text's token ids; a random checkpoint's small BPE has GLM's split regex but not GLM's vocabulary,
# so the check is answered "glm4", the name it gives GLM's real tokenizers. Everything else is the converter's own.
_CONVERT = (
    "import runpy, sys; conv = sys.argv[1]; root = conv.rsplit('/', 1)[0]; sys.path[:0] = [root, root + '/gguf-py']; "
    "import conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, tok: 'glm4'; "
    "sys.argv = sys.argv[1:]; runpy.run_path(conv, run_name='__main__')"
)


def ensure_gguf(model: Path, kind: str = "bf16") -> Path | None:
    """The model as a GGUF of `kind` for llama.cpp: llama.cpp's converter's output when it is configured
    (llama_converter), else localglm's export (written to match it); cached beside the model."""
    from localglm.default_model import DEFAULT_MODEL_DIR

    # Never write next to the packaged model (inside the installed package): use the bench cache.
    folder = DEFAULT_DIR.parent if model.resolve() == DEFAULT_MODEL_DIR.resolve() else model.parent
    folder.mkdir(parents=True, exist_ok=True)
    converter = llama_converter()
    gguf = folder / f"{model.name}-{kind}{'-conv' if converter else ''}.gguf"
    pkg = DEFAULT_MODEL_DIR.parents[1]  # the localglm package
    stamp = code_stamp(kind, converter or "", pkg / "checkpoint" / "gguf.py", pkg / "commands" / "export_gguf.py")
    if is_current(gguf, model, stamp):
        return gguf
    if converter:
        cmd = [sys.executable, "-c", _CONVERT, str(converter), str(model), "--outfile", str(gguf), "--outtype", kind]
    else:
        cmd = [sys.executable, "-m", "localglm", "export-gguf", str(model), str(gguf), "--type", kind, "-q", "--overwrite"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"llama.cpp skipped: making its GGUF failed: {r.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    write_stamp(gguf, stamp)
    return gguf


def add_converter_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--llama-converter", type=Path, default=None, metavar="PATH",
                    help="llama.cpp's convert_hf_to_gguf.py: llama.cpp's GGUFs are made by it (default: localglm export-gguf)")  # fmt: skip


def use_converter(args: argparse.Namespace) -> None:
    if args.llama_converter is not None:
        os.environ["LOCALGLM_LLAMA_CONVERTER"] = str(args.llama_converter)


MODULES = {"localglm": "localglm", MTP_ENGINE: "localglm", "transformers": "transformers", "llama.cpp": "llama_cpp"}


def available(engine: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {MODULES[engine]}"], capture_output=True).returncode == 0


def crash_reason(returncode: int) -> str:
    """' (killed by SIGILL ...)' for a worker a signal ended, else ''. A llama.cpp built with GGML_NATIVE
    on a CPU whose AMX it cannot use dies of SIGILL with nothing on stderr (README: installing the peer)."""
    if returncode >= 0:
        return ""
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        return f" (killed by signal {-returncode})"
    hint = ": an instruction this CPU or VM refuses; see the README's note on building llama-cpp-python" if name == "SIGILL" else ""
    return f" (killed by {name}{hint})"


def run_worker(engine: str, target: Path, prompt_tokens: int, new_tokens: int, threads: int, vocab: int, draft: int = DEFAULT_DRAFT) -> dict | None:
    """One engine on one model (a directory, or a GGUF for llama.cpp) in a fresh subprocess: its result dict."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--target", str(target), "--prompt-tokens",
           str(prompt_tokens), "--new-tokens", str(new_tokens), "--threads", str(threads), "--vocab", str(vocab), "--draft", str(draft)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"{engine} failed{crash_reason(r.returncode)}:\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


SPEED_KEYS = ("load_s", "prompt_tok_s", "decode_tok_s", "ttft_s", "peak_rss_bytes", "prompt_cpu_tok_s", "decode_cpu_tok_s")


def median_result(runs: list[dict]) -> dict:
    """Several runs of one worker: the median of each figure, the first run's tokens, the decode tok/s range."""
    import statistics

    res = dict(runs[0])
    for k in SPEED_KEYS:
        if all(k in r for r in runs):  # the CPU-time figures: localglm and llama.cpp workers only
            res[k] = statistics.median(r[k] for r in runs)
    res["runs"] = len(runs)
    res["decode_range"] = (min(r["decode_tok_s"] for r in runs), max(r["decode_tok_s"] for r in runs))
    return res


def run_workers(jobs: list[tuple[str, str, Path]], prompt_tokens: int, new_tokens: int, threads: int, vocab: int,
                repeat: int = 1, draft: int = DEFAULT_DRAFT) -> dict[str, dict | None]:  # fmt: skip
    """(key, engine, target) jobs, each run `repeat` times round-robin (a load that drifts during the run hits
    every job alike): key -> median result, or None if every run of it failed."""
    runs: dict[str, list[dict]] = {key: [] for key, _, _ in jobs}
    for _ in range(max(1, repeat)):
        for key, engine, target in jobs:
            res = run_worker(engine, target, prompt_tokens, new_tokens, threads, vocab, draft)
            if res:
                runs[key].append(res)
    return {key: median_result(r) if r else None for key, r in runs.items()}


def fill_speed(row: dict, res: dict | None) -> bool:
    """Copy one worker's median figures (run_workers) into a results row; False where it has none."""
    if not res:
        return False
    row.update(prefill=res["prompt_tok_s"], decode=res["decode_tok_s"], ttft=res["ttft_s"], rss=res["peak_rss_bytes"],
               load_s=res["load_s"], runs=res["runs"], decode_range=res["decode_range"])  # fmt: skip
    return True


def measure_model(model: Path, engines: list[str], threads: int, prompt_tokens: int, new_tokens: int,
                  repeat: int = 1, draft: int = DEFAULT_DRAFT) -> list[tuple[str, dict | str]]:  # fmt: skip
    """Every engine on one model: (engine, result dict) or (engine, why there is none: "not installed", ...)."""
    config = json.loads((model / "config.json").read_text())
    vocab, longest = config["vocab_size"], config.get("max_position_embeddings")
    if longest and prompt_tokens + new_tokens > longest:  # localglm refuses it; llama.cpp would run past its training
        raise SystemExit(f"{model}: --prompt-tokens + --new-tokens is {prompt_tokens + new_tokens}, above the model's max_position_embeddings {longest}")
    status: dict[str, str] = {}
    jobs = []
    for engine in engines:
        if not available(engine):
            print(f"{engine}: not installed, skipped", file=sys.stderr)
            status[engine] = "not installed"
            continue
        target = ensure_gguf(model) if engine == "llama.cpp" else model
        if target is None:
            status[engine] = "GGUF export failed"
            continue
        jobs.append((engine, engine, target))
    res = run_workers(jobs, prompt_tokens, new_tokens, threads, vocab, repeat, draft)
    return [(e, status[e] if e in status else (res[e] or "failed")) for e in engines]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", default=None,
                    help=f"HF-layout model dir, or '{PACKAGED}' for the packaged default model; repeatable "
                         f"(default: {DEFAULT_DIR}, made if missing, then '{PACKAGED}')")  # fmt: skip
    ap.add_argument("--engines", default="localglm,transformers,llama.cpp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="runs per engine, interleaved; the table shows medians")
    ap.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=False,
                    help=f"also run localglm with speculative decoding by the model's MTP layer (engine '{MTP_ENGINE}')")
    ap.add_argument("--draft", type=int, default=DEFAULT_DRAFT, help="with --mtp: the most tokens drafted a step (default: %(default)s)")
    add_converter_option(ap)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--target", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=4096, help=argparse.SUPPRESS)
    args = ap.parse_args()
    use_converter(args)

    if args.worker:
        ids = prompt_ids(args.prompt_tokens, args.vocab)
        if args.worker == MTP_ENGINE:
            res = run_localglm(args.target, ids, args.new_tokens, args.threads, draft=args.draft)
        else:
            res = WORKERS[args.worker](args.target, ids, args.new_tokens, args.threads)
        res["peak_rss_bytes"] = peak_rss()
        print(json.dumps(res))
        return 0

    for model in args.model or [DEFAULT_DIR, Path(PACKAGED)]:
        bench_model(ensure_model(model), args)
    return 0


def bench_model(model: Path, args: argparse.Namespace) -> None:
    """Run every engine on one model and print its table."""
    engines = args.engines.split(",")
    if args.mtp and MTP_ENGINE not in engines:
        engines.insert(engines.index("localglm") + 1 if "localglm" in engines else 0, MTP_ENGINE)
    measured = measure_model(model, engines, args.threads, args.prompt_tokens, args.new_tokens, args.repeat, args.draft)
    rows = [(e, r) for e, r in measured if isinstance(r, dict)]
    base = dict(rows).get("localglm")
    print(f"\n{date.today()}  {platform.processor() or platform.machine()}  threads={args.threads}  "
          f"prompt={args.prompt_tokens}  new={args.new_tokens}  model={model.name}\n")  # fmt: skip
    print("| engine | prefill tok/s | decode tok/s | TTFT s | peak RSS GiB | load s | same greedy tokens as localglm |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for engine, r in rows:
        same = "-" if base is None or engine == "localglm" else same_tokens(r, base)
        if "acceptance_length" in r:
            engine = f"{engine} (acceptance {r['acceptance_length']:.2f}, depths {r['draft_depths']})"
        print(f"| {engine} | {r['prompt_tok_s']:.1f} | {r['decode_tok_s']:.2f} | {r['ttft_s']:.3f} | "
              f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['load_s']:.1f} | {same} |")  # fmt: skip


def same_tokens(r: dict, base: dict) -> str:
    return f"{sum(a == b for a, b in zip(r['tokens'], base['tokens']))}/{len(base['tokens'])}"


if __name__ == "__main__":
    sys.exit(main())
