"""The GPU half in one command: CUDA tests, exactness, the 24 GiB budget, a GLM-4.5-Air-shaped benchmark.

On a lent GPU machine (no internet; its python3 has torch, transformers, safetensors, tokenizers,
numpy, jinja2, psutil but not gguf or pytest), from the repository root:

    bash benchmarks/gpu_wheels.sh          # here, once: gguf + pytest wheels unpacked into .wheels/site
    # then on the device (the device tool: carry=[".wheels"], timeout_s=590; the time boxes sum to 540 s):
    python3 benchmarks/gpu_check.py --out $OUT

Nothing needs installing there: this script puts the repository and .wheels/site on sys.path (and on
PYTHONPATH for its child processes). The same with an install, if the device's pip is preferred:
`pip install --no-index --find-links .wheels --no-deps --no-build-isolation -e . && python3 benchmarks/gpu_check.py --out $OUT`.

Parts (each in its own child process with a time box, so a crash, a hang or an out-of-memory in one
is recorded and the others still run; each writes its results as it goes):
  env         torch / CUDA / GPU, the native CPU kernels, which optional packages import
  cuda_tests  the `cuda`-marked pytest subset (tests/test_quant.py, tests/test_gpu_check.py): pass count
  exactness   greedy tokens of `--offload cuda` against the CPU's, on the default model, a random
              GLM-4.7-Flash (glm4_moe_lite) and a random GLM-5 (glm_moe_dsa), at q2 / q4 / q8 experts,
              both miss paths (copy every miss to the GPU; the cost model's CPU-for-cold-experts), and
              bit-exactness of the offloaded experts against the same experts resident on the GPU;
              VRAM capped at 24 GiB (torch.cuda.set_per_process_memory_fraction + the planner's budget)
  air_bench   GLM-4.5-Air's shape (46 layers, 128 experts top-8, hidden 4096, moe_inter 1408) with random
              4-bit experts written straight into the packed blob format in pinned RAM (no bf16 pass):
              prefill tok/s (512 tokens), decode tok/s, hit rate, bytes/token, measured H2D GB/s and
              the decode bound those imply; LRU vs stat + prefetch; GPU-only vs CPU-for-cold-experts
              vs every routed expert on the CPU (attention on the GPU: llama.cpp's -ot exps=CPU split)
  mtp         speculative decoding with the default model's MTP block on the device (issue 16): greedy tokens at
              depths 1-3 equal to plain decoding's; decode tok/s plain, at depths 1-3 and adaptive, greedy and
              at t=0.7, with the experts resident and offloaded (a quarter cached; MiB moved per token)
  bnb         bitsandbytes NF4 / int8 against our q4 / q8 (logit KL on the default model, matvec speed),
              when the wheel is importable; recorded as skipped otherwise (and in the rehearsal unless
              --bnb-on-cpu: minutes on a CPU)
Results: DIR/gpu_check.json (everything) and DIR/gpu_check.md (tables for BENCHMARKS.md).

`--rehearse` runs the same parts and code paths on the CPU: the simulated offload device
(`offload="sim"`) instead of CUDA, small shapes (a few layers, a few experts), in under a minute.
tests/test_gpu_check.py runs it in CI; the day a GPU is lent, only the device changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WHEELS_SITE = ROOT / ".wheels" / "site"
for _p in (WHEELS_SITE, ROOT):  # the checkout itself and the carried pure-Python wheels: no install needed
    if _p.is_dir() and str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

GiB = 1 << 30
VRAM_CAP = 24 * GiB  # the product's card
GPU_MEM = VRAM_CAP - (512 << 20)  # the planner's budget inside the cap: what a 24 GiB card leaves after its context
PARTS = ("env", "cuda_tests", "exactness", "air_bench", "mtp", "bnb")
# Seconds per part: on the GPU they sum to 9 minutes (the device runs a command for at most 10);
# the rehearsal's are generous for a busy CI machine (it takes ~45 s on an idle 2-core one, 80-100 s at load 8).
TIME_BOX = {"env": 30, "cuda_tests": 90, "exactness": 150, "air_bench": 190, "mtp": 50, "bnb": 30}
REHEARSAL_BOX = {"env": 30, "cuda_tests": 45, "exactness": 120, "air_bench": 60, "mtp": 120, "bnb": 300}  # hang guards: ~45 s in all when idle
CUDA_TEST_FILES = ("tests/test_quant.py", "tests/test_gpu_check.py")
EXPERT_BITS = (2, 4, 8)
AIR = "GLM-4.5-Air"
# GLM-4.5-Air with its widths cut down, for the rehearsal (the same code runs, the same report is written)
REHEARSAL_AIR = {
    "num_hidden_layers": 4, "n_routed_experts": 16, "num_experts_per_tok": 4, "hidden_size": 256,
    "moe_intermediate_size": 128, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 64, "vocab_size": 2048, "pad_token_id": 0, "eos_token_id": [1],
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the check runs: the only thing `--rehearse` changes (besides the sizes)."""

    rehearse: bool
    bnb_on_cpu: bool = False  # the rehearsal's bitsandbytes comparison takes minutes on a CPU: only when asked
    profile: bool = False  # air_bench: cProfile each configuration's decode loop (the top functions go in the JSON)

    @property
    def device(self) -> str:  # where a model without offload runs, and where offloaded models keep their dense weights
        return "cpu" if self.rehearse else "cuda"

    @property
    def offload(self) -> str:
        return "sim" if self.rehearse else "cuda"

    @property
    def new_tokens(self) -> int:  # greedy tokens compared per exactness run
        return 5 if self.rehearse else 16

    def expert_bits(self, model_index: int) -> tuple[int, ...]:
        """Every format on every model; the rehearsal all three on the default model, q4 on the others."""
        return EXPERT_BITS if not self.rehearse or model_index == 0 else (4,)

    @property
    def prefill_tokens(self) -> int:
        return 64 if self.rehearse else 512

    @property
    def decode_tokens(self) -> int:
        return 6 if self.rehearse else 24

    def box(self, part: str) -> int:
        return (REHEARSAL_BOX if self.rehearse else TIME_BOX)[part]


# ---- results, written as they come --------------------------------------------------------------
class PartResult:
    """One part's results, rewritten to DIR/parts/PART.json after every update, so a part killed by its
    time box still leaves what it had measured."""

    def __init__(self, out: Path, part: str) -> None:
        self.path = out / "parts" / f"{part}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {"part": part, "status": "running", "started": time.time()}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_jsonable))
        tmp.replace(self.path)

    def set(self, **kw: Any) -> None:
        self.data.update(kw)
        self.save()

    def append(self, key: str, item: Any) -> None:
        self.data.setdefault(key, []).append(item)
        self.save()

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """A named sub-step: its failure is recorded under `errors` and the part goes on."""
        rec: dict[str, Any] = {"step": name}
        t0 = time.perf_counter()
        try:
            yield rec
            rec.setdefault("status", "ok")
        except Exception as exc:  # one failure must not lose the other measurements
            rec.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=8)[-3000:])
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        self.append("steps", rec)


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


