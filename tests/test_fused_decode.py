"""The fused native decode layer (localglm/fused_decode.py) against the torch ops it replaces.

Both paths round at the same points. Quantized products run through the same native kernel either
way, so a quantized model's logits and KV cache must be bit-identical; dense bf16 / fp32 products
sum in another order than torch's GEMV, so those agree to the dtype's rounding (a bf16 value can
land one ulp apart).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import localglm
from localglm.models.glm4_moe.fused_decode import FusedDecoder
from localglm.models.glm4_moe.tiny import TinySpec
from localglm.tiny import make_tiny
from quant.native import native_lib

pytestmark = pytest.mark.skipif(native_lib() is None, reason="no C compiler: the native kernels cannot be built")

PROMPT = [1, 5, 9, 33, 7, 100, 3, 200, 17, 42]
SHAPES = {
    "default": {},
    "no-bias-no-qknorm-full-rope": dict(attention_bias=False, use_qk_norm=False, partial_rotary_factor=1.0),
    "groups": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),
    "no-shared-all-moe": dict(n_shared_experts=0, first_k_dense_replace=0, norm_topk_prob=False),
    "two-shared-gqa4": dict(n_shared_experts=2, num_attention_heads=8, num_key_value_heads=2, head_dim=32),
}


def _decode(net: object, fused: bool, prompt: list[int], prefill: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of each decoded position, and the cache's k / v, decoding prompt[prefill:] one token at a
    time. The prompt goes through the torch ops either way: these tests compare the one-token paths
    from the same cache (multi-token forwards: tests/test_fused_prefill.py)."""
    net.fused_decode, net.fused_prefill = fused, False
    ids = torch.tensor([prompt])
    cache = net.new_cache(64)
    out = []
    with torch.inference_mode():
        net.hidden_states(ids[:, :prefill], cache, 0)
        for p in range(prefill, len(prompt)):
            out.append(net.lm_head(net.hidden_states(ids[:, p : p + 1], cache, p)[0, -1]).float())
    return torch.stack(out), cache.k.clone(), cache.v.clone()


def _model(tmp_path: Path, name: str, **spec: object) -> Path:
    return make_tiny(tmp_path / name, TinySpec(**spec))


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_fused_decode_matches_the_torch_ops(tmp_path: Path, shape: str) -> None:
    net = localglm.load(str(_model(tmp_path, shape, **SHAPES[shape]))).net
    assert net._fused_decoder() is not None
    (a, ka, va), (b, kb, vb) = _decode(net, True, PROMPT), _decode(net, False, PROMPT)
    assert (a - b).abs().max() <= 0.02 * b.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    for x, y in ((ka, kb), (va, vb)):  # one bf16 ulp at most
        assert torch.allclose(x.float(), y.float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("bits", [dict(experts_bits=4), dict(experts_bits=2, attn_bits=4, shared_bits=4, dense_bits=4)])
def test_quantized_fused_decode_is_bit_identical(tmp_path: Path, bits: dict) -> None:
    spec = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, head_dim=32)
    net = localglm.load(str(_model(tmp_path, "q", **spec)), **bits).net
    fused = net._fused_decoder()
    assert fused is not None and any(layer.desc.qkv.kind == 0 for layer in fused.layers)  # quantized attention read packed
    a, b = _decode(net, True, PROMPT), _decode(net, False, PROMPT)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_fp32_fused_decode_matches_to_rounding(tmp_path: Path) -> None:
    net = localglm.load(str(_model(tmp_path, "f32", dtype="float32", **SHAPES["groups"]))).net
    (a, ka, va), (b, kb, vb) = _decode(net, True, PROMPT), _decode(net, False, PROMPT)
    scale = b.abs().max()
    assert (a - b).abs().max() <= 1e-5 * scale
    assert (ka - kb).abs().max() <= 1e-5 and (va - vb).abs().max() <= 1e-5
    assert not torch.equal(a, torch.zeros_like(a))


def test_greedy_generation_is_the_same_through_either_path(tmp_path: Path) -> None:
    model = localglm.load(str(_model(tmp_path, "gen")))
    texts = []
    for fused in (True, False):
        model.net.fused_decode = fused
        texts.append(list(model.stream_tokens(PROMPT, max_new_tokens=24, sampling=localglm.SamplingParams(temperature=0), reuse_prefix=False)))
    assert texts[0] == texts[1] and len(texts[0]) == 24


def test_unsupported_models_keep_the_torch_path(tmp_path: Path) -> None:
    net = localglm.load(str(_model(tmp_path, "f16", dtype="float16")), dtype="float16").net
    assert FusedDecoder.build(net) is None
    logits, _, _ = _decode(net, True, PROMPT)
    assert torch.isfinite(logits).all()


def test_fused_decode_refuses_a_full_cache(tmp_path: Path) -> None:
    net = localglm.load(str(_model(tmp_path, "full"))).net
    cache = net.new_cache(4)
    with torch.inference_mode(), pytest.raises(ValueError, match="KV cache overflow"):
        net.hidden_states(torch.tensor([[3]]), cache, 4)


