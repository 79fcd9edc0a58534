"""quant/: formats, packing, kernels, expert blobs, recipes (no model involved)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quant.blob import ExpertBlobLayout, PreparedExpert, expert_forward, quantize_expert
from quant.formats import QuantError, QuantSpec, QuantTensor, layout, layout_nbytes, pack_codes, relative_error, unpack_codes
from quant.recipe import LayerOverride, Recipe

# Quantizing small tensors is overhead-bound: every test here runs on one thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(kind: str, n: int = 256, k: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "gauss":
        return torch.randn(n, k, generator=g) * 0.02
    # heavy tails: Student-t with 3 degrees of freedom, plus a few large outliers
    z = torch.randn(n, k, generator=g)
    chi = torch.randn(n, k, 3, generator=g).pow(2).sum(-1)
    w = z / (chi / 3).sqrt()
    w.view(-1)[torch.randint(0, n * k, (n * k // 1000,), generator=g)] *= 20
    return w * 0.02


# Upper bounds on ||W - deq(Q(W))|| / ||W||; measured values sit ~10-20% below.
BOUNDS = {("gauss", 8): 0.0055, ("gauss", 4): 0.08, ("gauss", 2): 0.32, ("heavy", 8): 0.0105, ("heavy", 4): 0.11, ("heavy", 2): 0.42}


def _rtn_error(w: torch.Tensor, bits: int, g: int = 32) -> float:
    """Round-to-nearest min/max asymmetric quantization, the baseline error minimisation must beat."""
    n, k = w.shape
    wg = w.view(n, -1, g)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    s = (hi - lo).clamp_min(1e-12) / (2**bits - 1)
    q = torch.round((wg - lo) / s).clamp(0, 2**bits - 1)
    return float(((q * s + lo).view(n, k) - w).norm() / w.norm())


@pytest.mark.parametrize("kind", ["gauss", "heavy"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_round_trip_error_bounds(kind: str, bits: int) -> None:
    w = _weights(kind)
    qt = QuantTensor.quantize(w, QuantSpec.for_bits(bits))
    err = relative_error(w, qt)
    assert err < BOUNDS[(kind, bits)], err
    if bits < 8:  # least-squares fitting beats round-to-nearest of min/max
        assert err < 0.95 * _rtn_error(w, bits)


def test_bits_per_weight_count_scales() -> None:
    assert QuantSpec.for_bits(4).bits_per_weight((4096, 1024)) == pytest.approx(4 + 16 / 32 + 64 / 1024)
    assert QuantSpec.for_bits(2).bits_per_weight((4096, 1024)) == pytest.approx(2 + 16 / 32 + 64 / 1024)
    assert QuantSpec.for_bits(8).bits_per_weight((4096, 1024)) == pytest.approx(8 + 16 / 32 + 32 / 1024)
    assert QuantSpec.parse("q8g64").bits_per_weight((4096, 1024)) == pytest.approx(8 + 16 / 64 + 32 / 1024)
    # at or under llama.cpp's Q4_K (4.5 + its Q6_K share in Q4_K_M) and Q2_K (2.625) at GLM widths
    assert QuantSpec.for_bits(2).bits_per_weight((1408, 4096)) < 2.625


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_and_layout_invariants(bits: int) -> None:
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 2**bits if bits < 8 else 256, (7, 64), generator=g, dtype=torch.int32).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (7, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits, 64), codes)
    if bits == 4:  # element 2j in the low nibble of byte j
        assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)
    spec = QuantSpec.for_bits(bits)
    lay = layout(spec, (7, 64))
    spans = sorted(lay.values())
    assert spans[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no gaps
    assert layout_nbytes(spec, (7, 64)) % 64 == 0
    qt = QuantTensor.quantize(torch.randn(7, 64), spec)
    assert qt.buf.numel() == layout_nbytes(spec, (7, 64)) and qt.buf.dtype == torch.uint8
    if bits < 8:
        assert int(qt.codes().max()) < 2**bits


def test_cat_rows_equals_quantizing_the_concatenation() -> None:
    a, b = torch.randn(40, 128), torch.randn(24, 128)
    for spec in map(QuantSpec.parse, ("q2", "q4", "q8", "q8g64")):
        cat = torch.cat([QuantTensor.quantize(a, spec), QuantTensor.quantize(b, spec)], 0)  # via __torch_function__
        whole = QuantTensor.quantize(torch.cat([a, b]), spec)
        assert isinstance(cat, QuantTensor) and cat.shape == (64, 128)
        assert torch.equal(cat.dequantize(torch.float32), whole.dequantize(torch.float32))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("rows", [1, 5, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_matches_dequantized_matmul(bits: int, rows: int, dtype: torch.dtype) -> None:
    w = torch.randn(96, 128)
    qt = QuantTensor.quantize(w, QuantSpec.for_bits(bits), dtype=dtype)
    x = torch.randn(rows, 128).to(dtype)
    bias = torch.randn(96)
    ref = x.float() @ qt.dequantize(torch.float32).T + bias
    y = F.linear(x, qt, bias)  # dispatches to qt.matmul
    assert y.dtype == dtype and y.shape == (rows, 96)
    # activations are rounded: to int8 blocks (native kernel; exact oracle in test_native_kernels) or bf16 (torch's)
    assert float((y.float() - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_embedding_lookup(name: str) -> None:
    w = torch.randn(50, 64)
    qt = QuantTensor.quantize(w, QuantSpec.parse(name), dtype=torch.float32)
    ids = torch.tensor([[3, 7, 49]])
    out = F.embedding(ids, qt)
    assert out.shape == (1, 3, 64)
    assert torch.equal(out[0], qt.dequantize(torch.float32)[ids[0]])


def test_q8_spec_is_grouped() -> None:
    assert QuantSpec.for_bits(8) == QuantSpec(8, 32) == QuantSpec.parse("q8") and QuantSpec(8, 32).name == "q8"
    assert QuantSpec.parse("q8g128") == QuantSpec(8, 128) and QuantSpec(8, 128).name == "q8g128"
    for bad in ((8, 0), (8, 16), (4, 0)):
        with pytest.raises(QuantError, match="group"):
            QuantSpec(*bad)
    with pytest.raises(QuantError, match="per-row"):
        QuantSpec.parse("q8g0")
    with pytest.raises(QuantError, match="multiple of the group size 32"):
        QuantTensor.quantize(torch.randn(4, 48), QuantSpec.for_bits(8))


@pytest.mark.parametrize("name", ["q8", "q8g64"])
def test_q8_layout_is_the_contract(name: str) -> None:
    """rowf fp32 [N, 1] | data int8 [N, K] | gscale fp16 [N, K/G]; w = rowf * gscale * data."""
    spec = QuantSpec.parse(name)
    n, k, g = 6, 256, spec.group
    lay = layout(spec, (n, k))
    assert list(lay) == ["rowf", "data", "gscale"]
    assert lay["rowf"] == (0, 4 * n) and lay["data"] == (4 * n, n * k) and lay["gscale"] == (4 * n + n * k, 2 * n * k // g)
    w = _weights("heavy", n, k)
    w[2, :g] = 0  # an all-zero group
    qt = QuantTensor.quantize(w, spec, dtype=torch.float32)
    buf = qt.buf
    rowf = buf[: 4 * n].view(torch.float32).view(n, 1)
    data = buf[4 * n : 4 * n + n * k].view(torch.int8).view(n, k)
    gscale = buf[4 * n + n * k : 4 * n + n * k + 2 * n * k // g].view(torch.float16).view(n, k // g)
    assert torch.equal(qt.section("rowf"), rowf) and torch.equal(qt.codes(), data) and torch.equal(qt.section("gscale"), gscale)
    assert int(data.abs().max()) <= 127 and int(data.min()) >= -127
    assert float(gscale.min()) > 0 and float(gscale.max()) == 1.0  # relative to the row's largest scale
    want = (rowf * gscale.float().repeat_interleave(g, 1)) * data.float()
    assert torch.equal(qt.dequantize(torch.float32), want)
    assert torch.equal(qt.dequantize(torch.float32)[2, :g], torch.zeros(g))
    s, m = qt.group_params()
    assert s.shape == m.shape == (n, k // g) and not m.any() and torch.equal(s, rowf * gscale.float())
    sub = qt.rows(torch.tensor([4, 1]))
    assert torch.equal(sub.dequantize(torch.float32), qt.dequantize(torch.float32)[[4, 1]])


def _q8_0_reference(w: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q8_0 round trip: per block of 32, d = fp16(amax / 127), q = round(w / d)."""
    n, k = w.shape
    wb = w.view(n, k // 32, 32)
    d = (wb.abs().amax(-1, keepdim=True) / 127).half().float()
    q = torch.where(d > 0, torch.round(wb / torch.where(d > 0, d, torch.ones_like(d))), torch.zeros_like(wb))
    return (q.clamp(-127, 127) * d).view(n, k)


@pytest.mark.parametrize("kind,max_ratio", [("gauss", 0.9), ("heavy", 0.97)])
def test_q8_has_lower_weight_error_than_q8_0(kind: str, max_ratio: float) -> None:
    """The searched group scales beat Q8_0's amax/127 (measured 0.82 and 0.92 of its squared error)."""
    w = _weights(kind, 512, 1024)
    mse = float((QuantTensor.quantize(w, QuantSpec.for_bits(8)).dequantize(torch.float32) - w).pow(2).mean())
    ref = float((_q8_0_reference(w) - w).pow(2).mean())
    assert mse < max_ratio * ref, (mse, ref)


def test_gguf_q8_0_blocks_are_taken_exactly() -> None:
    """A GGUF Q8_0 tensor becomes q8 (rowf 1, gscale = d) without dequantizing: bit-exact values."""
    import gguf
    import numpy as np

    from quant.gguf_packed import q8_0_to_quant

    w = _weights("heavy", 24, 96).numpy()
    w[5, 32:64] = 0
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    raw.flags.writeable = False  # as the memory-mapped file gives them
    want = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).astype(np.float32))
    for given in (raw.reshape(-1), torch.from_numpy(raw.copy()).reshape(-1)):
        qt = q8_0_to_quant(given, (24, 96), torch.float32)
        assert qt.spec == QuantSpec.for_bits(8)
        got = qt.dequantize(torch.float32)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bit for bit, signs of zeros too
        assert torch.equal(qt.section("rowf"), torch.ones(24, 1))
    with pytest.raises(QuantError, match="bytes"):
        q8_0_to_quant(raw.reshape(-1)[:-34], (24, 96))