# ---- helpers --------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _cap_vram(t: Target) -> dict[str, Any]:
    """Cap this process's CUDA allocator at 24 GiB (the product's card) and reset the peak counter."""
    if t.rehearse:
        return {"cap_bytes": None, "note": "simulated device: the planner's budget is the cap"}
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, VRAM_CAP / total), 0)
    torch.cuda.reset_peak_memory_stats()
    return {"cap_bytes": VRAM_CAP, "gpu_total_bytes": total}


def _vram_peak(t: Target) -> dict[str, Any]:
    if t.rehearse:
        return {}
    import torch

    peak = torch.cuda.max_memory_allocated()
    return {"peak_allocated": peak, "peak_reserved": torch.cuda.max_memory_reserved(), "under_cap": peak <= VRAM_CAP}


def _budget(model_or_backend: Any) -> dict[str, Any]:
    """The offload device's own accounting (the planner's budget): peak charged against capacity."""
    backend = getattr(getattr(model_or_backend, "net", None), "experts", model_or_backend)
    dev = getattr(backend, "device", None)
    if dev is None or not hasattr(dev, "budget"):
        return {}
    b = dev.budget
    return {"budget_capacity": b.capacity, "budget_peak": b.peak, "budget_ok": b.peak <= b.capacity}


def _free(*objs: Any) -> None:
    import gc

    import torch

    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- part: env ------------------------------------------------------------------------------------
OPTIONAL = ("gguf", "textual", "starlette", "uvicorn", "bitsandbytes", "pytest", "transformers", "accelerate")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def part_env(t: Target, res: PartResult) -> None:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "importable": {m: _importable(m) for m in OPTIONAL},
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_total_bytes=p.total_memory, capability=list(torch.cuda.get_device_capability(0)))
    before = set(sys.modules)
    import localglm  # noqa: F401  -- what the check's own imports pull in
    import offload.backend  # noqa: F401
    from quant.native import native_status

    pulled = set(sys.modules) - before
    info["localglm_imports_optional"] = sorted(m for m in OPTIONAL if m in pulled or any(p.startswith(m + ".") for p in pulled))
    info["native_kernels"] = native_status()
    res.set(**info)
    if not t.rehearse and not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU visible: run with --rehearse on a machine without one")


# ---- part: cuda_tests -----------------------------------------------------------------------------
def part_cuda_tests(t: Target, res: PartResult) -> None:
    """The `cuda`-marked tests, in a pytest child (its own time box); the counts from its JUnit XML."""
    import xml.etree.ElementTree as ET

    if not _importable("pytest"):
        res.set(status="skipped", reason="pytest is not importable (run benchmarks/gpu_wheels.sh and carry .wheels)")
        return
    xml = res.path.with_name("cuda_tests.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}", *CUDA_TEST_FILES]
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONPATH=_child_pythonpath())
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=t.box("cuda_tests") - 5)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    res.set(returncode=proc.returncode, passed=passed, **counts, output_tail=(proc.stdout + proc.stderr)[-4000:])
    if counts["failures"] or counts["errors"]:
        raise RuntimeError(f"{counts['failures']} failed, {counts['errors']} errors of {counts['tests']} cuda tests")


# ---- part: exactness ------------------------------------------------------------------------------
def _exactness_models(tmp: Path) -> list[tuple[str, Path]]:
    from localglm.default_model import default_model_path
    from localglm.models.glm4_moe_lite.tiny import TinySpec as FlashSpec
    from localglm.models.glm_moe_dsa.tiny import TinySpec as DsaSpec
    from localglm.tiny import make_tiny

    return [
        ("default (glm4_moe, trained)", default_model_path()),
        ("random GLM-4.7-Flash (glm4_moe_lite)", make_tiny(tmp / "flash", FlashSpec(seed=7))),
        ("random GLM-5 (glm_moe_dsa)", make_tiny(tmp / "dsa", DsaSpec(num_hidden_layers=4, indexer_pattern="FSFS", seed=5))),
    ]


def _greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    from localglm.sampling import SamplingParams

    return list(model.stream_tokens(prompt, max_new_tokens=n, sampling=SamplingParams(temperature=0.0)))


def _compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """Tokens equal? Where not: the first differing step and the reference's top-1 - top-2 logit margin
    there (a near-tie flips on rounding alone). Logit difference over the reference's sequence."""
    a, b = ref["tokens"], got["tokens"]
    out: dict[str, Any] = {"tokens_equal": a == b}
    upto = None  # logits compared where both runs saw the same tokens: up to and including the first divergence
    if a != b:
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) if any(x != y for x, y in zip(a, b)) else min(len(a), len(b))
        out.update(first_divergence=i, ref_margin_there=ref["margins"][i] if i < len(ref["margins"]) else None)
        upto = i + 1
    d = (got["logits"][:upto] - ref["logits"][:upto]).abs()
    out.update(max_abs_logit_diff=float(d.max()), bit_exact=bool(d.max() == 0))
    return out


ORACLE_ENV = {"LOCALGLM_NATIVE": "0", "LOCALGLM_CPU_KERNEL": "dense"}  # quant/cpu_kernels.py: every weight dequantized, fp32 math


def _oracle_run(path: Path, prompt: list[int], n: int, out: Path) -> dict[str, Any]:
    """The same greedy run on the CPU with every quantized weight dequantized to float32 (no int8
    activations, no bf16 tiles): the exact math of the stored weights, in a child process because the
    native kernels are chosen once per process."""
    import torch

    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import gpu_check as g; "
        "r = g._run_model(g.Path(sys.argv[2]), [int(v) for v in sys.argv[4].split(',')], int(sys.argv[3]), device='cpu'); "
        "torch.save({k: r[k] for k in ('tokens', 'logits', 'margins')}, sys.argv[5])"
    )
    env = dict(os.environ, **ORACLE_ENV, PYTHONPATH=_child_pythonpath())
    proc = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(path), str(n), ",".join(map(str, prompt)), str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"oracle run failed: {(proc.stderr or proc.stdout)[-600:]}")
    return torch.load(out)


def _run_model(path: Path, prompt: list[int], n: int, **load_kw: Any) -> dict[str, Any]:
    """Load, greedy-decode n tokens, then the logits over prompt + tokens (teacher-forced, one forward)."""
    import torch

    import localglm

    model = localglm.load(path, dtype="float32", ctx=256, **load_kw)
    toks = _greedy(model, prompt, n)
    logits = model.logits(torch.tensor([prompt + toks]))[0, len(prompt) - 1 :].float().cpu()
    top2 = logits.topk(2, dim=-1).values
    out = {"tokens": toks, "logits": logits, "margins": (top2[:, 0] - top2[:, 1]).tolist(), **_budget(model)}
    backend = model.net.experts
    if hasattr(backend, "stats_snapshot") and hasattr(backend, "cache"):
        snap = backend.stats_snapshot()
        out["offload"] = {k: snap[k] for k in ("hit_rate", "copied", "cpu_computed", "bytes_moved", "prefetched", "cache_slots", "experts_total")}
    _free(model)
    return out


