"""glm4_moe_lite's fused native decode (multi-head latent attention in decode_layer.c's layer,
models/glm4_moe_lite/fused_decode.py) against its torch decode path (layers/mla.py's absorbed form).

The standards are tests/test_fused_decode.py's: quantized logits and latent cache bit-identical,
bf16 to the dtype's rounding, fp32 to 1e-5. Quantized projections run through the same kernel
either way, and so does the absorbed attention (q_nope . W_UK, the attention, o_lat . W_UV): the
torch decode path calls the fused layer's own native core for one token, as GQA's does, so no fp32
sum is ordered differently between the two (torch's bmm order did round a value one bf16 ulp
apart now and then on larger models: test_one_kernel_keeps_a_long_decode_identical).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import pytest
import torch

import localglm
from localglm.layers import mla
from localglm.layers.kv_cache import KVCache
from localglm.layers.native import ATTN_MLA, LayerLib, build_layers
from localglm.models.glm4_moe_lite.fused_decode import FusedDecoder
from localglm.models.glm4_moe_lite.tiny import TinySpec
from localglm.tiny import make_tiny
from quant.native import CFLAGS, NativeLib, _compiler, build, native_lib

pytestmark = pytest.mark.skipif(native_lib() is None, reason="no C compiler: the native kernels cannot be built")

# The portable C path (what a CPU without AVX2 runs), built without -march=native.
PORTABLE_FLAGS = tuple(f for f in CFLAGS if not f.startswith("-march")) + ("-mno-avx2",) * (platform.machine() in ("x86_64", "AMD64"))
PROMPT = [1, 5, 9, 33, 7, 100, 3, 200, 17, 42, 8, 300, 64, 2]
SHAPES = {
    "default": {},
    "q_proj-bias-neox": dict(q_lora_rank=0, attention_bias=True, rope_interleave=False, seed=1),
    "wide-groups-two-shared": dict(
        num_attention_heads=6, kv_lora_rank=76, qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=20,
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=2, seed=2,
    ),
}  # fmt: skip


def _decode(net: Any, fused: bool, prefill: int = 4, prompt: list[int] = PROMPT) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of each decoded position and the latent cache, decoding prompt[prefill:] one token at a time.
    The prompt goes through the torch ops either way: these tests compare the one-token paths from
    the same cache (multi-token forwards: tests/test_fused_prefill.py)."""
    net.fused_decode, net.fused_prefill = fused, False
    ids, cache = torch.tensor([prompt]), net.new_cache(max(64, len(prompt)))
    with torch.inference_mode():
        net.hidden_states(ids[:, :prefill], cache, 0)
        logits = [net.lm_head(net.hidden_states(ids[:, p : p + 1], cache, p)[0, -1]).float() for p in range(prefill, len(prompt))]
    return torch.stack(logits), cache.kv.clone()


def _net(tmp_path: Path, name: str, load: dict | None = None, **spec: Any) -> Any:
    return localglm.load(str(make_tiny(tmp_path / name, TinySpec(**spec))), **(load or {})).net


def _fused(net: Any) -> FusedDecoder:
    fused = net._fused_decoder()
    assert isinstance(fused, FusedDecoder) and all(layer.desc.attn_kind == ATTN_MLA for layer in fused.layers)
    return fused


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_fused_decode_matches_the_torch_ops(tmp_path: Path, shape: str) -> None:
    net = _net(tmp_path, shape, **SHAPES[shape])
    _fused(net)
    (a, ka), (b, kb) = _decode(net, True), _decode(net, False)
    assert (a - b).abs().max() <= 0.02 * b.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert torch.allclose(ka.float(), kb.float(), rtol=2**-7, atol=1e-6)  # one bf16 ulp at most
    assert kb[:, :, len(PROMPT) - 1].abs().sum() > 0  # the last decoded token's rows were written


