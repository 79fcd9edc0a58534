"""glm_moe_dsa's fused native decode (MLA over the DSA indexer's top-k: models/glm_moe_dsa/fused_decode.py,
mla_attention.c, dsa_indexer.c) against its torch decode path, and the native indexer against torch's.

The standards are tests/test_fused_decode_mla.py's: the torch decode path runs the same native
kernels for one token (the absorbed attention, the indexer's key, scores and top-k), so a quantized
model's logits, latent cache and indexer-key cache are bit-identical, bf16 to the dtype's rounding,
fp32 to 1e-5; and against the torch ops alone (no native kernel: torch's scores, torch.topk) fp32 to
1e-5 with the same rows picked. The prompts outgrow `index_topk` during decode, and the layer
patterns have shared layers (IndexShare), so every path picks, shares and attends sparsely.
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import Any

import pytest
import torch

import localglm
from localglm.layers import dsa, mla
from localglm.layers.dsa import IndexerShape, IndexerWeights, select_tokens, select_topk, index_scores
from localglm.layers.native import ATTN_DSA, LayerLib, build_layers, native
from localglm.layers.rope import Rotary
from localglm.models.glm_moe_dsa.fused_decode import FusedDecoder
from localglm.models.glm_moe_dsa.tiny import TinySpec
from localglm.tiny import make_tiny
from quant.native import CFLAGS, NativeLib, _compiler, build, native_lib

pytestmark = pytest.mark.skipif(native_lib() is None, reason="no C compiler: the native kernels cannot be built")

PORTABLE_FLAGS = tuple(f for f in CFLAGS if not f.startswith("-march")) + ("-mno-avx2",) * (platform.machine() in ("x86_64", "AMD64"))
PROMPT = torch.randint(0, 512, (26,), generator=torch.Generator().manual_seed(11)).tolist()
PREFILL = 3  # then 23 decoded tokens, past every shape's index_topk
SHAPES = {
    "FSFS": dict(num_hidden_layers=4, indexer_pattern="FSFS", index_topk=6, seed=3),
    "FSSF-wide-bias": dict(
        num_hidden_layers=4, first_k_dense_replace=2, indexer_pattern="FSSF", index_n_heads=6, index_head_dim=24, index_topk=7,
        kv_lora_rank=48, qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=20, attention_bias=True, seed=5,
    ),
    "all-full": dict(index_topk=5, seed=1),
}  # fmt: skip


def _net(tmp_path: Path, name: str, load: dict | None = None, **spec: Any) -> Any:
    return localglm.load(str(make_tiny(tmp_path / name, TinySpec(**spec))), **(load or {})).net


def _fused(net: Any) -> FusedDecoder:
    fused = net._fused_decoder()
    assert isinstance(fused, FusedDecoder) and all(layer.desc.attn_kind == ATTN_DSA for layer in fused.layers)
    assert [bool(layer.desc.dsa) for layer in fused.layers] == [t == "full" for t in net.cfg.indexer_types]
    return fused


def _decode(net: Any, fused: bool, prompt: list[int] = PROMPT, prefill: int = PREFILL) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of each decoded position, the latent cache and the indexer-key cache, decoding prompt[prefill:] one token at a time.
    The prompt goes through the torch ops either way: these tests compare the one-token paths from
    the same cache (multi-token forwards: tests/test_fused_prefill.py)."""
    net.fused_decode, net.fused_prefill = fused, False
    ids, cache = torch.tensor([prompt]), net.new_cache(32)
    with torch.inference_mode():
        net.hidden_states(ids[:, :prefill], cache, 0)
        logits = [net.lm_head(net.hidden_states(ids[:, p : p + 1], cache, p)[0, -1]).float() for p in range(prefill, len(prompt))]
    return torch.stack(logits), cache.kv.clone(), cache.index_keys.clone()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("load", [dict(experts_bits=4, attn_bits=8), dict(experts_bits=4, attn_bits=8, indexer_bits=8)], ids=["q", "q-indexer"])