def test_unsupported_torch_op_is_a_clear_error() -> None:
    qt = QuantTensor.quantize(torch.randn(8, 32), QuantSpec.for_bits(8))
    with pytest.raises(QuantError, match="not supported on a QuantTensor"):
        torch.matmul(torch.randn(2, 32), qt)


def test_expert_blob_layout_and_forward() -> None:
    h, inter = 64, 32
    g = torch.Generator().manual_seed(2)
    gate, up, down = torch.randn(inter, h, generator=g), torch.randn(inter, h, generator=g), torch.randn(h, inter, generator=g)
    lay = ExpertBlobLayout(h, inter, QuantSpec.for_bits(4), QuantSpec.for_bits(2))
    blob = quantize_expert(lay, gate, up, down)
    assert blob.shape == (lay.nbytes,) and blob.dtype == torch.uint8
    assert all(off % 64 == 0 for off, *_ in lay.parts.values())
    gu, dn = lay.unpack(blob, torch.float32)
    assert gu.buf.data_ptr() == blob.data_ptr()  # zero-copy views of the one buffer
    assert dn.buf.data_ptr() == blob.data_ptr() + lay.parts["down"][0]
    assert ExpertBlobLayout.from_json(lay.to_json()) == lay
    x = torch.randn(3, h)
    wgu, wdn = gu.dequantize(torch.float32), dn.dequantize(torch.float32)
    a, b = (x @ wgu.T).chunk(2, -1)
    ref = (F.silu(a) * b) @ wdn.T
    for y in (expert_forward(lay, blob, x), PreparedExpert(lay, blob, torch.float32)(x)):
        # x and the SiLU product are each rounded to int8 blocks by the native kernel (exact oracle: test_native_kernels)
        assert float((y - ref).norm() / ref.norm()) < 5e-2
    # and the blob is close to the float expert
    a, b = (x @ torch.cat([gate, up]).T).chunk(2, -1)
    full = (F.silu(a) * b) @ down.T
    assert float((ref - full).norm() / full.norm()) < 0.5


