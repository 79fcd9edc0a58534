"""MLA attention (layers/mla.py) against transformers' Glm4MoeLiteAttention, and its two forms
(expanded prefill, absorbed decode) against each other, through the LatentCache."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import Glm4MoeLiteConfig
from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import (
    Glm4MoeLiteAttention,
    Glm4MoeLiteRotaryEmbedding,
    apply_rotary_pos_emb_interleave,
)

from localglm.layers.kv_cache import LatentCache
from localglm.layers import mla
from localglm.layers.mla import MLAShape, MLAWeights, absorbs, mla_attention
from localglm.layers.rope import Rotary, apply_rope, apply_rope_interleaved
from quant.formats import QuantSpec, QuantTensor

HIDDEN, HEADS, KV_LORA, NOPE, ROPE, V = 64, 4, 32, 16, 8, 12
THETA = 10000.0


def _config(q_lora: int | None, bias: bool, interleave: bool) -> Glm4MoeLiteConfig:
    return Glm4MoeLiteConfig(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        q_lora_rank=q_lora,
        kv_lora_rank=KV_LORA,
        qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE,
        v_head_dim=V,
        attention_bias=bias,
        rope_interleave=interleave,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
        rms_norm_eps=1e-5,  # deliberately not the latent norms' 1e-6
        attn_implementation="eager",
    )


def _reference(
    q_lora: int | None = 24, bias: bool = True, interleave: bool = True
) -> tuple[Glm4MoeLiteAttention, MLAWeights, MLAShape]:
    """transformers' attention with random weights, and the same weights as ours."""
    torch.manual_seed(0)
    cfg = _config(q_lora, bias, interleave)
    ref = Glm4MoeLiteAttention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "layernorm" in name:
                torch.nn.init.normal_(p, mean=1.0, std=0.2)  # not all ones, so a dropped norm weight shows
            else:
                torch.nn.init.normal_(p, std=0.5 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.1)
    d = {name: p.detach().clone() for name, p in ref.named_parameters()}
    w = MLAWeights(
        q_b=d["q_b_proj.weight"] if q_lora else d["q_proj.weight"],
        kv_a=d["kv_a_proj_with_mqa.weight"],
        kv_a_norm=d["kv_a_layernorm.weight"],
        kv_b=d["kv_b_proj.weight"],
        o=d["o_proj.weight"],
        q_a=d.get("q_a_proj.weight"),
        q_a_norm=d.get("q_a_layernorm.weight"),
        q_a_bias=d.get("q_a_proj.bias"),
        kv_a_bias=d.get("kv_a_proj_with_mqa.bias"),
        o_bias=d.get("o_proj.bias"),
    )
    assert (w.kv_a_bias is not None) == bias and (w.o_bias is not None) == bias
    assert (w.q_a_bias is not None) == (bias and q_lora is not None)
    assert "q_b_proj.bias" not in d and "q_proj.bias" not in d and "kv_b_proj.bias" not in d
    eps = ref.kv_a_layernorm.variance_epsilon
    shape = MLAShape(HEADS, q_lora, KV_LORA, NOPE, ROPE, V, scale=ref.scaling, latent_eps=eps, rope_interleave=interleave)
    return ref, w, shape