def part_exactness(t: Target, res: PartResult) -> None:
    cap = _cap_vram(t)
    res.set(vram=cap, device=t.device, offload=t.offload)
    gpu_mem = GPU_MEM if not t.rehearse else 256 << 20
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmpdir:
        tmp = Path(tmpdir)
        for mi, (name, path) in enumerate(_exactness_models(tmp)):
            from localglm.config import ModelConfig

            cfg = ModelConfig.from_file(path)
            n_total = cfg.num_moe_layers * cfg.n_routed_experts
            # A quarter of the experts (misses on every path), but never fewer than one layer's experts + top-k:
            # a prefill can pin all of a layer's, and a miss with every slot pinned runs on the CPU even with miss=copy.
            slots = max(cfg.n_routed_experts + cfg.num_experts_per_tok, n_total // 4)
            prompt = [(i * 37 + 11) % (cfg.vocab_size - 64) + 32 for i in range(12)]
            for bits in t.expert_bits(mi):
                with res.step(f"{name} q{bits}") as rec:
                    rec.update(model=name, bits=bits, cache_slots=slots, experts_total=n_total)
                    qdir = tmp / f"m{mi}-q{bits}"  # quantized once by the first load, then loaded as stored by the others
                    cpu = _run_model(path, prompt, t.new_tokens, device="cpu", experts_bits=bits, save_quantized=qdir)
                    rec["tokens_cpu"] = cpu["tokens"]
                    oracle = _oracle_run(qdir, prompt, t.new_tokens, tmp / f"oracle-{mi}-{bits}.pt")
                    rec["cpu_vs_oracle"] = _compare(oracle, cpu)  # the CPU kernels' own rounding (int8 activations)
                    gpu = cpu if t.rehearse else _run_model(qdir, prompt, t.new_tokens, device="cuda")
                    if not t.rehearse:
                        rec["gpu_vs_cpu"] = _compare(cpu, gpu)
                        rec["gpu_vs_oracle"] = _compare(oracle, gpu)
                    for miss in ("copy", "cost"):
                        off = _run_model(
                            qdir, prompt, t.new_tokens, device=t.device, offload=t.offload, gpu_mem=gpu_mem,
                            cache_slots=slots, miss=miss, stats_path=tmp / f"stats-{bits}-{miss}.json",
                        )  # fmt: skip
                        rec[f"offload_{miss}_vs_cpu"] = _compare(cpu, off)
                        # The same experts resident on the device: the offload machinery (copies, events, slots) must
                        # change nothing. Exact where every expert runs on the device (miss=copy, or anything on sim).
                        if miss == "copy" or t.rehearse:
                            rec[f"offload_{miss}_vs_resident"] = _compare(gpu, off)
                        rec[f"offload_{miss}"] = off.get("offload", {}) | {k: off[k] for k in off if k.startswith("budget")}
                    rec.update(_vram_peak(t))
                    if not rec["offload_copy_vs_resident"]["bit_exact"]:
                        raise AssertionError("offloaded experts (miss=copy) differ from the same experts resident on the device")
    steps = res.data.get("steps", [])
    res.set(
        runs=len(steps),
        tokens_equal_cpu=sum(all(s.get(k, {}).get("tokens_equal", False) for k in ("offload_copy_vs_cpu", "offload_cost_vs_cpu")) for s in steps),
        offload_bit_exact=sum(s.get("offload_copy_vs_resident", {}).get("bit_exact", False) for s in steps),
        gpu_equal_oracle=sum(s.get("gpu_vs_oracle", {}).get("tokens_equal", False) for s in steps) if not t.rehearse else None,
        **_vram_peak(t),
    )


# ---- part: mtp ------------------------------------------------------------------------------------
MTP_SETTINGS = (("greedy", (0, 1, 2, 3, "auto")), ("t=0.7", (0, 2, "auto")))  # sampling, drafts (0: plain; auto: the adaptive depth <= 3)


def part_mtp(t: Target, res: PartResult) -> None:
    """Speculative decoding with the default model's MTP block (issue 16) on the device, where a token's time is
    mostly launches and dispatch rather than arithmetic (the CPU's case is the opposite), so a few-token
    forward may cost little more than one (the routed experts' dispatch grows with their count): greedy
    tokens at every fixed depth must equal plain decoding's; decode tok/s plain, at depths 1-3 and adaptive,
    greedy and at t=0.7; then the same with the routed experts offloaded (a quarter cached), with the bytes
    moved per generated token."""
    import localglm
    from bench_mtp import CHAT_PROMPTS, run
    from localglm.config import ModelConfig
    from localglm.default_model import default_model_path
    from localglm.sampling import SamplingParams

    cap = _cap_vram(t)
    n_prompts, new, rounds = (2, 8, 1) if t.rehearse else (4, 48, 2)
    res.set(vram=cap, device=t.device, offload=t.offload, prompts=n_prompts, new_tokens=new, rounds=rounds)
    path = default_model_path()
    cfg = ModelConfig.from_file(path)
    slots = max(cfg.n_routed_experts + cfg.num_experts_per_tok, cfg.num_moe_layers * cfg.n_routed_experts // 4)
    offload = {"offload": t.offload, "gpu_mem": GPU_MEM if not t.rehearse else 256 << 20, "cache_slots": slots}
    samplings = {"greedy": SamplingParams(temperature=0.0), "t=0.7": SamplingParams(temperature=0.7)}
    for setup, kw in (("resident", {}), ("offloaded, a quarter cached", offload)):
        with res.step(setup) as rec:
            model = localglm.load(path, device=t.device, ctx=1024, **kw)
            spec = model.speculation
            if spec is None:
                raise RuntimeError("the default model's MTP block did not load")
            prompts = [model.encode_chat([{"role": "user", "content": text}]).ids for text in CHAT_PROMPTS[:n_prompts]]
            backend = model.net.experts
            moved = (lambda: backend.stats_snapshot()["bytes_moved"]) if hasattr(backend, "stats_snapshot") else (lambda: 0)

            def greedy_tokens(draft: int) -> list[list[int]]:
                spec.set_draft(draft, adaptive=False)
                return [list(model.stream_tokens(p, max_new_tokens=new, sampling=samplings["greedy"], reuse_prefix=False)) for p in prompts]

            plain = greedy_tokens(0)
            rec["greedy_equal_plain"] = {str(d): greedy_tokens(d) == plain for d in (1, 2, 3)}
            rows = []
            for name, drafts in MTP_SETTINGS:
                for draft in drafts:
                    best, before = None, moved()
                    for _ in range(rounds):  # the fastest round: another process only ever slows one
                        tok_s, st, _cpu = run(model, prompts, new, 3 if draft == "auto" else int(draft), draft == "auto", samplings[name])
                        best = tok_s if best is None else max(best, tok_s)
                    rows.append({
                        "sampling": name, "draft": str(draft), "decode_tok_s": best, "tokens_per_step": st.acceptance_length if draft else 1.0,
                        "depths": {str(d): n for d, n in sorted(st.draft_depths.items())},
                        "mib_moved_per_token": (moved() - before) / rounds / max(st.decode_tokens, 1) / (1 << 20),
                    })  # fmt: skip
                    rec["rows"] = rows
                    res.save()
            for row in rows:
                plain_speed = next(r["decode_tok_s"] for r in rows if r["sampling"] == row["sampling"] and r["draft"] == "0")
                row["vs_plain"] = row["decode_tok_s"] / plain_speed if plain_speed else None
            rec["best_greedy_vs_plain"] = max(r["vs_plain"] or 0 for r in rows if r["sampling"] == "greedy" and r["draft"] != "0")
            rec.update(_vram_peak(t))
            _free(model)
            if not all(rec["greedy_equal_plain"].values()):
                raise AssertionError(f"greedy speculation changed the tokens: {rec['greedy_equal_plain']}")


# ---- part: air_bench ------------------------------------------------------------------------------
def air_config(t: Target) -> Any:
    from localglm.config import ModelConfig

    raw = json.loads((ROOT / "tests" / "data" / "real_configs.json").read_text())[AIR]
    raw = dict(raw, num_nextn_predict_layers=0)
    if t.rehearse:
        raw.update(REHEARSAL_AIR)
    return ModelConfig.from_dict(raw, f"{AIR} shape")


class RandomWeights:
    """The always-used weights, random, made on the device as they are read (fan-in scaled; norms 1, biases 0)."""

    def __init__(self, device: str, dtype: Any, seed: int = 0) -> None:
        import torch

        self.device, self.dtype = torch.device(device), dtype
        self.g = torch.Generator(device=self.device).manual_seed(seed)

    def get(self, name: str, shape: tuple[int, ...], dtype: Any = None) -> Any:
        import torch

        dt = dtype or self.dtype
        if name.endswith("bias"):
            return torch.zeros(shape, dtype=dt, device=self.device)
        if len(shape) != 2:
            return torch.ones(shape, dtype=dt, device=self.device)
        std = 1.0 if "embed_tokens" in name else 1.0 / math.sqrt(shape[1])
        return torch.randn(shape, generator=self.g, dtype=torch.float32, device=self.device).mul_(std).to(dt)

    def reader(self) -> Any:
        import torch

        from localglm.models.arch import WeightReader

        return WeightReader(self.get, lambda n, s: self.get(n, s, torch.float32), lambda n: "nextn" not in n)


def random_expert_blobs(layout: Any, n_experts: int, host: Any, gen_device: str, seed: int) -> None:
    """Fill host [E, nbytes] with random experts directly in quant.blob's packed format: random code bytes,
    scale codes in the top two octaves, random int8 offsets, and row factors that give weights of about
    1/sqrt(K) (so activations stay O(1) through 46 layers). Generated on `gen_device` in chunks."""
    import torch

    from quant.formats import layout as tensor_layout

    g = torch.Generator(device=gen_device).manual_seed(seed)
    nb = layout.nbytes
    fixes = []  # (byte offset, fixed bytes [n_bytes]) per row-factor section; (offset, size) per scale-code section
    codes = []
    for off, _size, shape, spec in layout.parts.values():
        sec = tensor_layout(spec, shape)
        n, k = shape
        s_max = math.sqrt(12.0) / ((1 << spec.bits) * math.sqrt(k))  # codes uniform on 2^b levels: std 2^b / sqrt(12)
        rowf = torch.tensor([s_max, (1 << (spec.bits - 1)) * s_max], dtype=torch.float32).repeat(n)
        ro, rs = sec["rowf"]
        fixes.append((off + ro, rowf.view(torch.uint8).to(gen_device)))
        codes.append((off + sec["scode"][0], sec["scode"][1]))
    chunk = max(1, min(n_experts, (256 << 20) // nb))
    for e0 in range(0, n_experts, chunk):
        c = min(chunk, n_experts - e0)
        raw = torch.randint(0, 256, (c, nb), dtype=torch.uint8, device=gen_device, generator=g)
        for o, fixed in fixes:
            raw[:, o : o + fixed.numel()] = fixed
        for o, size in codes:
            raw[:, o : o + size] |= 0xE0  # scale codes 224..255: within 2 octaves of the row's largest scale
        host[e0 : e0 + c].copy_(raw)


def _tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensors (and QuantTensor buffers) reachable from a weights structure."""
    import torch

    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if obj.data_ptr() in seen:
            return 0
        seen.add(obj.data_ptr())
        return obj.numel() * obj.element_size()
    if hasattr(obj, "buf") and isinstance(getattr(obj, "buf"), torch.Tensor):
        return _tensor_bytes(obj.buf, seen)
    if dataclasses.is_dataclass(obj):
        return sum(_tensor_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x, seen) for x in obj.values())
    return 0


AIR_CONFIGS = (  # (name, cache policy, prefetch, miss path)
    ("LRU, GPU-only", "lru", False, "copy"),
    ("stat + prefetch, GPU-only", "stat", True, "copy"),
    ("stat + prefetch, CPU for cold experts", "stat", True, "cost"),
    # the llama.cpp / ktransformers split: nothing copied, so every routed expert runs on the CPU (one native
    # call per layer), attention and the shared expert on the GPU
    ("routed experts on the CPU", "stat", False, "cpu"),
)


def decode_bound(per_tok: dict[str, float], blob_bytes: int, dense_read: int, bw: Any, cost: Any) -> dict[str, float]:
    """The decode tok/s the bandwidths allow for what a token actually moved and computed: copies on the
    copy stream (H2D) overlap GPU work (dense weights + resident experts read at device bandwidth); an
    expert computed on the CPU is in the GPU's path (its result is needed before the layer goes on)."""
    t_h2d = per_tok["bytes"] / bw.h2d
    t_gpu = (dense_read + per_tok["gpu_experts"] * blob_bytes) / bw.gpu_mem
    t_cpu = per_tok["cpu_experts"] * cost.cpu_s(1)
    t = max(t_h2d, t_gpu + t_cpu)
    return {"bound_tok_s": 1.0 / t if t > 0 else 0.0, "t_h2d_s": t_h2d, "t_gpu_s": t_gpu, "t_cpu_s": t_cpu}


@contextmanager
def _profiled(on: bool, rec: dict[str, Any], top: int = 45) -> Iterator[None]:
    """With `on`: cProfile the block; its top functions by own time and by cumulative time go in rec."""
    if not on:
        yield
        return
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        for key, order in (("profile_tottime", "tottime"), ("profile_cumtime", "cumulative")):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(top)
            rec[key] = buf.getvalue().splitlines()


def part_air_bench(t: Target, res: PartResult) -> None:
    import torch

    from localglm.models import arch_of
    from offload.backend import OffloadedExperts, device_for_plan, prepared_expert_bytes, size_expert_cache
    from offload.cost_model import Bandwidths, CostModel, measure_bandwidths
    from offload.expert_cache import QuantCodec
    from offload.planner import DENSE_CLASSES, make_plan
    from offload.prefetch import predictor_for
    from offload.router_stats import RouterStats
    from quant.blob import ExpertBlobLayout
    from quant.formats import QuantSpec

    deadline = time.perf_counter() + 0.85 * t.box("air_bench")
    cfg = air_config(t)
    arch = arch_of(cfg)
    dt = torch.bfloat16
    res.set(shape={k: getattr(cfg, k) for k in ("num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "hidden_size", "moe_intermediate_size")})
    with res.step("bandwidths") as rec:
        bw = measure_bandwidths(t.device, nbytes=(256 << 20) if not t.rehearse else (16 << 20))
        rec.update(h2d_GBps=bw.h2d / 1e9, gpu_mem_GBps=bw.gpu_mem / 1e9, ram_GBps=bw.ram / 1e9, cpu_TFLOPs=bw.cpu_flops / 1e12, measured=bw.measured)
    if t.rehearse:  # the simulated device runs on assumed bandwidths: a busy CI machine's numbers would move its decisions
        bw = Bandwidths()
    res.set(bandwidths=dataclasses.asdict(bw))
    spec = QuantSpec.for_bits(4)
    lay = ExpertBlobLayout(cfg.hidden_size, cfg.moe_intermediate_size, spec, spec)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    n_keys = cfg.num_moe_layers * E
    ctx = t.prefill_tokens + t.decode_tokens + 16
    def plan_for(gpu_mem: int) -> Any:
        return make_plan(
            cfg, gpu_mem, n_keys * lay.nbytes + (8 << 30), ctx, experts=spec.bits,  # q4: the planner counts its kernel copies
            bandwidths=bw, fixed={c: 16 for c in DENSE_CLASSES}, float_bits=16,
        )  # fmt: skip

    plan = plan_for(GPU_MEM)
    if t.rehearse:  # a toy budget: the always-used part plus an eighth of the experts, so the cache misses as on the card
        fixed = sum(i.bytes for i in plan.items if i.where == "GPU" and not i.what.startswith("expert cache"))
        plan = plan_for(fixed + max(2 * k, n_keys // 8) * (plan.slot_bytes or lay.nbytes))  # a slot: blob + kernel copy
    res.set(plan_table=plan.table(), expert_bytes=lay.nbytes, experts_total=n_keys, vram=_cap_vram(t))
    # Host blobs: page-locked once (through one device kept alive for the part), shared by every configuration.
    host_dev = device_for_plan(t.offload, plan, bw)
    t0 = time.perf_counter()
    host = {}
    for i, layer in enumerate(cfg.moe_layers):
        host[layer] = host_dev.host_buffer(E * lay.nbytes).view(E, lay.nbytes)
        random_expert_blobs(lay, E, host[layer], t.device, seed=1000 + i)
    _sync(t.device)
    gen_s = time.perf_counter() - t0
    res.set(generate_experts_s=round(gen_s, 2), host_expert_bytes=n_keys * lay.nbytes, generate_under_2min=gen_s < 120)
    rw = RandomWeights(t.device, dt)
    weights = arch.model.load_weights(cfg, rw.reader())
    dense_read = _tensor_bytes(weights) - _tensor_bytes(weights.embed)  # read per decoded token (one embedding row aside)
    res.set(dense_weight_bytes=_tensor_bytes(weights), dense_read_per_token=dense_read)
    routing = arch.model.routing(cfg, weights)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(32, cfg.vocab_size, (1, t.prefill_tokens), generator=gen)
    decode_ids = torch.randint(32, cfg.vocab_size, (t.decode_tokens + 2,), generator=gen).tolist()
    for name, policy, prefetch, miss in AIR_CONFIGS:
        if time.perf_counter() > deadline:
            res.append("steps", {"step": name, "status": "skipped", "reason": "time box"})
            continue
        with res.step(name) as rec:
            device = device_for_plan(t.offload, plan, bw)
            codec = QuantCodec(lay, dt)
            slots = size_expert_cache(device, n_keys, lay.nbytes, prepared_expert_bytes(codec, device))
            stats = RouterStats(cfg.moe_layers, E, k)
            backend = OffloadedExperts(
                cfg.moe_layers, E, k, codec, host, device, slots, policy=policy, stats=stats,
                predictor=predictor_for(routing, stats), prefetch=prefetch, miss=miss,
                flops_per_token=2 * 3 * cfg.hidden_size * cfg.moe_intermediate_size,
            )  # fmt: skip
            net = arch.model.build(cfg, weights, backend, torch.device(t.device))
            rec.update(config=name, policy=policy, prefetch=prefetch, miss=miss, cache_slots=slots, cache_fraction=round(slots / n_keys, 4))
            with torch.inference_mode():
                cache = net.new_cache(ctx)
                ids = prompt.to(t.device)
                _sync(t.device)
                t0, sim0, h2d0 = time.perf_counter(), device.elapsed_s(), device.bytes_h2d
                net.lm_head(net.hidden_states(ids, cache, 0)[0, -1]).argmax().item()
                _sync(t.device)
                pf_s = time.perf_counter() - t0
                cache.tokens.extend(prompt[0].tolist())
                rec.update(prefill_tok_s=t.prefill_tokens / pf_s, prefill_h2d_GBps=(device.bytes_h2d - h2d0) / pf_s / 1e9)
                if t.rehearse:
                    rec["prefill_sim_tok_s"] = t.prefill_tokens / max(1e-12, device.elapsed_s() - sim0)
                for tok in decode_ids[:2]:  # warm-up: the first decode steps settle the cache after prefill
                    net.lm_head(net.hidden_states(torch.tensor([[tok]], device=t.device), cache, cache.length)[0, -1]).argmax().item()
                    cache.tokens.append(tok)
                backend.stats_snapshot()  # start the decode delta here
                _sync(t.device)
                t0, sim0 = time.perf_counter(), device.elapsed_s()
                with _profiled(t.profile, rec):
                    for tok in decode_ids[2:]:
                        net.lm_head(net.hidden_states(torch.tensor([[tok]], device=t.device), cache, cache.length)[0, -1]).argmax().item()
                        cache.tokens.append(tok)
                    _sync(t.device)
                dec_s = time.perf_counter() - t0
                sim_s = device.elapsed_s() - sim0
            last = backend.stats_snapshot()["last"]
            n = max(1, last["tokens"])
            per_tok = {
                "bytes": last["bytes_moved"] / n,
                "gpu_experts": (last["hits"] + last["copied"]) / n,
                "cpu_experts": last["cpu_computed"] / n,
            }
            bound = decode_bound(per_tok, lay.nbytes, dense_read, bw, CostModel(bw, lay.nbytes, backend.cost.flops))
            decode_tok_s = t.decode_tokens / dec_s
            measured = t.decode_tokens / sim_s if t.rehearse and sim_s > 0 else decode_tok_s  # sim: its own clock
            rec.update(
                decode_tok_s=decode_tok_s, hit_rate=last["hit_rate"], bytes_per_token=per_tok["bytes"],
                gpu_experts_per_token=per_tok["gpu_experts"], cpu_experts_per_token=per_tok["cpu_experts"],
                prefetched=last["prefetched"], prefetch_used=last["prefetch_used"], **bound,
                bound_fraction=measured / bound["bound_tok_s"] if bound["bound_tok_s"] else None, **_budget(backend), **_vram_peak(t),
            )  # fmt: skip
            if t.rehearse:
                rec["decode_sim_tok_s"] = measured
            rec["meets_80pct_of_bound"] = bool(rec["bound_fraction"] is not None and rec["bound_fraction"] >= 0.8)
            device.synchronize()
            del net, backend, cache
            _free()
    res.set(**_vram_peak(t))


# ---- part: bnb ------------------------------------------------------------------------------------
def _kl(ref_logits: Any, logits: Any) -> float:
    """Mean KL(ref || q) over positions, in nats."""
    import torch.nn.functional as F

    lp, lq = F.log_softmax(ref_logits.double(), -1), F.log_softmax(logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _time(fn: Callable[[], Any], device: str, repeat: int = 20) -> float:
    """Median seconds per call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bnb_roundtrip(w: Any, kind: str) -> Any:
    """w as bitsandbytes stores it, dequantized: NF4 (blocks of 64, its default) or LLM.int8's row-wise absmax int8."""
    import bitsandbytes as bnb
    import torch

    if kind == "nf4":
        q, state = bnb.functional.quantize_4bit(w.to(torch.bfloat16).contiguous(), blocksize=64, quant_type="nf4")
        return bnb.functional.dequantize_4bit(q, state).to(w.dtype)
    scale = w.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return (torch.round(w.float() / scale).clamp(-127, 127) * scale).to(w.dtype)


def bnb_compare(device: str, res: PartResult, matvec_shape: tuple[int, int] = (2816, 4096)) -> None:
    """Quality: logit KL against the unquantized default model, experts only quantized (ours q2/q4/q8,
    bitsandbytes NF4 / int8). Speed: one Air-sized expert matrix times one token, each kernel."""
    import bitsandbytes as bnb
    import torch

    import localglm
    from localglm.default_model import default_model_path
    from quant.formats import QuantSpec, QuantTensor
    from quant.recipe import CLASSES, KEEP

    res.set(bitsandbytes=getattr(bnb, "__version__", "?"), bnb_device=device)
    path = default_model_path()
    ids = torch.tensor([[(i * 37 + 11) % 8000 + 32 for i in range(48)]])
    with res.step("quality (KL vs unquantized)") as rec:
        ref_model = localglm.load(path, device=device, dtype="float32")
        ref = ref_model.logits(ids)[0].cpu()
        kl: dict[str, float] = {}
        only_experts = {f"{c}_bits": KEEP for c in CLASSES if c != "experts"}  # everything else as stored, like the bnb rows
        for bits in EXPERT_BITS:  # as run: our kernels (on the CPU the native ones also quantize activations to int8)
            q = localglm.load(path, device=device, dtype="float32", experts_bits=bits, **only_experts)
            kl[f"localglm q{bits}, as run"] = _kl(ref, q.logits(ids)[0].cpu())
        ex = ref_model.net.experts
        saved = {layer: (ex.gate_up[layer].clone(), ex.down[layer].clone()) for layer in ex.gate_up}

        def ours(bits: int) -> Callable[[Any], Any]:
            return lambda w: QuantTensor.quantize(w, QuantSpec.for_bits(bits)).dequantize(w.dtype)

        schemes = {f"localglm q{b}, weights only": ours(b) for b in EXPERT_BITS}
        schemes |= {f"bitsandbytes {kind}, weights only": (lambda w, kind=kind: bnb_roundtrip(w, kind)) for kind in ("nf4", "int8")}
        for label, roundtrip in schemes.items():  # the same fp32 model, only the experts' weights rounded
            for layer, (gu, dn) in saved.items():  # a layer's experts as one matrix: groups, blocks and rows never straddle experts
                ex.gate_up[layer] = roundtrip(gu.reshape(-1, gu.shape[-1]).to(device)).view(gu.shape)
                ex.down[layer] = roundtrip(dn.reshape(-1, dn.shape[-1]).to(device)).view(dn.shape)
            ex._fused.clear()
            kl[label] = _kl(ref, ref_model.logits(ids)[0].cpu())
        rec["kl_nats"] = kl
    with res.step("speed (one expert matrix x one token)") as rec:
        w = torch.randn(matvec_shape) / math.sqrt(matvec_shape[1])
        x = torch.randn(1, matvec_shape[1], dtype=torch.bfloat16, device=device)
        wb = w.to(device, torch.bfloat16)
        ms: dict[str, float] = {"bf16 F.linear": 1e3 * _time(lambda: torch.nn.functional.linear(x, wb), device)}
        for bits in (4, 8):
            qt = QuantTensor.quantize(w, QuantSpec.for_bits(bits), torch.bfloat16).to(device)
            qt.prepare()
            ms[f"localglm q{bits}"] = 1e3 * _time(lambda: qt.matmul(x), device)
        q4, st = bnb.functional.quantize_4bit(wb, blocksize=64, quant_type="nf4")
        ms["bitsandbytes nf4"] = 1e3 * _time(lambda: bnb.matmul_4bit(x, q4.t(), quant_state=st), device)
        try:
            lin = bnb.nn.Linear8bitLt(matvec_shape[1], matvec_shape[0], bias=False, has_fp16_weights=False)
            lin.weight = bnb.nn.Int8Params(w.to(torch.float16), requires_grad=False)
            lin = lin.to(device)
            x16 = x.to(torch.float16)
            ms["bitsandbytes int8"] = 1e3 * _time(lambda: lin(x16), device)
        except Exception as exc:  # its int8 matmul has no kernel on some backends
            rec["int8_error"] = f"{type(exc).__name__}: {exc}"
        rec.update(ms_per_call=ms, shape=list(matvec_shape))


def part_bnb(t: Target, res: PartResult) -> None:
    if not _importable("bitsandbytes"):
        res.set(status="skipped", reason="bitsandbytes is not installed (its wheel is too large to carry to the device)")
        return
    if t.rehearse and not t.bnb_on_cpu:
        res.set(status="skipped", reason="rehearsal: the CPU comparison takes minutes; ask for it with --bnb-on-cpu")
        return
    bnb_compare(t.device, res)


PART_FUNCS: dict[str, Callable[[Target, PartResult], None]] = {
    "env": part_env, "cuda_tests": part_cuda_tests, "exactness": part_exactness, "air_bench": part_air_bench, "mtp": part_mtp,
    "bnb": part_bnb,
}  # fmt: skip


# ---- orchestration --------------------------------------------------------------------------------
def _child_pythonpath() -> str:
    parts = [str(ROOT)] + ([str(WHEELS_SITE)] if WHEELS_SITE.is_dir() else []) + [os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


def run_part(part: str, t: Target, out: Path) -> None:
    """In the child: run one part, record ok / skipped / error with its traceback."""
    res = PartResult(out, part)
    t0 = time.perf_counter()
    try:
        PART_FUNCS[part](t, res)
        if res.data["status"] == "running":
            failed = [s["step"] for s in res.data.get("steps", []) if s.get("status") == "error"]
            res.data["status"] = "failed" if failed else "ok"
            if failed:
                res.data["failed_steps"] = failed
    except Exception as exc:
        res.data.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=12)[-4000:])
    res.set(seconds=round(time.perf_counter() - t0, 2))


def run_all(t: Target, out: Path, parts: tuple[str, ...]) -> dict[str, Any]:
    """Each part in a child process under its time box; what a killed or crashed child left is kept."""
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"rehearsal": t.rehearse, "device": t.device, "offload": t.offload, "prefill_tokens": t.prefill_tokens, "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "parts": {}}
    env = dict(os.environ, PYTHONPATH=_child_pythonpath())
    for part in parts:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--out", str(out)] + (["--rehearse"] if t.rehearse else [])
        cmd += ["--bnb-on-cpu"] if t.bnb_on_cpu else []
        cmd += ["--profile"] if t.profile else []
        t0 = time.perf_counter()
        print(f"gpu_check: {part} (time box {t.box(part)} s) ...", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=t.box(part))
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as exc:
            rc, tail = None, (str(exc.stdout or "") + str(exc.stderr or ""))[-3000:]
        path = out / "parts" / f"{part}.json"
        data = json.loads(path.read_text()) if path.is_file() else {"part": part}
        if rc is None:
            data.update(status="timeout", time_box_s=t.box(part))
        elif rc != 0 or data.get("status") == "running":
            data.update(status="crashed", returncode=rc)
        if data.get("status") not in ("ok", "skipped"):
            data["output_tail"] = data.get("output_tail") or tail
        data["wall_s"] = round(time.perf_counter() - t0, 2)
        report["parts"][part] = data
        print(f"gpu_check: {part}: {data['status']} ({data['wall_s']} s)", file=sys.stderr, flush=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
    (out / "gpu_check.md").write_text(render_md(report))
    return report


# ---- the Markdown report ------------------------------------------------------------------------
def _f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _steps(part: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in part.get("steps", []) if isinstance(s, dict)]


def render_md(report: dict[str, Any]) -> str:
    p = report["parts"]
    where = "REHEARSAL on the CPU (simulated offload device, small shapes): not GPU numbers" if report["rehearsal"] else "CUDA"
    lines = [f"## GPU check ({where}), {report['started_utc']} UTC", ""]
    env = p.get("env", {})
    lines.append(
        f"torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda')}), GPU: {env.get('gpu', 'none')}, python {env.get('python', '?')}, "
        f"{env.get('cpu_count', '?')} CPUs, native CPU kernels: {env.get('native_kernels', '?')}; optional packages pulled in by localglm: "
        f"{', '.join(env.get('localglm_imports_optional', [])) or 'none'}."
    )
    lines += ["", "| part | status | seconds |", "|---|---|---:|"]
    for name in PARTS:
        if name in p:
            st = p[name].get("status")
            why = p[name].get("reason") or p[name].get("error") or ""
            lines.append(f"| {name} | {st}{' (' + why[:120] + ')' if why and st != 'ok' else ''} | {_f(p[name].get('wall_s'))} |")
    ct = p.get("cuda_tests", {})
    if "tests" in ct:
        lines += ["", f"CUDA tests (`pytest -m cuda`): {ct.get('passed')} passed, {ct.get('failures')} failed, {ct.get('errors')} errors, {ct.get('skipped')} skipped."]
    ex = p.get("exactness", {})
    if _steps(ex):
        lines += [
            "", "Exactness: greedy tokens of the offloaded model against the CPU's (float32; experts at qN, the other weights at the recipe's defaults; a cache of a quarter of the experts, at least a layer's):", "",
            "| model | experts | offload, copy misses = CPU | offload, cost model = CPU | offload = resident (bit-exact) | GPU = CPU | GPU = fp32 oracle (max logit diff) | CPU = fp32 oracle (max logit diff) | peak VRAM |",
            "|---|---|---|---|---|---|---|---|---:|",
        ]  # fmt: skip
        for s in _steps(ex):
            if s.get("status") != "ok" and "offload_copy_vs_cpu" not in s:
                lines.append(f"| {s.get('model', s['step'])} | q{s.get('bits', '?')} | error: {s.get('error', '')[:100]} | | | | | | |")
                continue

            def diff(key: str) -> str:
                c = s.get(key)
                return "-" if not c else f"{cell(key)} ({c['max_abs_logit_diff']:.2g})"

            def cell(key: str, field: str = "tokens_equal") -> str:
                c = s.get(key)
                if not c:
                    return "-"
                txt = _f(c.get(field))
                if not c.get(field) and "first_divergence" in c:
                    txt += f" (step {c['first_divergence']}, margin {_f(c.get('ref_margin_there'), 3)})"
                return txt

            peak = s.get("peak_allocated")
            lines.append(
                f"| {s.get('model')} | q{s.get('bits')} | {cell('offload_copy_vs_cpu')} | {cell('offload_cost_vs_cpu')} | "
                f"{cell('offload_copy_vs_resident', 'bit_exact')} | {cell('gpu_vs_cpu')} | {diff('gpu_vs_oracle')} | {diff('cpu_vs_oracle')} | "
                f"{_f(peak / GiB if peak else None, 2)}{' GiB' if peak else ''} |"
            )
    if "runs" in ex:
        lines += ["", f"Offloaded greedy tokens equal to the CPU's (both miss paths) in {ex['tokens_equal_cpu']} of {ex['runs']} runs; "
                  f"offloaded experts bit-exact against the same experts resident in {ex['offload_bit_exact']} of {ex['runs']}; "
                  f"GPU tokens equal to the fp32 oracle's in {ex.get('gpu_equal_oracle') if ex.get('gpu_equal_oracle') is not None else '- (rehearsal)'} of {ex['runs']}.",
                  "The fp32 oracle is the CPU with every weight dequantized to float32 (`LOCALGLM_NATIVE=0 LOCALGLM_CPU_KERNEL=dense`). "
                  "The CPU's native kernels quantize activations to int8 as llama.cpp's do, so on random models with near-tied "
                  "logits their greedy tokens may part from the exact math's; logit differences are over the tokens both runs saw."]
    ab = p.get("air_bench", {})
    if _steps(ab) or "generate_experts_s" in ab:
        sh = ab.get("shape", {})
        bw = ab.get("bandwidths", {})
        lines += [
            "",
            f"{AIR}-shaped benchmark: {sh.get('num_hidden_layers')} layers, {sh.get('n_routed_experts')} experts top-{sh.get('num_experts_per_tok')}, "
            f"hidden {sh.get('hidden_size')}, moe_inter {sh.get('moe_intermediate_size')}, 4-bit experts ({_f((ab.get('expert_bytes') or 0) / 1e6, 2)} MB each, "
            f"{_f((ab.get('host_expert_bytes') or 0) / 1e9, 2)} GB generated in {_f(ab.get('generate_experts_s'))} s); measured H2D {_f(bw.get('h2d', 0) / 1e9)} GB/s, "
            f"device memory {_f(bw.get('gpu_mem', 0) / 1e9)} GB/s, RAM {_f(bw.get('ram', 0) / 1e9)} GB/s ({', '.join(bw.get('measured', [])) + ' measured' if bw.get('measured') else 'assumed'}).",
            "",
            "| configuration | cache | prefill tok/s (%d) | decode tok/s | decode bound tok/s | of bound | hit rate | MB/token H2D | CPU experts/token | peak VRAM |"
            % (report.get("prefill_tokens") or (64 if report["rehearsal"] else 512)),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in _steps(ab):
            if s["step"] == "bandwidths":
                continue
            if s.get("status") != "ok":
                lines.append(f"| {s['step']} | {s.get('status')}: {(s.get('error') or s.get('reason') or '')[:100]} | | | | | | | | |")
                continue
            dec = s.get("decode_sim_tok_s", s.get("decode_tok_s"))
            peak = s.get("peak_allocated")
            lines.append(
                f"| {s['step']} | {100 * s.get('cache_fraction', 0):.1f}% | {_f(s.get('prefill_sim_tok_s', s.get('prefill_tok_s')))} | {_f(dec, 2)} | "
                f"{_f(s.get('bound_tok_s'), 2)} | {_f(100 * (s.get('bound_fraction') or 0), 0)}% | {_f(100 * s.get('hit_rate', 0), 1)}% | "
                f"{_f(s.get('bytes_per_token', 0) / 1e6, 1)} | {_f(s.get('cpu_experts_per_token'), 1)} | {_f(peak / GiB if peak else None, 2)}{' GiB' if peak else ''} |"
            )
        if report["rehearsal"]:
            lines += ["", "(rehearsal: prefill and decode tok/s are the simulated device's clock, from assumed PCIe/GPU bandwidths; wall-clock figures are in the JSON)"]
    mt = p.get("mtp", {})
    if _steps(mt):
        lines += [
            "", f"Speculative decoding with the default model's MTP block ({mt.get('prompts')} chat requests x {mt.get('new_tokens')} tokens, "
            f"the fastest of {mt.get('rounds')} rounds; greedy tokens at depths 1-3 against plain decoding's):", "",
            "| experts | greedy = plain | sampling | draft | decode tok/s | vs plain | tokens / step | depths | MiB moved / token |",
            "|---|---|---|---|---:|---:|---:|---|---:|",
        ]  # fmt: skip
        for s in _steps(mt):
            same = s.get("greedy_equal_plain", {})
            if s.get("status") != "ok" and not s.get("rows"):
                lines.append(f"| {s['step']} | error: {(s.get('error') or '')[:100]} | | | | | | | |")
            for r in s.get("rows", []):
                label = "plain" if r["draft"] == "0" else ("auto <= 3" if r["draft"] == "auto" else r["draft"])
                depths = ", ".join(f"{d}x{n}" for d, n in r.get("depths", {}).items()) or "-"
                lines.append(
                    f"| {s['step']} | {_f(all(same.values())) if same else '-'} | {r['sampling']} | {label} | {_f(r['decode_tok_s'])} | "
                    f"{_f(r.get('vs_plain'), 2)}x | {_f(r['tokens_per_step'], 2)} | {depths} | {_f(r['mib_moved_per_token'], 2)} |"
                )
    bn = p.get("bnb", {})
    if bn.get("status") == "skipped":
        lines += ["", f"bitsandbytes: skipped ({bn.get('reason')})."]
    for s in _steps(bn):
        if "kl_nats" in s:
            lines += ["", f"Experts quantized, logit KL against the unquantized default model ({bn.get('bnb_device')}):", "", "| format | KL (nats) |", "|---|---:|"]
            lines += [f"| {k} | {v:.5f} |" for k, v in s["kl_nats"].items()]
        if "ms_per_call" in s:
            lines += ["", f"One {s['shape'][0]}x{s['shape'][1]} expert matrix times one token ({bn.get('bnb_device')}):", "", "| kernel | ms |", "|---|---:|"]
            lines += [f"| {k} | {v:.3f} |" for k, v in s["ms_per_call"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu_check.md, gpu_check.json and parts/")
    ap.add_argument("--rehearse", action="store_true", help="the same parts on the CPU: simulated offload device, small shapes (<1 min)")
    ap.add_argument("--bnb-on-cpu", action="store_true", help="with --rehearse: also compare bitsandbytes on the CPU (minutes)")
    ap.add_argument("--profile", action="store_true", help="air_bench: profile each decode loop with cProfile (top functions in parts/air_bench.json)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # the child process's one part
    args = ap.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out}: exists and is not a folder")
    t = Target(rehearse=args.rehearse, bnb_on_cpu=args.bnb_on_cpu, profile=args.profile)
    if args.part:
        run_part(args.part, t, args.out)
        return 0
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}")
    if not args.rehearse:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: error: no CUDA GPU visible (use --rehearse for the CPU rehearsal)", file=sys.stderr)
            return 2
    report = run_all(t, args.out, parts)
    bad_parts = [k for k, v in report["parts"].items() if v.get("status") not in ("ok", "skipped")]
    print((args.out / "gpu_check.md").read_text())
    return 1 if bad_parts else 0


if __name__ == "__main__":
    sys.exit(main())