def test_bad_specs_and_recipes_are_one_line_errors() -> None:
    for bad in (3, 16, 1):
        with pytest.raises(QuantError, match="bits must be one of 2, 4, 8"):
            QuantSpec.for_bits(bad)
    with pytest.raises(QuantError, match="unknown tensor class 'mlp'"):
        Recipe.from_options({"mlp": 4})
    with pytest.raises(QuantError, match="bits must be one of 2, 4, 8 or 16"):
        Recipe.from_options({"experts": 5})
    with pytest.raises(QuantError, match="expected FIRST-LAST"):
        LayerOverride.parse("experts=4")
    with pytest.raises(QuantError, match="multiple of the group"):
        QuantTensor.quantize(torch.randn(4, 40), QuantSpec.for_bits(4))
    with pytest.raises(QuantError, match="only 2-D"):
        QuantTensor.quantize(torch.randn(4), QuantSpec.for_bits(8))


def test_two_bit_experts_take_four_bit_attention_unless_told() -> None:
    assert Recipe.from_options({"experts": 2}).bits["attn"] == 4 and Recipe({"experts": 2}).bits["attn"] == 4
    assert Recipe.from_options({"experts": 2, "attn": 8}).bits["attn"] == 8  # given explicitly: kept
    assert Recipe.from_options({"experts": 4}).bits["attn"] == 8 and Recipe().bits["attn"] == 8
    assert Recipe.from_options({"experts": 2}).bits["shared"] == 8  # only attention follows the experts
    # a recipe saved before the rule (every class written out) loads as it was made
    assert Recipe.from_json({"bits": {**Recipe().bits, "experts": 2}}).bits["attn"] == 8