def _rope(start: int, n: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return Rotary(ROPE, THETA).cos_sin(torch.arange(start, start + n), dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _run_reference(ref: Glm4MoeLiteAttention, x: torch.Tensor) -> torch.Tensor:
    bsz, n, _ = x.shape
    pos = torch.arange(n)[None].expand(bsz, -1)
    cos, sin = Glm4MoeLiteRotaryEmbedding(ref.config)(x, pos)
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None].expand(bsz, 1, n, n)
    with torch.no_grad():
        return ref(x, (cos, sin), mask)[0]


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("q_lora", [24, None])
def test_matches_transformers(q_lora: int | None, bias: bool, interleave: bool) -> None:
    ref, w, shape = _reference(q_lora, bias, interleave)
    assert shape.latent_eps == 1e-6 and shape.scale == (NOPE + ROPE) ** -0.5
    torch.manual_seed(1)
    x = torch.randn(2, 9, HIDDEN)
    want = _run_reference(ref, x)
    cos, sin = _rope(0, 9)
    assert _rel(mla_attention(x, w, shape, cos, sin), want) < 1e-6
    cache = LatentCache(1, KV_LORA, ROPE, 16, torch.float32, batch=2)
    assert _rel(mla_attention(x, w, shape, cos, sin, cache), want) < 1e-6  # 9 tokens: expanded


@pytest.mark.parametrize("bias", [True, False])
def test_latent_norms_use_their_own_eps(bias: bool) -> None:
    """transformers builds q_a/kv_a_layernorm with eps 1e-6 whatever rms_norm_eps says (1e-5 here);
    small inputs make the difference visible, so passing rms_norm_eps instead would fail."""
    ref, w, shape = _reference(bias=bias)
    torch.manual_seed(1)
    x = torch.randn(1, 9, HIDDEN) * 0.05
    want = _run_reference(ref, x)
    cos, sin = _rope(0, 9)
    assert _rel(mla_attention(x, w, shape, cos, sin), want) < 1e-6
    assert _rel(mla_attention(x, w, replace(shape, latent_eps=1e-5), cos, sin), want) > 1e-4


def test_rotary_tables_match_transformers() -> None:
    """transformers' rope dim is head_dim -> qk_rope_head_dim (partial_rotary_factor 1.0)."""
    ref, _, _ = _reference()
    pos = torch.arange(11)
    cos, sin = Glm4MoeLiteRotaryEmbedding(ref.config)(torch.zeros(1), pos[None])
    ours = _rope(0, 11)
    assert cos.shape == (1, 11, ROPE)
    assert torch.equal(cos[0], ours[0]) and torch.equal(sin[0], ours[1])


def test_interleaved_rope_is_transformers_and_neox_on_deinterleaved_dims() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, ROPE), torch.randn(2, 1, 5, ROPE)
    cos, sin = _rope(7, 5)
    want_q, want_k = apply_rotary_pos_emb_interleave(q, k, cos[None], sin[None])
    assert torch.equal(apply_rope_interleaved(q, cos, sin), want_q)
    assert torch.equal(apply_rope_interleaved(k, cos, sin), want_k)
    perm = torch.cat((torch.arange(0, ROPE, 2), torch.arange(1, ROPE, 2)))  # pairs (2i, 2i+1) -> halves
    assert torch.equal(apply_rope(q[..., perm], cos, sin), want_q)


