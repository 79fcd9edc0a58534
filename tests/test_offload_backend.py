"""OffloadedExperts over the simulated device: same tokens as in memory, budget, pinning, statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from localglm.errors import LocalGLMError
from localglm.loader import load
from localglm.models.glm4_moe.tiny import TinySpec
from localglm.tiny import make_tiny
from offload.backend import OffloadedExperts
from offload.device import BudgetExceeded, CudaDevice, SimulatedDevice
from offload.expert_cache import ExpertCache
from offload.policies import LRU
from offload.router_stats import RouterStats
from offload.trace import Trace

SPEC = TinySpec(n_routed_experts=16, num_experts_per_tok=4, num_hidden_layers=4, vocab_size=384)
PROMPT = "def fibonacci(n):\n    return"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("offload") / "model", SPEC)


N_NEW = 8


@pytest.fixture(scope="module")
def references(tiny):
    out = {}
    for dtype in ("float32", "bfloat16"):
        m = load(tiny, dtype=dtype)
        ids = torch.tensor([m.tokenizer.encode(PROMPT * 3)])
        out[dtype] = m.generate_text(PROMPT, max_new_tokens=N_NEW, temperature=0, ignore_eos=True), m.logits(ids), ids
    return out


@pytest.fixture(scope="module")
def reference(references):
    return references["float32"]


def offloaded(tiny, tmp_path, **kw):
    # float32 keeps these tests fast on CPUs without native bf16; one case below runs bf16.
    opts = dict(offload="sim", gpu_mem="8MiB", stats_path=tmp_path / "stats.npz", dtype="float32")
    opts.update(kw)
    return load(tiny, **opts)


@pytest.mark.parametrize(
    "dtype,policy,miss,slots",
    [("float32", "lru", "copy", 8), ("float32", "lfu", "cost", 12), ("float32", "stat", "cpu", 16), ("bfloat16", "stat", "copy", 4)],
)
def test_same_tokens_and_logits_as_in_memory(tiny, tmp_path, references, dtype, policy, miss, slots) -> None:
    text, logits, ids = references[dtype]
    m = offloaded(tiny, tmp_path, cache_policy=policy, miss=miss, cache_slots=slots, dtype=dtype)
    assert isinstance(m.net.experts, OffloadedExperts)
    assert m.generate_text(PROMPT, max_new_tokens=N_NEW, temperature=0, ignore_eos=True) == text
    assert torch.equal(m.logits(ids), logits)  # prefill batches too, bit for bit
    b = m.last_stats.backend
    assert b["hits"] + b["misses"] > 0 and 0 <= b["hit_rate"] <= 1
    assert b["device_bytes_peak"] <= b["device_bytes_budget"]
    assert set(b["layer_heat"]) == {1, 2, 3, 4} and len(b["layer_heat"][1]) == 16  # 4: the MTP block's layer
    if miss == "cpu":
        assert b["copied"] == 0 and b["cpu_computed"] == b["misses"]
    if miss == "copy":  # prompt chunks use more experts than there are slots: they run in waves, none on the CPU
        assert b["copied"] > 0 and b["bytes_moved"] >= b["copied"] * m.net.experts.codec.nbytes
        assert b["cpu_computed"] == 0
    assert b["prefetch_recall"] is not None


def test_budget_is_enforced(tiny, tmp_path) -> None:
    dev = SimulatedDevice(1000)
    dev.alloc(600, "a")
    with pytest.raises(BudgetExceeded, match="budget exceeded"):
        dev.alloc(500, "b")
    assert dev.budget.peak == 600
    with pytest.raises(BudgetExceeded):  # more slots than the simulated VRAM holds
        offloaded(tiny, tmp_path, cache_slots=10_000)
    m = offloaded(tiny, tmp_path)  # slots from the planner fill the budget without exceeding it
    be = m.net.experts
    assert be.cache.n_slots > 0
    assert be.device.budget.used <= be.device.budget.capacity
    assert be.cache.n_slots == be.n_keys or be.device.budget.capacity - be.device.budget.used < be.codec.nbytes
    small = offloaded(tiny, tmp_path, gpu_mem="4MiB").net.experts  # a tighter budget: fewer slots, filled up
    assert 0 < small.cache.n_slots < be.n_keys
    assert small.device.budget.capacity - small.device.budget.used < small.codec.nbytes
    with pytest.raises(LocalGLMError, match="needs gpu_mem"):
        load(tiny, offload="sim", dtype="float32")


def test_expert_in_use_is_never_evicted() -> None:
    dev = SimulatedDevice(10_000)
    cache = ExpertCache(dev, 2, 16, 8, LRU(8))
    src = torch.arange(16, dtype=torch.uint8)
    assert cache.insert(0, src, 0.0) is not None and cache.insert(1, src, 1.0) is not None
    cache.pin([0, 1])
    assert cache.insert(2, src, 2.0) is None  # both slots in use: the caller computes on the CPU
    cache.unpin_all()
    cache.pin([0])
    slot = cache.insert(2, src, 3.0)
    assert slot is not None and cache.cached[0] and not cache.cached[1]
    assert torch.equal(cache.slot_tensor(slot), src)  # a real copy into the device buffer


def test_pinned_experts_survive_a_full_model_run(tiny, tmp_path, reference) -> None:
    # Cache exactly top-k slots: every miss must evict, and the call's own experts are pinned.
    m = offloaded(tiny, tmp_path, cache_policy="lru", miss="copy", cache_slots=SPEC.num_experts_per_tok)
    be = m.net.experts
    real_victim = be.cache.policy.victim
    chosen = []

    def checked(cached, pinned, t, protect=None):
        v = real_victim(cached, pinned, t, protect)
        assert v < 0 or not pinned[v]
        chosen.append(v)
        return v

    be.cache.policy.victim = checked
    assert m.generate_text(PROMPT, max_new_tokens=N_NEW, temperature=0, ignore_eos=True) == reference[0]
    assert any(v >= 0 for v in chosen)


def test_statistics_persist_reload_and_preload(tiny, tmp_path) -> None:
    m = offloaded(tiny, tmp_path, cache_slots=6)
    m.generate_text(PROMPT, max_new_tokens=8, temperature=0, ignore_eos=True)
    st = m.net.experts.stats
    assert (tmp_path / "stats.npz").is_file() and st.tokens > 0
    again = RouterStats.load(tmp_path / "stats.npz")
    assert again.tokens == st.tokens and np.allclose(again.counts, st.counts) and np.allclose(again.cooc, st.cooc)
    m2 = offloaded(tiny, tmp_path, cache_slots=6)
    be = m2.net.experts
    assert be.stats.tokens == st.tokens
    assert be.cache.resident_keys() == sorted(st.hottest(6))  # the hottest experts are loaded at start
    assert be.cache.policy.prior_tokens == st.tokens
    wrong = RouterStats([1, 2], 4, 2)
    wrong.save(tmp_path / "other.npz")
    fresh = RouterStats.load_or_new(tmp_path / "other.npz", [1, 2, 3], 16, 4)  # a foreign profile is ignored
    assert fresh.tokens == 0


def test_trace_option_records_offloaded_run(tiny, tmp_path) -> None:
    m = offloaded(tiny, tmp_path, trace=tmp_path / "run.jsonl", cache_slots=6)
    m.generate_text(PROMPT, max_new_tokens=5, temperature=0, ignore_eos=True)
    m.net.experts.recorder.close()
    tr = Trace.load(tmp_path / "run.jsonl")
    assert tr.moe_layers == [1, 2, 3, 4] and tr.n_experts == 16 and tr.top_k == 4  # 4: the MTP block's layer, offloaded with the others
    assert tr.calls[0].experts.shape[0] > 1  # the prefill call
    assert any(c.predicted is not None for c in tr.calls)
    plain = load(tiny, trace=tmp_path / "plain.jsonl", dtype="float32")  # tracing works without offloading too
    plain.generate_text(PROMPT, max_new_tokens=3, temperature=0, ignore_eos=True)
    plain.net.experts.recorder.close()
    assert len(Trace.load(tmp_path / "plain.jsonl").calls) == 3 * 3  # 3 MoE layers x (prefill + 2 decode steps)


def test_cuda_device_needs_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(LocalGLMError, match="needs a CUDA GPU"):
        CudaDevice(1 << 30)


def test_record_trace_cli_with_offload(tiny, tmp_path, capsys) -> None:
    from localglm.cli import main

    out = tmp_path / "cli.jsonl"
    args = ["record-trace", str(tiny), "-o", str(out), "-p", PROMPT, "-n", "3", "--temperature", "0", "--dtype", "float32"]
    assert main(args + ["--offload", "sim", "--gpu-mem", "8MiB"]) == 0
    assert "hit rate" in capsys.readouterr().err
    assert len(Trace.load(out).calls) == 3 * 3
    assert main(["simulate", str(out), "--sizes", "0.25", "--prefetch"]) == 0
    assert "belady" in capsys.readouterr().out


def test_quantized_blobs_plug_in() -> None:
    # quant/ experts are blobs too: the cache moves them with one copy each and computes them from
    # the blob; wherever an expert runs (device slot or host RAM), the result is the same.
    from localglm.layers.experts import InMemoryExperts
    from offload.backend import quantize_in_memory
    from quant.blob import expert_forward

    g = torch.Generator().manual_seed(0)
    h, inter, n_exp = 64, 32, 6
    mem = InMemoryExperts({1: torch.randn(n_exp, 2 * inter, h, generator=g)}, {1: torch.randn(n_exp, h, inter, generator=g)})
    dev = SimulatedDevice(1 << 20)
    codec, host = quantize_in_memory(mem, dev, 4)
    assert codec.nbytes < 3 * h * inter * 2 and not mem.gate_up  # smaller than bf16; float copies released
    x = torch.randn(5, h, generator=g)
    ids = torch.tensor([[0, 1], [2, 3], [0, 4], [5, 1], [2, 0]])
    w = torch.rand(5, 2, generator=g)
    outs = []
    for miss, slots in (("cpu", 2), ("copy", 2), ("copy", 6)):
        be = OffloadedExperts([1], n_exp, 2, codec, host, SimulatedDevice(1 << 20), slots, miss=miss, preload=False)
        outs.append(be.forward(1, x, ids, w))
        assert (be.counters.copied > 0) == (miss == "copy")
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    want = torch.zeros_like(x)
    for t in range(5):
        for j in range(2):
            e = int(ids[t, j])
            want[t] += expert_forward(codec.layout, host[1][e], x[t : t + 1])[0] * w[t, j]
    assert torch.allclose(outs[0], want, atol=1e-4, rtol=1e-4)


def test_offloading_a_quantized_model_gives_its_tokens(tiny, tmp_path) -> None:
    # experts_bits=4 is the quantization engineer's load option (QuantizedExperts); offloading
    # takes its blobs as they are and must reproduce its tokens and logits exactly.
    q = load(tiny, dtype="float32", experts_bits=4)
    ids = torch.tensor([q.tokenizer.encode(PROMPT * 2)])
    want_text = q.generate_text(PROMPT, max_new_tokens=N_NEW, temperature=0, ignore_eos=True)
    want = q.logits(ids)
    m = offloaded(tiny, tmp_path, experts_bits=4, cache_slots=5, miss="copy")
    assert m.generate_text(PROMPT, max_new_tokens=N_NEW, temperature=0, ignore_eos=True) == want_text
    assert torch.equal(m.logits(ids), want)
    assert m.net.experts.counters.copied > 0


def test_cpu_experts_of_a_call_run_in_one_native_call(tiny, tmp_path, monkeypatch) -> None:
    """Experts a call computes on the CPU share one native MoE call (one row per token and expert), with
    the numbers the per-expert path gives, bit for bit, in a prompt and in decoding."""
    from quant.native import NativeLib, native_lib

    if native_lib() is None:
        pytest.skip("no C compiler: the native kernels are not built")
    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64, 3, 250, 31, 8]])
    m = offloaded(tiny, tmp_path, miss="cpu", cache_slots=4, experts_bits=4)
    calls: list[int] = []
    real = NativeLib.moe
    monkeypatch.setattr(NativeLib, "moe", lambda self, gu, dn, inter, x, i, w: calls.append(len(gu)) or real(self, gu, dn, inter, x, i, w))
    batched = m.logits(ids)
    text = m.generate_text(PROMPT, max_new_tokens=4, temperature=0, ignore_eos=True)
    assert any(n > 1 for n in calls)  # several experts in one call
    per_expert = offloaded(tiny, tmp_path, miss="cpu", cache_slots=4, experts_bits=4)
    monkeypatch.setattr(OffloadedExperts, "_cpu_batch", lambda self, layer, rows, device: {})
    calls.clear()
    assert torch.equal(per_expert.logits(ids), batched)
    assert per_expert.generate_text(PROMPT, max_new_tokens=4, temperature=0, ignore_eos=True) == text
    assert calls and all(n == 1 for n in calls)
    assert m.net.experts.counters.cpu_computed > 0


def test_cpu_experts_too_busy_for_the_moe_kernel_leave_the_others_batched(tiny, tmp_path, monkeypatch) -> None:
    """A prompt's busiest CPU experts (more rows than the MoE kernel takes) run by themselves through a
    GEMM, while the call's other CPU experts still share one native MoE call: same numbers as per expert."""
    import quant.native as quant_native
    from quant.native import NativeLib, native_lib

    if native_lib() is None:
        pytest.skip("no C compiler: the native kernels are not built")
    monkeypatch.setattr(quant_native, "NATIVE_MAX_ROWS", 2)
    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64, 3, 250, 31, 8]])
    m = offloaded(tiny, tmp_path, miss="cpu", cache_slots=4, experts_bits=4)
    calls: list[int] = []
    real = NativeLib.moe
    monkeypatch.setattr(NativeLib, "moe", lambda self, gu, dn, inter, x, i, w: calls.append(len(gu)) or real(self, gu, dn, inter, x, i, w))
    batched = m.logits(ids)
    assert any(n > 1 for n in calls)  # the experts with 1 or 2 rows in one call
    per_expert = offloaded(tiny, tmp_path, miss="cpu", cache_slots=4, experts_bits=4)
    monkeypatch.setattr(OffloadedExperts, "_cpu_batch", lambda self, layer, rows, device: {})
    assert torch.equal(per_expert.logits(ids), batched)
