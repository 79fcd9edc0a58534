"""benchmarks/gpu_check.py: its CPU rehearsal end to end, the pieces it builds on, and the `cuda` tests it runs.

The `cuda`-marked tests skip without a GPU; `python benchmarks/gpu_check.py --out DIR` runs them
(`pytest -m cuda`) the day a GPU is lent. This module imports only torch and the project at the top,
so it collects on the device machine (no gguf / textual / transformers needed there).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quant.blob import ExpertBlobLayout, PreparedExpert
from quant.cuda_kernels import prepared_nbytes, uses_tinygemm
from quant.formats import QuantSpec, QuantTensor

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_check():
    """benchmarks/gpu_check.py as a module (registered first: its dataclasses look their module up)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["gpu_check"]


# ---- the rehearsal ------------------------------------------------------------------------------
def test_rehearsal_writes_both_reports(tmp_path: Path) -> None:
    """The whole check on the CPU (simulated device, small shapes): every part runs or is skipped for a
    stated reason, the offloaded greedy tokens equal the CPU's bit for bit, and the reports agree."""
    out = tmp_path / "gc"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--rehearse", "--out", str(out)], capture_output=True, text=True, timeout=400)
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert set(parts) == {"env", "cuda_tests", "exactness", "air_bench", "mtp", "bnb"}
    assert {p: v["status"] for p, v in parts.items() if v["status"] not in ("ok", "skipped")} == {}, proc.stderr[-3000:]
    assert proc.returncode == 0
    ex = parts["exactness"]
    assert ex["runs"] == 5 and ex["tokens_equal_cpu"] == 5 and ex["offload_bit_exact"] == 5
    models = {s["model"] for s in ex["steps"]}
    assert any("glm_moe_dsa" in m for m in models) and any("glm4_moe_lite" in m for m in models)
    for s in ex["steps"]:
        for key in ("offload_copy", "offload_cost"):
            assert s[key]["budget_ok"] and 0 < s[key]["cache_slots"] < s["experts_total"]
        assert s["offload_copy"]["copied"] > 0  # the cache missed: the copy path ran
        assert s["offload_copy"]["cpu_computed"] == 0  # miss=copy: prompt chunks wider than the cache ran in waves
        # the fp32 oracle (every weight dequantized) ran beside the CPU's kernels: their difference is recorded
        assert 0 < s["cpu_vs_oracle"]["max_abs_logit_diff"] < 5
    q8 = next(s for s in ex["steps"] if s["bits"] == 8)
    assert q8["cpu_vs_oracle"]["tokens_equal"]  # the trained model's q8 margins stand above the int8 activations' rounding
    air = {s["step"]: s for s in parts["air_bench"]["steps"]}
    runs = [air[name] for name, *_ in _gpu_check().AIR_CONFIGS]
    assert all(r["status"] == "ok" for r in runs)
    assert all(0 < r["cache_fraction"] < 1 and r["bytes_per_token"] > 0 and r["bound_tok_s"] > 0 for r in runs[:2])
    assert runs[2]["cpu_experts_per_token"] > 0  # the cost model sent cold experts to the CPU
    assert runs[0]["prefetched"] == 0 and runs[1]["prefetched"] > 0
    assert runs[3]["bytes_per_token"] == 0 and runs[3]["cpu_experts_per_token"] == runs[3]["gpu_experts_per_token"] + runs[3]["cpu_experts_per_token"] > 0
    mtp = {s["step"]: s for s in parts["mtp"]["steps"]}
    assert set(mtp) == {"resident", "offloaded, a quarter cached"} and all(s["status"] == "ok" for s in mtp.values())
    for s in mtp.values():
        assert s["greedy_equal_plain"] == {"1": True, "2": True, "3": True}  # speculation never changes greedy tokens
        assert [(r["sampling"], r["draft"]) for r in s["rows"]] == [(n, str(d)) for n, drafts in _gpu_check().MTP_SETTINGS for d in drafts]
        assert all(r["decode_tok_s"] > 0 for r in s["rows"])
        assert all(r["tokens_per_step"] > 1 for r in s["rows"] if r["draft"] in ("1", "2", "3"))  # the trained block's drafts are accepted
    assert all(r["mib_moved_per_token"] > 0 for r in mtp["offloaded, a quarter cached"]["rows"])
    assert all(r["mib_moved_per_token"] == 0 for r in mtp["resident"]["rows"])
    md = (out / "gpu_check.md").read_text()
    assert "REHEARSAL" in md and "| LRU, GPU-only |" in md and "random GLM-5 (glm_moe_dsa) | q4 | yes | yes | yes |" in md
    assert "| resident | yes | greedy | 2 |" in md and "| offloaded, a quarter cached | yes | greedy | plain |" in md