def test_quantized_fused_decode_is_bit_identical(tmp_path: Path, shape: str, load: dict) -> None:
    net = _net(tmp_path, "q", load, **SHAPES[shape])
    fused = _fused(net)
    full = next(layer.desc.dsa.contents for layer in fused.layers if layer.desc.dsa)
    assert full.wq_b.kind == (0 if "indexer_bits" in load else 1)  # the indexer kept in bf16 by default, packed when quantized
    for a, b in zip(_decode(net, True), _decode(net, False)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_fused_decode_matches_the_torch_ops(tmp_path: Path, shape: str) -> None:
    net = _net(tmp_path, shape, **SHAPES[shape])
    _fused(net)
    (a, ka, ia), (b, kb, ib) = _decode(net, True), _decode(net, False)
    assert (a - b).abs().max() <= 0.02 * b.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    for x, y in ((ka, kb), (ia, ib)):  # one bf16 ulp at most
        assert torch.allclose(x.float(), y.float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_fused_decode_matches_the_torch_ops_alone(tmp_path: Path, shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """In fp32 the native indexer (keys, fp32 scores, top-k) and attention agree with torch's own ops
    -- index_scores, torch.topk, the absorbed form's bmm -- to rounding, picking the same rows (a
    different pick would move the logits far more than 1e-5)."""
    net = _net(tmp_path, "f32", dict(dtype="float32"), **SHAPES[shape])
    _fused(net)
    a, ka, ia = _decode(net, True)
    monkeypatch.setattr(dsa, "_kernel", lambda *args: None)
    monkeypatch.setattr(mla, "_native_absorbed", lambda *args: None)
    b, kb, ib = _decode(net, False)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert (ka - kb).abs().max() <= 1e-5 and (ia - ib).abs().max() <= 1e-5
    assert not torch.equal(a, torch.zeros_like(a))


@pytest.mark.parametrize("dtype, load", [("bfloat16", {}), ("float32", {}), ("bfloat16", dict(experts_bits=4, attn_bits=8))])
def test_the_per_layer_path_gives_the_whole_token_calls_numbers(tmp_path: Path, dtype: str, load: dict) -> None:
    """Behind a wrapper (the routing tracer) every layer is its own native call, and a shared layer
    reads the pick the full layer before it left in the driver's buffer between calls: the same
    logits and caches, bit for bit, as the one-call-per-token path, and the wrapper sees every MoE
    layer of every decoded token."""
    from offload.trace import TraceRecorder, TracingExperts

    net = _net(tmp_path, "ram", dict(load, dtype=dtype), **SHAPES["FSSF-wide-bias"])
    fused = _fused(net)
    assert fused._experts_in_ram()[1] is not None  # the whole token in one call
    inside = _decode(net, True)
    cfg = net.cfg
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    rec = TraceRecorder(cfg.n_routed_experts, cfg.num_experts_per_tok, moe_layers)
    net.experts = TracingExperts(net.experts, rec)
    assert fused._experts_in_ram()[1] is None  # a wrapper: per layer
    through = _decode(net, True)
    for a, b in zip(inside, through):
        assert torch.equal(a, b)
    rec.flush()
    assert len(rec.trace.calls) == len(moe_layers) * (len(PROMPT) - PREFILL + 1)  # the prefill call, then each decoded token


def test_decode_crosses_index_topk_from_dense_to_sparse(tmp_path: Path) -> None:
    """While the context fits index_topk nothing is scored and the fused decode is the dense model's,
    bit for bit; past it the pick matters (the dense model's logits move away) and the fused decode
    still gives the torch path's bits."""
    spec = SHAPES["FSFS"]
    net = _net(tmp_path, "cross", dict(experts_bits=4, attn_bits=8), **spec)
    _fused(net)
    sparse, torch_path = _decode(net, True), _decode(net, False)
    net.index_shape = dataclasses.replace(net.index_shape, topk=1000)
    assert not net._fused_decoder().takes(torch.tensor([[1]]), net.new_cache(32))  # described with the old top-k: torch's path
    net._fused = False  # describe the layers again, dense
    _fused(net)
    dense = _decode(net, True)
    fits = spec["index_topk"] - PREFILL  # decoded positions PREFILL..index_topk-1: contexts of at most index_topk
    assert torch.equal(sparse[0][:fits], dense[0][:fits])
    assert (sparse[0][fits:] - dense[0][fits:]).abs().amax(-1).min() > 0  # every later step reads a pick
    for a, b in zip(sparse, torch_path):
        assert torch.equal(a, b)


def test_fused_decode_refuses_a_full_cache(tmp_path: Path) -> None:
    net = _net(tmp_path, "full", **SHAPES["FSFS"])
    fused = _fused(net)
    cache = net.new_cache(8)
    assert fused.takes(torch.tensor([[3]]), cache) and not fused.takes(torch.tensor([[3]]), net.new_cache(8, batch=2))
    with torch.inference_mode():
        net.hidden_states(torch.tensor([PROMPT[:8]]), cache, 0)
        with pytest.raises(ValueError, match="KV cache overflow"):
            net.hidden_states(torch.tensor([[3]]), cache, 8)


def test_the_portable_build_decodes_as_the_torch_ops(tmp_path: Path) -> None:
    """The scalar loops a CPU without AVX2 runs (the indexer's scores, vec_mat, lg_attend): both
    libraries built without -march=native decode as the torch ops do, to bf16 rounding."""
    (tmp_path / "portable").mkdir()
    quant = NativeLib(build(_compiler(), PORTABLE_FLAGS, tmp_path / "portable"))
    assert not quant.avx2
    net = _net(tmp_path, "model", dict(experts_bits=4), **SHAPES["FSSF-wide-bias"])
    fused = _fused(net)
    fused.lib = LayerLib(build_layers(_compiler(), quant.path, PORTABLE_FLAGS), quant)
    (a, ka, ia), (b, kb, ib) = _decode(net, True), _decode(net, False)
    assert (a - b).abs().max() <= 0.02 * b.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert torch.allclose(ka.float(), kb.float(), rtol=2**-7, atol=1e-6) and torch.allclose(ia.float(), ib.float(), rtol=2**-7, atol=1e-6)


def _indexer(heads: int, head_dim: int, hidden: int, q_lora: int, dtype: torch.dtype, seed: int) -> IndexerWeights:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dtype)

    return IndexerWeights(rand(heads * head_dim, q_lora), rand(head_dim, hidden), 1 + rand(head_dim), rand(head_dim),
                          (torch.randn(heads, hidden, generator=g) / hidden**0.5))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("keys, topk", [(200, 3), (1000, 15), (3000, 40), (500, 100), (2000, 1500), (300, 299), (64, 1)])
def test_ties_are_broken_as_torch_topk_breaks_them(keys: int, topk: int, dtype: torch.dtype) -> None:
    """Equal scores: the native pick keeps exactly the positions torch.topk keeps -- not "the lower
    index first": torch's CPU topk runs std::partial_sort when 64 k <= keys (the first and third
    cases here) and std::nth_element otherwise, and which of several equal scores survive depends on
    where those algorithms meet them; the kernel replays both. Keys k_s = a_s * u with a_s in {0, +-1,
    +-2, +-4}: every score is one of a few values, computed exactly alike in torch and natively
    (scaling by a power of two commutes with rounding), so the ties are the same in both; a_s = 0
    for every key makes every score 0, the tie a model produces when ReLU zeroes every head."""
    shape = IndexerShape(heads=4, head_dim=16, rope_dim=8, topk=topk)
    w = _indexer(shape.heads, shape.head_dim, 32, 24, dtype, seed=keys + topk)
    g = torch.Generator().manual_seed(keys)
    x, q_resid = torch.randn(1, 1, 32, generator=g).to(dtype), torch.randn(1, 1, 24, generator=g).to(dtype)
    cos, sin = Rotary(shape.rope_dim, 10_000.0).cos_sin(torch.tensor([keys]), dtype)
    u = torch.randn(shape.head_dim, generator=g).to(dtype)
    levels = torch.tensor([0.0, 1, 2, 4, -1, -2, -4])
    for pattern in ("levels", "zero", "two"):
        if pattern == "levels":
            a = levels[torch.randint(0, len(levels), (keys,), generator=g)]
        elif pattern == "zero":
            a = torch.zeros(keys)
        else:  # one value, then another: the boundary falls inside a run of equal scores
            a = torch.where(torch.rand(keys, generator=g) < 0.5, 1.0, 2.0)
        k = (a[:, None] * u.float()).to(dtype)[None]
        picked = select_tokens(x, q_resid, k, w, shape, cos, sin, keys)
        assert picked.dtype == torch.int32  # the native kernel's (torch's path returns int64)
        ref = select_topk(index_scores(x, q_resid, k, w, shape, cos, sin), keys, topk)
        assert picked.flatten().tolist() == sorted(ref.flatten().tolist()), pattern


def test_the_indexer_kernel_refuses_what_it_does_not_take() -> None:
    """A batch, a GPU-less float16 model, a key cache in another layout: torch's indexer runs."""
    shape = IndexerShape(heads=2, head_dim=16, rope_dim=8, topk=4)
    w = _indexer(2, 16, 32, 24, torch.bfloat16, seed=0)
    assert w.native_view(shape, torch.float16) is None
    view = w.native_view(shape, torch.bfloat16)
    assert view is not None and w.native_view(shape, torch.bfloat16) is view  # described once
    lib = native()
    cos, sin = Rotary(8, 10_000.0).cos_sin(torch.tensor([20]), torch.bfloat16)
    x, q = torch.randn(2, 1, 32).bfloat16(), torch.randn(2, 1, 24).bfloat16()
    keys = torch.randn(1, 20, 16).bfloat16()
    assert lib.dsa_index_key(view.desc, x, cos, sin) is None
    assert lib.dsa_topk(view.desc, x[:1], q[:1], keys.transpose(1, 2).contiguous().transpose(1, 2), cos, sin) is None
    assert lib.dsa_topk(view.desc, x[:1], q[:1], keys, cos, sin).shape == (1, 1, 4)