@pytest.mark.parametrize(
    "shape, bits",
    [
        ("default", dict(experts_bits=4, attn_bits=8)),
        ("q_proj-bias-neox", dict(experts_bits=4, attn_bits=8)),
        ("default", dict(experts_bits=8)),
        ("wide-groups-two-shared", dict(experts_bits=2, attn_bits=4, shared_bits=4, dense_bits=4)),
    ],
)
def test_quantized_fused_decode_is_bit_identical(tmp_path: Path, shape: str, bits: dict) -> None:
    net = _net(tmp_path, "q", bits, **SHAPES[shape])
    fused = _fused(net)
    assert all(layer.desc.mla.contents.q_b.kind == 0 for layer in fused.layers)  # quantized attention read packed
    a, b = _decode(net, True), _decode(net, False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_one_kernel_keeps_a_long_decode_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model big enough for the sums' order to matter (hidden 256, kv_lora 128, 250 tokens of
    context, bf16, quantized projections): 50 decoded tokens give the same logits and cache bit for
    bit through either path, because both run one native attention core. With torch's own absorbed
    form on the torch path (its bmm order) they do not: the identity is by construction, not luck."""
    spec = dict(hidden_size=256, kv_lora_rank=128, q_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, seed=7)
    net = _net(tmp_path, "long", dict(experts_bits=4, attn_bits=8), **spec)
    _fused(net)
    prompt = torch.randint(0, net.cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    (a, ka), (b, kb) = _decode(net, True, 250, prompt), _decode(net, False, 250, prompt)
    assert a.shape[0] == 50 and torch.equal(a, b) and torch.equal(ka, kb)
    monkeypatch.setattr(mla, "_native_absorbed", lambda *args: None)  # the torch decode path with torch's bmm
    c, kc = _decode(net, False, 250, prompt)
    # The logits differ on every CPU seen; the cache did too until a Xeon with AMX, whose oneDNN projections
    # round the 50 cached latents alike either way (the cache holds projections, not the attention core's sums).
    assert not torch.equal(a, c)


@pytest.mark.parametrize("shape", ["default", "q_proj-bias-neox"])
def test_fp32_fused_decode_matches_to_rounding(tmp_path: Path, shape: str) -> None:
    net = _net(tmp_path, "f32", dtype="float32", **SHAPES[shape])
    _fused(net)
    (a, ka), (b, kb) = _decode(net, True), _decode(net, False)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert (ka - kb).abs().max() <= 1e-5
    assert not torch.equal(a, torch.zeros_like(a))


@pytest.mark.parametrize("dtype, load", [("bfloat16", {}), ("float32", {}), ("bfloat16", dict(experts_bits=4))])
def test_the_per_layer_path_gives_the_whole_token_calls_numbers(tmp_path: Path, dtype: str, load: dict) -> None:
    """Experts in RAM run inside the one-call-per-token decode; behind a wrapper (the routing tracer)
    every layer is its own call and the wrapper gets hint / attended / forward for each MoE layer,
    with the inputs the torch path gives it. Both must give the same logits and cache bit for bit."""
    from offload.trace import TraceRecorder, TracingExperts

    net = _net(tmp_path, "ram", load, dtype=dtype, **SHAPES["wide-groups-two-shared"])
    fused = _fused(net)
    assert fused._experts_in_ram()[1] is not None  # the whole token in one call
    inside = _decode(net, True)
    cfg = net.cfg
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    seen: dict[bool, list[tuple[str, int, torch.Tensor]]] = {True: [], False: []}

    class Spy(TracingExperts):
        def hint(self, layer: int, x: torch.Tensor) -> None:
            seen[net.fused_decode].append(("hint", layer, x.detach().reshape(-1).clone()))
            super().hint(layer, x)

        def attended(self, layer: int, x: torch.Tensor) -> None:
            seen[net.fused_decode].append(("attended", layer, x.detach().reshape(-1).clone()))
            super().attended(layer, x)

    rec = TraceRecorder(cfg.n_routed_experts, cfg.num_experts_per_tok, moe_layers)
    net.experts = Spy(net.experts, rec)
    assert fused._experts_in_ram()[1] is None  # a wrapper: per layer, through hint / forward
    through = _decode(net, True)
    for a, b in zip(inside, through):
        assert torch.equal(a, b)
    rec.flush()
    assert len(rec.trace.calls) == len(moe_layers) * (len(PROMPT) - 4 + 1)  # the prefill call, then each decoded token
    _decode(net, False)
    fused_calls, torch_calls = ([c for c in seen[f] if c[2].numel() == cfg.hidden_size] for f in (True, False))  # decode steps, not prefill
    assert len(fused_calls) == len(torch_calls) == 2 * len(moe_layers) * (len(PROMPT) - 4)
    for (kind, layer, x), (kind_t, layer_t, x_t) in zip(fused_calls, torch_calls):
        assert (kind, layer) == (kind_t, layer_t)
        if load:  # quantized: the same numbers as the torch path's; float: to its rounding
            assert torch.equal(x, x_t)
        else:
            assert torch.allclose(x.float(), x_t.float(), rtol=2**-7, atol=1e-5)


def test_the_portable_build_decodes_as_the_torch_ops(tmp_path: Path) -> None:
    """The scalar loops a CPU without AVX2 runs (vec_mat's, lg_attend's): both libraries built
    without -march=native decode a quantized model as the torch ops do, to bf16 rounding."""
    (tmp_path / "portable").mkdir()
    quant = NativeLib(build(_compiler(), PORTABLE_FLAGS, tmp_path / "portable"))
    assert not quant.avx2
    net = _net(tmp_path, "model", dict(experts_bits=4), **SHAPES["wide-groups-two-shared"])
    fused = _fused(net)
    fused.lib = LayerLib(build_layers(_compiler(), quant.path, PORTABLE_FLAGS), quant)
    (a, ka), (b, kb) = _decode(net, True), _decode(net, False)
    assert (a - b).abs().max() <= 0.02 * b.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert torch.allclose(ka.float(), kb.float(), rtol=2**-7, atol=1e-6)


def test_fused_decode_takes_only_its_cache(tmp_path: Path) -> None:
    net = _net(tmp_path, "cache")
    fused = _fused(net)
    one = torch.tensor([[3]])
    assert fused.takes(one, net.new_cache(8))
    assert not fused.takes(one, KVCache(3, 1, 8, 8, net.dtype))  # a GQA cache
    assert not fused.takes(one, net.new_cache(8, batch=2))
    assert fused.takes(torch.tensor([[3, 4]]), net.new_cache(8))  # consecutive tokens of one sequence (tests/test_fused_prefill.py)
    assert not fused.takes(torch.tensor([[3], [4]]), net.new_cache(8, batch=2))  # two sequences


def test_fused_decode_refuses_a_full_cache(tmp_path: Path) -> None:
    net = _net(tmp_path, "full")
    _fused(net)
    cache = net.new_cache(4)
    with torch.inference_mode(), pytest.raises(ValueError, match="KV cache overflow"):
        net.hidden_states(torch.tensor([[3]]), cache, 4)


def test_weights_the_kernel_does_not_take_keep_the_torch_path(tmp_path: Path) -> None:
    """A weight in a layout the kernel does not read (here q_b transposed in memory, the same
    values) or a dtype it lacks (float16): no fused decoder, and decode runs the torch ops."""
    net = _net(tmp_path, "layout")
    attn = net.w.layers[1].attn
    attn.q_b = attn.q_b.t().contiguous().t()
    assert FusedDecoder.build(net) is None and net._fused_decoder() is None
    a, b = _decode(net, True), _decode(net, False)
    assert torch.equal(a[0], b[0])
    f16 = localglm.load(str(make_tiny(tmp_path / "f16", TinySpec(dtype="float16"))), dtype="float16").net
    assert FusedDecoder.build(f16) is None
    assert torch.isfinite(_decode(f16, True)[0]).all()


def test_greedy_generation_is_the_same_through_either_path(tmp_path: Path) -> None:
    model = localglm.load(str(make_tiny(tmp_path / "gen", TinySpec())), experts_bits=4, attn_bits=8)
    texts = []
    for fused in (True, False):
        model.net.fused_decode = fused
        texts.append(list(model.stream_tokens(PROMPT, max_new_tokens=24, sampling=localglm.SamplingParams(temperature=0), reuse_prefix=False)))
    assert texts[0] == texts[1] and len(texts[0]) == 24