def test_failed_part_is_recorded_and_the_rest_kept(tmp_path: Path) -> None:
    gc = _gpu_check()
    report = {
        "rehearsal": True, "started_utc": "now", "prefill_tokens": 64,
        "parts": {
            "env": {"status": "ok", "wall_s": 1.0},
            "exactness": {"status": "timeout", "wall_s": 30.0, "steps": [
                {"step": "m q4", "status": "error", "model": "m", "bits": 4, "error": "RuntimeError: boom"}]},
            "air_bench": {"status": "ok", "wall_s": 2.0, "steps": [{"step": "bandwidths", "status": "ok"}]},
        },
    }  # fmt: skip
    md = gc.render_md(report)
    assert "| exactness | timeout | 30.0 |" in md and "| m | q4 | error: RuntimeError: boom |" in md and "| air_bench | ok |" in md


def test_random_expert_blobs_are_valid_packed_experts() -> None:
    """Random bytes straight into the blob format decode to finite weights of about 1/sqrt(K)."""
    gc = _gpu_check()
    spec = QuantSpec.for_bits(4)
    lay = ExpertBlobLayout(128, 64, spec, spec)
    host = torch.empty(3, lay.nbytes, dtype=torch.uint8)
    gc.random_expert_blobs(lay, 3, host, "cpu", seed=1)
    gu, dn = lay.unpack(host[2], torch.float32)
    for qt, k in ((gu, 128), (dn, 64)):
        w = qt.dequantize(torch.float32)
        assert torch.isfinite(w).all() and 0.5 < float(w.std()) * math.sqrt(k) < 3
    y = PreparedExpert(lay, host[0], torch.float32)(torch.randn(2, 128))
    assert y.shape == (2, 128) and torch.isfinite(y).all()
    assert not torch.equal(host[0], host[1])


def test_decode_bound_overlaps_copies_with_gpu_work() -> None:
    from offload.cost_model import Bandwidths, CostModel

    gc = _gpu_check()
    bw = Bandwidths(h2d=10e9, gpu_mem=100e9, ram=50e9, cpu_flops=1e12, latency_s=0.0)
    cost = CostModel(bw, 10**6, 0.0)
    # 1 GB over H2D = 0.1 s; GPU reads 1 GB dense + 10 experts = 0.0101 s: the copy bounds it
    b = gc.decode_bound({"bytes": 1e9, "gpu_experts": 10, "cpu_experts": 0}, 10**6, 10**9, bw, cost)
    assert b["bound_tok_s"] == pytest.approx(10.0)
    # 500 experts on the CPU at 1 MB / 50 GB/s = 0.01 s, in the GPU's path
    b = gc.decode_bound({"bytes": 0, "gpu_experts": 0, "cpu_experts": 500}, 10**6, 10**9, bw, cost)
    assert b["bound_tok_s"] == pytest.approx(1 / (0.01 + 0.01))


# ---- CUDA kernel accounting (runs anywhere) -------------------------------------------------------
def test_dense_cpu_kernel_is_the_fp32_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    """LOCALGLM_CPU_KERNEL=dense (with the native kernels off): q2/q4 also multiply by their dequantized
    float32 weight, exactly, instead of rounding activations to bf16 in torch's int4 kernel."""
    import quant.native
    from quant.cpu_kernels import DenseKernel, prepare_cpu

    monkeypatch.setattr(quant.native, "native_lib", lambda: None)
    qt = QuantTensor.quantize(torch.randn(64, 128), QuantSpec.for_bits(4), torch.float32)
    x = torch.randn(3, 128)
    assert not isinstance(prepare_cpu(qt), DenseKernel)
    monkeypatch.setenv("LOCALGLM_CPU_KERNEL", "dense")
    kernel = prepare_cpu(qt)
    assert isinstance(kernel, DenseKernel)
    assert torch.equal(kernel(x), torch.nn.functional.linear(x, qt.dequantize(torch.float32)))