def _prefilled(w: MLAWeights, shape: MLAShape, n: int, seed: int = 2) -> tuple[LatentCache, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(1, n, HIDDEN)
    cache = LatentCache(2, KV_LORA, ROPE, 32, torch.float32)
    mla_attention(x, w, shape, *_rope(0, n), cache, layer=1)
    return cache, x


@pytest.mark.parametrize("interleave", [True, False])
def test_absorbed_equals_expanded(interleave: bool) -> None:
    _, w, shape = _reference(interleave=interleave)
    cache, _ = _prefilled(w, shape, 12)
    torch.manual_seed(3)
    for start, n in [(0, 1), (3, 1), (12, 1), (12, 4), (20, 1)]:  # one token, and a speculative chunk
        x = torch.randn(1, n, HIDDEN)
        cos, sin = _rope(start, n)
        a = mla_attention(x, w, shape, cos, sin, cache, 1, start, absorbed=True)
        b = mla_attention(x, w, shape, cos, sin, cache, 1, start, absorbed=False)  # rewrites the same rows
        assert _rel(a, b) < 1e-6, (start, n)
    # and without a cache, on a multi-token causal forward
    x = torch.randn(2, 6, HIDDEN)
    cos, sin = _rope(0, 6)
    assert _rel(mla_attention(x, w, shape, cos, sin, absorbed=True), mla_attention(x, w, shape, cos, sin)) < 1e-6


def test_the_form_follows_the_cost_after_cached_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """A few tokens: absorbed. A prompt's first chunk: expanded (transformers' rounding). More tokens after
    cached context on a CPU: absorbed while its products cost less than expanding every cached latent
    again, which they do up to ~145 new tokens on GLM-5's head dimensions in bf16 through torch's absorbed form
    (DSA's selections), ~325 through the native latent kernel, ~390 in fp32."""
    glm5 = MLAShape(64, 2048, 512, 192, 64, 256, scale=0.07, latent_eps=1e-6, rope_interleave=True)
    bf16, fp32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    assert absorbs(glm5, 1, 1, bf16) and absorbs(glm5, 16, 16, bf16)  # decode, drafts: always
    assert not absorbs(glm5, 100, 100, bf16)  # a first chunk
    assert [absorbs(glm5, t, 20_000 + t, bf16) for t in (37, 100, 140, 150, 512)] == [True, True, True, False, False]
    kernel = [absorbs(glm5, t, 20_000 + t, bf16, latent_kernel=True) for t in (37, 150, 320, 340, 512)]
    assert kernel == [True, True, True, False, False]
    assert not absorbs(glm5, 150, 20_150, torch.zeros(2, 1, dtype=torch.bfloat16), latent_kernel=True)  # a batch: torch's form
    assert absorbs(glm5, 380, 20_380, fp32) and not absorbs(glm5, 400, 20_400, fp32)
    # the default path after cached context is the absorbed one, and equals the expanded form
    _, w, shape = _reference()
    torch.manual_seed(5)
    x = torch.randn(1, 220, HIDDEN)
    taken: list[bool] = []
    real = mla.absorbs
    monkeypatch.setattr(mla, "absorbs", lambda *a, **kw: taken.append(real(*a, **kw)) or taken[-1])
    cache = LatentCache(1, KV_LORA, ROPE, 220, torch.float32)
    first = mla_attention(x[:, :200], w, shape, *_rope(0, 200), cache)
    rest = mla_attention(x[:, 200:], w, shape, *_rope(200, 20), cache, start=200)
    assert taken == [False, True]
    expanded = mla_attention(x[:, 200:], w, shape, *_rope(200, 20), cache, start=200, absorbed=False)
    assert _rel(rest, expanded) < 1e-6 and _rel(torch.cat((first, rest), 1), mla_attention(x, w, shape, *_rope(0, 220))) < 1e-6


@pytest.mark.parametrize("q_lora", [24, None])
def test_incremental_decode_and_chunked_prefill(q_lora: int | None) -> None:
    ref, w, shape = _reference(q_lora, bias=True)
    torch.manual_seed(4)
    n, k = 14, 5
    x = torch.randn(1, n, HIDDEN)
    full = mla_attention(x, w, shape, *_rope(0, n))
    assert _rel(full, _run_reference(ref, x)) < 1e-6

    cache = LatentCache(1, KV_LORA, ROPE, n, torch.float32)
    steps = [mla_attention(x[:, :k], w, shape, *_rope(0, k), cache)]
    for t in range(k, n):  # one token at a time: the absorbed form (default for T=1 with a cache)
        steps.append(mla_attention(x[:, t : t + 1], w, shape, *_rope(t, 1), cache, start=t))
    assert _rel(torch.cat(steps, dim=1), full) < 1e-6

    cache = LatentCache(1, KV_LORA, ROPE, n, torch.float32)
    a = mla_attention(x[:, :k], w, shape, *_rope(0, k), cache, absorbed=False)
    b = mla_attention(x[:, k:], w, shape, *_rope(k, n - k), cache, start=k, absorbed=False)
    assert _rel(torch.cat((a, b), dim=1), full) < 1e-6


def test_allowed_keys_restrict_attention() -> None:
    """DSA's selection: integer positions and the equivalent mask agree, in both forms, and differ
    from dense attention; allowing everything is dense attention."""
    _, w, shape = _reference()
    cache, _ = _prefilled(w, shape, 10)
    torch.manual_seed(5)
    x = torch.randn(1, 2, HIDDEN)
    cos, sin = _rope(10, 2)
    idx = torch.tensor([[[0, 3, 7, 10], [1, 3, 11, 9]]])  # each query keeps 4 of its 11 or 12 keys
    mask = torch.zeros(1, 2, 12, dtype=torch.bool).scatter_(-1, idx, True)
    outs = [mla_attention(x, w, shape, cos, sin, cache, 1, 10, allowed=a, absorbed=f) for a in (idx, mask) for f in (True, False)]
    for o in outs[1:]:
        assert _rel(o, outs[0]) < 1e-6
    dense = mla_attention(x, w, shape, cos, sin, cache, 1, 10)
    assert _rel(outs[0], dense) > 1e-2
    everything = torch.ones(1, 2, 12, dtype=torch.bool)  # causality still applies on top
    assert _rel(mla_attention(x, w, shape, cos, sin, cache, 1, 10, allowed=everything), dense) < 1e-6


def test_bf16_close_to_fp32() -> None:
    _, w, shape = _reference()
    cache32, x = _prefilled(w, shape, 12)
    w16 = MLAWeights(**{k: None if v is None else v.bfloat16() for k, v in vars(w).items() if not k.startswith("_")})
    cache16 = LatentCache(2, KV_LORA, ROPE, 32, torch.bfloat16)
    prefill = mla_attention(x.bfloat16(), w16, shape, *_rope(0, 12, torch.bfloat16), cache16, layer=1)
    assert prefill.dtype == torch.bfloat16 and cache16.kv.dtype == torch.bfloat16
    assert _rel(prefill, mla_attention(x, w, shape, *_rope(0, 12))) < 1.5e-2
    torch.manual_seed(6)
    xt = torch.randn(1, 1, HIDDEN)
    want = mla_attention(xt, w, shape, *_rope(12, 1), cache32, 1, 12)
    for absorbed in (True, False):
        got = mla_attention(xt.bfloat16(), w16, shape, *_rope(12, 1, torch.bfloat16), cache16, 1, 12, absorbed=absorbed)
        assert got.dtype == torch.bfloat16 and _rel(got, want) < 1.5e-2


def test_quantized_kv_b_absorbed_once() -> None:
    """A QuantTensor kv_b: the absorbed form dequantizes it once into W_UK/W_UV and then equals the
    expanded form over the dequantized weight; the expanded form multiplies it packed (the native
    kernel quantizes activations to 8 bits, hence only a loose bound there)."""
    _, w, shape = _reference()
    qt = QuantTensor.quantize(w.kv_b, QuantSpec(8, 32), torch.float32)
    w.kv_b = qt
    cache, _ = _prefilled(w, shape, 8)
    wuk, wuv = w.absorbed(shape, torch.float32)
    dense = qt.dequantize(torch.float32).view(HEADS, NOPE + V, KV_LORA)
    assert torch.equal(wuk, dense[:, :NOPE]) and torch.equal(wuv, dense[:, NOPE:])
    assert w.absorbed(shape, torch.float32)[0] is wuk  # built once
    torch.manual_seed(7)
    x = torch.randn(1, 1, HIDDEN)
    cos, sin = _rope(8, 1)
    a = mla_attention(x, w, shape, cos, sin, cache, 1, 8, absorbed=True)
    packed = mla_attention(x, w, shape, cos, sin, cache, 1, 8, absorbed=False)
    w.kv_b = dense.reshape(HEADS * (NOPE + V), KV_LORA)
    assert _rel(a, mla_attention(x, w, shape, cos, sin, cache, 1, 8, absorbed=False)) < 1e-6
    assert _rel(a, packed) < 2e-2


def test_latent_cache_size_and_overflow() -> None:
    cache = LatentCache(3, 512, 64, 10, torch.bfloat16)
    assert cache.nbytes == 3 * 10 * (512 + 64) * 2  # GLM-4.7-Flash: 1152 bytes a token a layer
    small = LatentCache(1, KV_LORA, ROPE, 4, torch.float32)
    small.write(0, 0, torch.ones(1, 3, KV_LORA), torch.full((1, 3, ROPE), 2.0))
    lat, kr, allowed = small.read(0, 3)
    assert allowed is None and lat.shape == (1, 3, KV_LORA) and kr.shape == (1, 3, ROPE) and kr.eq(2).all()
    with pytest.raises(ValueError, match="KV cache overflow: position 5 > context 4"):
        small.write(0, 3, torch.ones(1, 2, KV_LORA), torch.ones(1, 2, ROPE))


@pytest.mark.parametrize("selected", [False, True], ids=["all-keys", "dsa-top-k"])
def test_one_token_bf16_attention_sums_in_fp32(selected: bool) -> None:
    """A decoded token's absorbed attention over bf16 latent rows (mla.py steps 1-5; on AVX512-BF16 the
    scores run on the cached rows themselves by vdpbf16ps: rows of 48 + 16 values, a multiple of 32) equals
    the steps done in float64 and rounded where the steps round, to a bf16 step here and there: the scores
    are fp32 sums, not rounded to bf16 (scores of +-30 would move the probabilities by ~10% if they were).
    21 cached rows (no multiple of the 8-row blocks); with DSA's selection, 9 of them in a scattered order."""
    lora, rope, nope, v, heads, n = 48, 16, 24, 20, 3, 21
    g = torch.Generator().manual_seed(5)
    shape = MLAShape(heads, None, lora, nope, rope, v, scale=1.0, latent_eps=1e-6, rope_interleave=False)
    kv_b = (torch.randn(heads * (nope + v), lora, generator=g) / lora**0.5).bfloat16()
    w = MLAWeights(q_b=torch.zeros(1), kv_a=torch.zeros(1), kv_a_norm=torch.zeros(1), kv_b=kv_b, o=torch.zeros(1))
    cache = LatentCache(1, lora, rope, 32, torch.bfloat16)
    cache.write(0, 0, torch.randn(1, n, lora, generator=g).bfloat16(), torch.randn(1, n, rope, generator=g).bfloat16())
    allowed = torch.tensor([[[17, 2, 9, 0, 20, 11, 5, 14, 8]]]) if selected else None
    latent, k_rope, allowed = cache.read(0, n, allowed)
    q_nope = (torch.randn(1, heads, 1, nope, generator=g) * 1.5).bfloat16()
    q_rope = (torch.randn(1, heads, 1, rope, generator=g) * 1.5).bfloat16()
    got = mla._native_absorbed(q_nope, q_rope, latent, k_rope, w, shape, allowed)
    if got is None:
        pytest.skip("no native kernels on this machine")
    w_uk, w_uv = (t.double() for t in w.absorbed(shape, torch.bfloat16))
    keys = allowed.reshape(-1) if selected else torch.arange(n)
    lat, kr = latent[0, keys].double(), k_rope[0, keys].double()
    q_lat = (q_nope[0, :, 0].double()[:, None] @ w_uk)[:, 0].bfloat16().double()  # [heads, lora]
    scores = q_lat @ lat.T + q_rope[0, :, 0].double() @ kr.T
    assert scores.abs().max() > 20  # large enough that bf16-rounded scores would show
    o_lat = (torch.softmax(scores, -1) @ lat).bfloat16().double()
    want = (o_lat[:, None] @ w_uv.transpose(1, 2))[:, 0].bfloat16()
    got = got.reshape(heads, v)
    step = (want.float().abs() * 2**-7).clamp_min(1e-30)
    assert ((got.float() - want.float()).abs() <= step + 1e-6).all(), (got.float() - want.float()).abs().max()
    assert (got == want).float().mean() >= 0.9


def test_several_queries_attend_the_rows_up_to_each_in_fp32() -> None:
    """An append's queries through the native latent attention (`LayerLib.mla_latent_attention`: one pass over
    the cached bf16 rows for every few queries, the scores on the rows as cached): T = 6 queries, the last 6
    of 21 rows, query t reading rows 0..15 + t; equal to the float64 steps rounded where they round, to a bf16
    step here and there."""
    from localglm.layers.native import native

    lib = native()
    if lib is None:
        pytest.skip("no native kernels on this machine")
    lora, rope, heads, n, T, scale = 48, 16, 3, 21, 6, 1.0
    g = torch.Generator().manual_seed(8)
    cache = LatentCache(1, lora, rope, 32, torch.bfloat16)
    cache.write(0, 0, torch.randn(1, n, lora, generator=g).bfloat16(), torch.randn(1, n, rope, generator=g).bfloat16())
    latent, k_rope, _ = cache.read(0, n, None)
    ql = (torch.randn(1, T, heads, lora + rope, generator=g) * 1.5).bfloat16()
    got = lib.mla_latent_attention(ql, latent, k_rope, scale)
    assert got is not None and got.shape == (1, T, heads, lora)
    rows = torch.cat((latent[0], k_rope[0]), dim=-1).double()  # [n, lora + rope]
    for t in range(T):
        seen = n - T + t + 1
        scores = ql[0, t].double() @ rows[:seen].T * scale  # [heads, seen]
        want = (torch.softmax(scores, -1) @ rows[:seen, :lora]).bfloat16()
        assert scores.abs().max() > 15  # large enough that bf16-rounded scores would show
        diff = (got[0, t].float() - want.float()).abs()
        assert (diff <= want.float().abs() * 2**-7 + 1e-6).all() and (got[0, t] == want).float().mean() >= 0.9, t