def test_recipe_overrides_and_json() -> None:
    r = Recipe.from_options({"experts": 2, "attn": "bf16"}, ["0-2:experts=8", "5:experts=4,attn=8"])
    assert r.bits_for("experts", 1) == 8 and r.bits_for("experts", 3) == 2 and r.bits_for("experts", 5) == 4
    assert r.bits_for("attn", 5) == 8 and r.bits_for("attn", 4) == 16 and r.bits_for(None, 0) == 16
    assert Recipe.from_json(r.to_json()).to_json() == r.to_json()


def test_recipe_names_the_choices_no_tensor_takes() -> None:
    def classify(name: str) -> tuple[str | None, int | None]:
        cls, _, layer = name.partition(".")
        return (None if cls == "norm" else cls), (int(layer) if layer else None)

    names = ["embed", "norm.0", "attn.0", "attn.1", "experts.1", "experts.2", "mtp.3"]
    r = Recipe.from_options({"experts": 2, "attn": 8, "indexer": 8}, ["1-2:experts=4", "5-9:experts=8", "0:embed=4", "0:shared=8"])
    got = r.unmatched(names, classify)
    assert len(got) == 4, got
    assert "indexer" in got[0] and "5-9:experts=8" in got[1] and "layers 1-2" in got[1]
    assert "belong to no layer" in got[2] and "no shared tensors" in got[3]
    assert Recipe().unmatched(names, classify) == []
    # a saved recipe writes every class out: only its overrides can miss
    assert [m for m in Recipe.from_json(r.to_json()).unmatched(names, classify) if "override" not in m] == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cuda_kernel_matches_dequantized_matmul(bits: int) -> None:
    w = torch.randn(256, 512)
    qt = QuantTensor.quantize(w, QuantSpec.for_bits(bits)).to("cuda")
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ qt.dequantize(torch.float32).T
    y = qt.matmul(x)
    assert float((y.float() - ref).norm() / ref.norm()) < 2e-2


def test_load_prepares_multiplied_matrices_but_not_the_embedding_table(tmp_path) -> None:
    """prepare_quantized builds kernels for the matrices a forward multiplies, not for the embedding table
    (its rows are looked up; on a GPU a kernel would be a second copy of the table, which the planner
    does not count), unless it is also the tied lm_head."""
    import localglm
    from localglm.models.glm4_moe.tiny import TinySpec
    from localglm.tiny import make_tiny

    m = localglm.load(make_tiny(tmp_path / "m", TinySpec()), experts_bits=4, embed_bits=8, lm_head_bits=8, attn_bits=8, dtype="float32")
    w = m.net.w
    assert isinstance(w.embed, QuantTensor) and w.embed._kernel is None
    assert isinstance(w.lm_head, QuantTensor) and w.lm_head._kernel is not None
    assert m.logits(torch.tensor([[3, 5, 7]])).shape[-1] == w.embed.shape[0]  # lookups work without a kernel