def test_torch_cpu_kernel_takes_any_row_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the native kernels, a q2/q4 weight whose rows are not whole int4-pack tiles of 16 (GQA's 24-row
    k_proj, MLA's kv_a_proj of kv_lora + rope rows, at the 2-bit recipe's 4-bit attention) failed to load with
    torch's "expect N to be dividable by 16"; it runs on its dequantized weight instead."""
    import quant.native
    from quant.cpu_kernels import DenseKernel, prepare_cpu

    monkeypatch.setattr(quant.native, "native_lib", lambda: None)
    for bits in (2, 4):
        qt = QuantTensor.quantize(torch.randn(24, 128), QuantSpec.for_bits(bits), torch.float32)
        kernel = prepare_cpu(qt)
        x = torch.randn(3, 128)
        assert isinstance(kernel, DenseKernel) and torch.equal(kernel(x), torch.nn.functional.linear(x, qt.dequantize(torch.float32)))


def test_prepared_bytes_per_format() -> None:
    """What a prepared CUDA kernel keeps: tinygemm tiles + bf16 scale/zero pairs for q2/q4 (q2 costs
    4 bits a weight once prepared), the dense weight for q8 and for shapes tinygemm cannot take."""
    n, k = 256, 512
    assert prepared_nbytes(QuantSpec.for_bits(4), (n, k), torch.bfloat16) == n * k // 2 + 4 * n * (k // 32)
    assert prepared_nbytes(QuantSpec.for_bits(2), (n, k), torch.bfloat16) == n * k // 2 + 4 * n * (k // 32)
    assert prepared_nbytes(QuantSpec.for_bits(8), (n, k), torch.bfloat16) == 2 * n * k
    assert prepared_nbytes(QuantSpec.for_bits(8), (n, k), torch.float32) == 4 * n * k
    assert not uses_tinygemm(QuantSpec.for_bits(4), (12, k))  # N not a multiple of 8
    assert uses_tinygemm(QuantSpec.for_bits(4), (n, k)) and not uses_tinygemm(QuantSpec.for_bits(8), (n, k))
    # tinygemm rounds to bf16: a float32 / float16 model keeps its own precision through the dense kernel
    assert not uses_tinygemm(QuantSpec.for_bits(4), (n, k), dtype=torch.float32)
    assert not uses_tinygemm(QuantSpec.for_bits(2), (n, k), dtype=torch.float16)
    assert prepared_nbytes(QuantSpec.for_bits(4), (n, k), torch.float32) == 4 * n * k


# ---- on a GPU -------------------------------------------------------------------------------------
@pytest.mark.cuda
@needs_cuda
def test_cuda_sampling_on_gpu_logits() -> None:
    """With offloaded experts the logits live on the GPU, and so does the sampler: its draws (rejection and
    listed), top-p's histogram and the distribution speculative sampling takes all run on that device."""
    from localglm.sampling import Sampler, SamplingParams, _top_p

    torch.manual_seed(0)
    for scale in (0.2, 4.0):  # flat (top-p through the histogram) and peaked (the first 256)
        logits = (torch.randn(151552) * scale).cuda()
        z = logits - logits.max()
        probs = torch.softmax(z, 0)
        p, idx = _top_p(probs, z, 0.9)
        assert p.device.type == "cuda" and float(p.sum()) >= 0.9 - 1e-4
        s = Sampler(SamplingParams(temperature=1.0, top_p=0.9, min_p=0.01, seed=1), "cuda")
        dist = s.distribution(logits)
        assert dist.device.type == "cuda" and abs(float(dist.sum()) - 1.0) < 1e-4
        assert all(float(dist[s(logits)]) > 0 for _ in range(20))