def test_a_wrapped_backend_still_sees_every_decoded_layer(tmp_path: Path) -> None:
    """Quantized experts run inside the layer call only when the backend is QuantizedExperts itself:
    a wrapper (the routing tracer here) keeps getting its forward call for every MoE layer."""
    from offload.trace import attach_tracer

    spec = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, head_dim=32)
    model = localglm.load(str(_model(tmp_path, "traced", **spec)), experts_bits=4)
    rec = attach_tracer(model)
    steps = 6
    list(model.stream_tokens(PROMPT, max_new_tokens=steps, sampling=localglm.SamplingParams(temperature=0), reuse_prefix=False))
    moe_layers = len(rec.trace.moe_layers)
    assert len(rec.trace.calls) == moe_layers * steps  # the prefill call, then steps - 1 decoded tokens


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_experts_in_ram_give_the_same_numbers_inside_the_token_call_and_through_the_backend(tmp_path: Path, dtype: str) -> None:
    """Float experts in RAM run inside the one-call-per-token decode; behind a wrapper they go
    through the backend (expert_swiglu per expert, combine_experts' fp32 sum) -- the offloading
    backend's path too. Both must give the same logits bit for bit."""
    from offload.trace import TraceRecorder, TracingExperts

    net = localglm.load(str(_model(tmp_path, "dense", **SHAPES["groups"])), dtype=dtype).net
    fused = net._fused_decoder()
    assert fused is not None and fused._experts_in_ram()[1] is not None  # the whole token in one call
    inside = _decode(net, True, PROMPT)
    cfg = net.cfg
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    net.experts = TracingExperts(net.experts, TraceRecorder(cfg.n_routed_experts, cfg.num_experts_per_tok, moe_layers))
    assert fused._experts_in_ram()[1] is None  # a wrapper: per layer, through hint / forward
    through = _decode(net, True, PROMPT)
    for a, b in zip(inside, through):
        assert torch.equal(a, b)


KQUANT_MIX = Path(__file__).parent / "data" / "glm4_moe_kquant_mix.gguf"  # llama.cpp's quantizer: Q2_K..Q6_K, IQ4_XS, Q4_0, Q5_0 per tensor


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gguf_blocks_as_stored_decode_fused_bit_identical_to_the_torch_layers(dtype: str) -> None:
    """A GGUF K-quant mix runs in the fused decode as stored: q/k/v of three types as one stack, the
    dense and shared MLPs and the lm_head as GGUF blocks, the routed experts (Q2_K / Q3_K, IQ4_XS / Q4_K)
    inside the token's one call -- the same kq_matmul_q8 products, rounded where the torch layers round
    (GGMLKernel, QuantStack's per-part bias, PreparedExpert in fp32), so in bf16 logits and cache are
    bit-identical (fp32: to rounding, as for any fp32 model); and behind a wrapper the experts run through
    the backend with the same numbers."""
    from offload.trace import TraceRecorder, TracingExperts
    from quant.native import MAT_GGML, MAT_STACK

    net = localglm.load(str(KQUANT_MIX), dtype=dtype).net
    fused = net._fused_decoder()
    assert fused is not None and fused._experts_in_ram()[1] is not None  # the whole token in one call
    assert {layer.desc.qkv.kind for layer in fused.layers} == {MAT_STACK} and {layer.desc.gate_up.kind for layer in fused.layers} == {MAT_GGML}
    prompt = [5, 17, 200, 3, 99, 42, 7, 478, 480, 300, 11, 250, 64, 9]
    inside, torch_layers = _decode(net, True, prompt), _decode(net, False, prompt)
    cfg = net.cfg
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    net.experts = TracingExperts(net.experts, TraceRecorder(cfg.n_routed_experts, cfg.num_experts_per_tok, moe_layers))
    assert fused._experts_in_ram()[1] is None
    through = _decode(net, True, prompt)
    for a, b, c in zip(inside, torch_layers, through):
        assert torch.equal(a, c)
        if dtype == "bfloat16":
            assert torch.equal(a, b)
        else:  # fp32 attention sums in another order than torch's (test_fp32_fused_decode_matches_to_rounding)
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert inside[0].abs().max() > 0


def _cache_tensors(cache: object) -> list[torch.Tensor]:
    return [t.clone() for t in vars(cache).values() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("kind", ["bf16", "fp32", "q4-experts", "mla", "dsa", "offloaded"])
def test_the_decode_loops_one_call_step_is_the_general_paths_numbers(tmp_path: Path, kind: str) -> None:
    """MoeDecoder.next_token_logits (the plain decode loop's step; FusedDecoder.token_logits where it takes
    the call, else the general path) against lm_head(hidden_states(...)): the same logits and cache, bit for bit,
    DSA's shared picks and offloaded experts (through their backend) included."""
    from localglm.models.glm4_moe_lite.tiny import TinySpec as LiteSpec
    from localglm.models.glm_moe_dsa.tiny import TinySpec as DsaSpec

    spec = {"mla": LiteSpec(), "dsa": DsaSpec(), "fp32": TinySpec(dtype="float32")}.get(kind, TinySpec())
    load = {"q4-experts": dict(experts_bits=4), "offloaded": dict(offload="sim", gpu_mem="3200KiB", mtp=False)}.get(kind, {})
    net = localglm.load(str(make_tiny(tmp_path / kind, spec)), **load).net
    fused = net._fused_decoder()
    ids = torch.tensor([PROMPT])
    runs = []
    for one_call in (True, False):
        cache = net.new_cache(64)
        with torch.inference_mode():
            net.hidden_states(ids[:, :4], cache, 0)
            steps = []
            for p in range(4, len(PROMPT)):
                if one_call:
                    steps.append(net.next_token_logits(PROMPT[p], cache, p))
                else:
                    steps.append(net.lm_head(net.hidden_states(ids[:, p : p + 1], cache, p)[0, -1]))
        runs.append((torch.stack(steps), _cache_tensors(cache)))
    (a, ca), (b, cb) = runs
    assert a.dtype == b.dtype and torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(ca, cb, strict=True))
    took = fused is not None and fused.token_logits(PROMPT[0], net.new_cache(8), 0, net._head_product()) is not None
    assert took  # every kind here takes the trimmed path (it runs forward_stream, as the general path does)