@pytest.mark.cuda
@needs_cuda
def test_cuda_host_buffer_is_pinned_exact_and_copies() -> None:
    """Registered (not power-of-two rounded) pinned memory; a copy on the copy stream lands intact once waited for."""
    from offload.device import CudaDevice

    dev = CudaDevice(1 << 30)
    n = (3 << 20) + 123
    host = dev.host_buffer(n)
    assert host.numel() == n and host.is_pinned()
    host.copy_(torch.randint(0, 256, (n,), dtype=torch.uint8))
    dst = dev.alloc(n, "test")
    ev = dev.copy_async(dst, host)
    dev.wait(ev)
    assert torch.equal(dst.cpu(), host)
    dev.close()
    assert not host.is_pinned() and host.numel() == n


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cuda_prepared_kernel_fits_its_accounting(bits: int) -> None:
    n, k = 512, 1024
    qt = QuantTensor.quantize(torch.randn(n, k), QuantSpec.for_bits(bits), torch.bfloat16).to("cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    qt.prepare()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    assert kept <= prepared_nbytes(qt.spec, (n, k), torch.bfloat16, qt.device) + (64 << 10)
    x = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ qt.dequantize(torch.float32).T
    assert float((qt.matmul(x).float() - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.cuda
@needs_cuda
def test_cuda_odd_shapes_fall_back_to_the_dense_kernel() -> None:
    qt = QuantTensor.quantize(torch.randn(12, 64), QuantSpec.for_bits(4), torch.bfloat16).to("cuda")  # N % 8 != 0
    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ qt.dequantize(torch.float32).T
    assert float((qt.matmul(x).float() - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("bits", [None, 4])
def test_cuda_offload_equals_resident_experts(tiny_dir: Path, tmp_path: Path, bits: int | None) -> None:
    """Every miss copied into a small device cache (copy stream, events, slot reuse, prefetch): logits
    bit for bit those of the same experts resident on the GPU, unquantized (bf16 codec) and q4 (tinygemm)."""
    import localglm
    from localglm.quantize import quantize_checkpoint
    from quant.recipe import Recipe

    model = tiny_dir
    if bits is not None:  # one quantized directory for both (on a GPU the planner picks the always-used bits of a recipe's unset classes)
        model = tmp_path / f"q{bits}"
        quantize_checkpoint(tiny_dir, model, Recipe.from_options({"experts": bits}, []))
    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64, 3, 250, 31, 8]])
    resident = localglm.load(model, device="cuda")
    ref = resident.logits(ids)
    # 10 of 16 experts: misses, yet room for a whole layer's 8 (with every slot pinned a miss would run on the CPU)
    off = localglm.load(model, device="cuda", offload="cuda", gpu_mem="8GiB", cache_slots=10, miss="copy", stats_path=tmp_path / "s.json")
    assert torch.equal(off.logits(ids), ref)
    from localglm.sampling import SamplingParams

    greedy = SamplingParams(temperature=0.0)
    assert list(off.stream_tokens(ids[0].tolist(), max_new_tokens=8, sampling=greedy)) == list(
        resident.stream_tokens(ids[0].tolist(), max_new_tokens=8, sampling=greedy)
    )
    snap = off.net.experts.stats_snapshot()
    assert snap["copied"] > 0 and snap["evictions"] > 0 and snap["cpu_computed"] == 0 and snap["cache_slots"] == 10 and snap["device_bytes_peak"] <= snap["device_bytes_budget"]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_quantized_embedding_and_rows_stay_on_the_gpu(bits: int) -> None:
    """A quantized embedding table (the planner's q8/q4 always-used weights) looks rows up on its GPU."""
    qt = QuantTensor.quantize(torch.randn(64, 96), QuantSpec.for_bits(bits), torch.bfloat16).to("cuda")
    ids = torch.tensor([[3, 0, 63]], device="cuda")
    emb = torch.nn.functional.embedding(ids, qt)
    assert emb.device.type == "cuda" and emb.shape == (1, 3, 96)
    assert torch.equal(emb[0], qt.dequantize(torch.bfloat16)[ids[0]])
    assert qt.rows(ids[0]).device.type == "cuda"


@pytest.mark.cuda
@needs_cuda
def test_cuda_fetch_waits_for_queued_compute() -> None:
    """fetch (the DSA cache's host rows) writes into memory the compute stream may just have freed: the
    copy waits for queued kernels, and the rows arrive intact."""
    from offload.device import CudaDevice

    dev = CudaDevice(1 << 30)
    for _ in range(3):
        a = torch.randn(2048, 2048, device="cuda")
        b = a @ a  # queued work reading a
        del a  # its block may be handed to fetch's dst at once
        src = torch.randn(2048, 2048)
        got = dev.fetch(src)
        assert torch.equal(got.cpu(), src) and torch.isfinite(b).all()
