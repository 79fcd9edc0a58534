"""GGUF K-quant and legacy blocks held as stored (quant/kquants.py, quant/native/kquants.c).

Oracles: `gguf.quants.dequantize` (gguf-py's reference, the same arithmetic as llama.cpp's
dequantize_row_*) for the blocks, bit for bit; dequantize + fp32 matmul for the kernels (fp32
rounding); the gguf-reference-dequantized model for a whole llama.cpp-quantized file; llama.cpp
itself for its logits when llama-cpp-python is installed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import localglm
from quant import kquants
from quant import native as quant_native
from quant.blob import ExpertBlobLayout, PreparedExpert
from quant.formats import QuantError, QuantSpec, QuantTensor
from quant.gguf_packed import gguf_to_quant
from quant.kquants import GGML_TYPES, IQ_GRID_TYPES, GGMLSpec, act_block, dequantize_blocks, int8_grid, kquant_lib, torch_matmul
from quant.recipe import CLASSES
from quant.stack import QuantStack

DATA = Path(__file__).parent / "data"
MIX = DATA / "glm4_moe_kquant_mix.gguf"
IQ_MIX = DATA / "glm4_moe_iquant_mix.gguf"
TOKENS = [5, 17, 200, 3, 99, 42, 7, 478, 480, 300, 11, 250, 64]
# byte offsets of each type's fp16 super-block factors (d, and dmin where there is one)
F16_AT = {"Q4_0": [0], "Q5_0": [0], "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_XS": [0],
          "Q4_1": [0, 2], "Q5_1": [0, 2], "IQ4_NL": [0], "IQ2_XXS": [0], "IQ2_XS": [0], "IQ2_S": [0], "IQ3_XXS": [0], "IQ3_S": [0],
          "IQ1_S": [0], "IQ1_M": []}  # fmt: skip
IQ1M_SCALES = 48  # IQ1_M's fp16 d lies in the top nibbles of the four scale words at bytes 48..55
TYPES = list(GGML_TYPES)


@pytest.fixture(scope="module", params=["native", "portable"])
def lib(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> kquants.KQuantLib:
    """The kernels as built for this CPU (AVX2 where it has it), and the portable C path (built
    without -march=native), so both are checked on any machine with a compiler."""
    if kquant_lib() is None:
        pytest.skip("no C compiler: the native kernels are not built")
    if request.param == "native":
        return kquant_lib()
    from quant.native import CFLAGS, HEADER, _compiler, build

    flags = tuple(f for f in CFLAGS if f != "-march=native")
    path = build(_compiler(), flags, tmp_path_factory.mktemp("portable"), name="kquants", sources=(kquants.SOURCE,), depends=(HEADER,))
    return kquants.KQuantLib(path)


@pytest.fixture
def exact_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every product through dequantize + fp32 GEMM (no int8 activations): structure tests compare exactly."""
    monkeypatch.setattr(kquants, "NATIVE_MAX_ROWS", 0)


def random_blocks(name: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Valid blocks: random bytes (every code, scale and mask pattern) with finite, sane fp16 factors."""
    rng = np.random.default_rng(seed)
    t = GGML_TYPES[name]
    b = rng.integers(0, 256, (n_blocks, t.nbytes), dtype=np.uint8)
    for o in F16_AT[name]:
        b[:, o : o + 2] = (rng.standard_normal(n_blocks) * 0.02).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    if name == "IQ1_M":
        d = (rng.standard_normal(n_blocks) * 0.02).astype(np.float16).view(np.uint16).astype(np.uint16)
        words = b[:, IQ1M_SCALES : IQ1M_SCALES + 8].copy().view(np.uint16)
        nibbles = np.stack([(d >> s) & 15 for s in (0, 4, 8, 12)], 1).astype(np.uint16)
        b[:, IQ1M_SCALES : IQ1M_SCALES + 8] = ((words & 0x0FFF) | (nibbles << 12)).astype(np.uint16).view(np.uint8)
    return b


def reference(b: np.ndarray, name: str) -> np.ndarray:
    return gguf.quants.dequantize(b, getattr(gguf.GGMLQuantizationType, name)).reshape(b.shape[0], -1)


def tensor_of(name: str, n: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> QuantTensor:
    t = GGML_TYPES[name]
    raw = random_blocks(name, n * k // t.block, seed)
    return gguf_to_quant(raw.reshape(-1), name, (n, k), dtype)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.astype(np.float32).view(np.uint32), b.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
def test_torch_dequantize_is_bit_exact_with_gguf(name: str) -> None:
    b = random_blocks(name, 96)
    assert same_bits(dequantize_blocks(torch.from_numpy(b), name).numpy(), reference(b, name))


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0", "Q4_1", "Q5_1"])
def test_blocks_from_gguf_quantizer_round_trip(name: str) -> None:
    """gguf-py can write these: its blocks of real weights, read back bit for bit."""
    w = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    qt_ = getattr(gguf.GGMLQuantizationType, name)
    raw = gguf.quants.quantize(w, qt_)
    qt = gguf_to_quant(raw.reshape(-1), name, (8, 256))
    assert same_bits(qt.dequantize(torch.float32).numpy(), gguf.quants.dequantize(raw, qt_))


@pytest.mark.parametrize("name", TYPES)
def test_native_dequantize_is_bit_exact_with_gguf(name: str, lib: kquants.KQuantLib) -> None:
    b = random_blocks(name, 64, seed=2)
    t = GGML_TYPES[name]
    n = 4
    out = lib.dequantize(GGMLSpec.of(name), torch.from_numpy(b), (n, 64 // n * t.block))
    assert same_bits(out.numpy().reshape(64, -1), reference(b, name))


@pytest.mark.parametrize("name", TYPES)
def test_native_bf16_rows_are_the_reference_rounded_to_bf16(name: str, lib: kquants.KQuantLib) -> None:
    """kq_dequant_bf16 (a prompt's bf16 GEMM tile): rows [n0, n1) of the gguf reference, rounded to nearest even."""
    b = random_blocks(name, 64, seed=3)
    t, n = GGML_TYPES[name], 8
    k = 64 // n * t.block
    buf = torch.empty(n * k, dtype=torch.bfloat16)
    got = lib.dequantize_bf16(GGMLSpec.of(name), torch.from_numpy(b), (n, k), 2, 7, buf)
    want = torch.from_numpy(reference(b, name).reshape(n, k)[2:7].astype(np.float32)).to(torch.bfloat16)
    assert torch.equal(got, want)


def test_gguf_prompt_rows_take_the_bf16_gemm_where_the_cpu_has_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """GGMLKernel: bf16 rows from bf16_gemm_rows() on go through bf16 tiles of the blocks and torch's GEMM
    (the product of the reference weight rounded to bf16, to bf16 rounding); fewer rows keep the int8 kernel."""
    if kquant_lib() is None:
        pytest.skip("no C compiler: the native kernels are not built")
    qt = tensor_of("Q4_K", 300, 512, seed=4, dtype=torch.bfloat16)
    monkeypatch.setattr(quant_native, "bf16_gemm_rows", lambda: 6)
    monkeypatch.setattr(quant_native, "BF16_TILE_BYTES", 0)  # tiles of BF16_TILE_ROWS: the tiles joined
    calls: list[tuple[int, int]] = []
    real = kquants.KQuantLib.dequantize_bf16
    monkeypatch.setattr(kquants.KQuantLib, "dequantize_bf16", lambda self, spec, data, shape, n0, n1, out: calls.append((n0, n1)) or real(self, spec, data, shape, n0, n1, out))
    x = torch.randn(8, 512).bfloat16()
    y = qt.matmul(x)
    assert calls == [(0, 256), (256, 300)] and y.dtype == torch.bfloat16
    ref = F.linear(x.float(), qt.dequantize(torch.float32).to(torch.bfloat16).float())
    assert float((y.float() - ref).abs().max()) <= 2**-7 * float(ref.abs().max())
    calls.clear()
    qt.matmul(x[:5])
    assert calls == []


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows", [1, 3, 19])
def test_native_matmul_matches_torch_fallback(name: str, rows: int, lib: kquants.KQuantLib) -> None:
    qt = tensor_of(name, 40, 512, seed=3)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    want = torch_matmul(qt.spec, qt.section("data"), (40, 512), x)
    got = lib.matmul(qt.spec, qt.section("data"), (40, 512), x)
    scale = float(x.abs().sum(-1).max() * qt.dequantize(torch.float32).abs().max())
    assert float((got - want).abs().max()) <= 1e-6 * scale  # fp32 rounding: different summation order only
    assert torch.allclose(want, F.linear(x, qt.dequantize(torch.float32)), rtol=0, atol=1e-6 * scale)
    # the int8 kernel: integer products with x rounded to int8 per 256 (K types) or 32 -- the torch product on that grid
    xg = int8_grid(x, act_block(qt.spec))
    assert not torch.equal(xg, x)
    fast = lib.matmul(qt.spec, qt.section("data"), (40, 512), x, int8=True)
    assert float((fast - torch_matmul(qt.spec, qt.section("data"), (40, 512), xg)).abs().max()) <= 1e-6 * scale


@pytest.mark.parametrize("name", TYPES)
def test_int8_kernel_token_results_do_not_depend_on_token_count(name: str, lib: kquants.KQuantLib) -> None:
    """Tokens run 4 or 8 at a time per weight row (codes unpacked once for the tile), the rest in tiles of
    4, 3, 2 or 1 (a speculative verification's 2-7 tokens), and in passes of a few tokens for long
    inputs: each token's row must be bit-identical however many tokens share the call. K = 352 / 2816
    leaves a tail of blocks for the 32-weight types' 8-block steps."""
    k = 2816 if GGML_TYPES[name].block == 256 else 352
    qt = tensor_of(name, 24, k, seed=7)
    spec, data = qt.spec, qt.section("data")
    x = torch.randn(70, k, generator=torch.Generator().manual_seed(8)) * torch.rand(70, 1) * 3
    x[5] = 0  # an all-zero token: scale 0
    together = lib.matmul(spec, data, (24, k), x, int8=True)
    alone = torch.cat([lib.matmul(spec, data, (24, k), x[t : t + 1], int8=True) for t in range(70)])
    assert torch.equal(together, alone)
    for lo, hi in ((3, 10), (1, 6), (64, 70), (0, 2), (2, 5), (10, 14), (20, 25), (30, 37), (40, 48)):  # other tile / rest splits
        assert torch.equal(lib.matmul(spec, data, (24, k), x[lo:hi], int8=True), together[lo:hi])
    assert torch.equal(together[5], torch.zeros(24))
    want = torch_matmul(spec, data, (24, k), int8_grid(x, act_block(spec)))
    scale = float(x.abs().sum(-1).max() * qt.dequantize(torch.float32).abs().max())
    assert float((together - want).abs().max()) <= 1e-6 * scale


def test_matmul_dispatch_native_gemm_and_torch_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """QuantTensor.matmul: the int8 kernel for any row count (dequantize + GEMM past NATIVE_MAX_ROWS), the
    torch fallback (chunked, several chunks here) without the native library: all the same product."""
    qt = tensor_of("Q4_K", 48, 512, seed=4)
    dense = qt.dequantize(torch.float32)
    for rows in (2, 73, 300):
        x = torch.randn(rows, 512)
        want = F.linear(int8_grid(x, 256), dense)
        assert float((qt.matmul(x) - want).abs().max()) <= 1e-5 * float(want.abs().max())
    monkeypatch.setattr(kquants, "NATIVE_MAX_ROWS", 4)
    x = torch.randn(5, 512)
    assert float((qt.matmul(x) - F.linear(x, dense)).abs().max()) <= 1e-5 * float(F.linear(x, dense).abs().max())
    monkeypatch.setattr(kquants, "CHUNK_ELEMENTS", 512 * 10)
    monkeypatch.setattr(kquants, "kquant_lib", lambda: None)
    fallback = tensor_of("Q4_K", 48, 512, seed=4)
    x = torch.randn(3, 512)
    b = torch.randn(48)
    want = F.linear(x, dense, b)
    assert float((fallback.matmul(x, b) - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_spec_names_layouts_and_rows() -> None:
    spec = GGMLSpec.of("q6_k")
    assert spec.name == "q6_k" and QuantSpec.parse("q6_k") == spec and QuantSpec.parse("iq4_xs") == GGMLSpec.of("IQ4_XS")
    assert spec != QuantSpec(4, 256) and GGMLSpec.of("Q4_K") != GGMLSpec.of("IQ4_XS")
    assert GGMLSpec.of("iq2_xxs").name == "iq2_xxs" and QuantSpec.parse("iq1_m") == GGMLSpec.of("IQ1_M")
    with pytest.raises(QuantError, match="TQ1_0 is not held as stored"):
        GGMLSpec.of("TQ1_0")
    with pytest.raises(QuantError, match="blocks of 256"):
        QuantTensor(spec, (2, 100), torch.zeros(1000, dtype=torch.uint8))
    qt = tensor_of("Q3_K", 12, 512, seed=5)
    assert qt.nbytes >= 12 * 2 * 110 and qt.bits_per_weight == pytest.approx(110 * 8 / 256)
    dense = qt.dequantize(torch.float32)
    idx = torch.tensor([7, 0, 11])
    assert torch.equal(qt.rows(idx).dequantize(torch.float32), dense[idx])
    both = QuantTensor.cat_rows([qt, qt.rows(idx)])
    assert torch.equal(both.dequantize(torch.float32), torch.cat([dense, dense[idx]]))
    assert torch.equal(F.embedding(torch.tensor([[3, 5]]), qt), dense[[3, 5]].unsqueeze(0))
    with pytest.raises(QuantError, match="GGUF blocks"):
        qt.codes()


def test_mixed_types_stack_like_one_matrix(exact_kernels: None) -> None:
    """q/k/v fused with torch.cat from three types (a Q4_K_M attention) multiply as the dense stack."""
    q, k, v = tensor_of("Q4_K", 16, 256, 6), tensor_of("Q5_0", 8, 256, 7), tensor_of("Q6_K", 8, 256, 8)
    fused = torch.cat([q, k, v], 0)
    assert isinstance(fused, QuantStack) and tuple(fused.shape) == (32, 256)
    dense = torch.cat([t.dequantize(torch.float32) for t in (q, k, v)])
    x, b = torch.randn(3, 256), torch.randn(32)
    assert torch.equal(fused.dequantize(torch.float32), dense)
    want = F.linear(x, dense, b)
    assert float((F.linear(x, fused, b) - want).abs().max()) <= 1e-5 * float(want.abs().max())
    same = torch.cat([q, q], 0)
    assert isinstance(same, QuantTensor)  # one type: one tensor, as before


def test_expert_blob_holds_blocks_as_stored(exact_kernels: None) -> None:
    """One blob per expert: gate_up Q2_K and down Q3_K packed byte for byte, unpacked as views, run by
    PreparedExpert (CPU) the same as the dense expert."""
    h, inter = 256, 256
    lay = ExpertBlobLayout(h, inter, GGMLSpec.of("Q2_K"), GGMLSpec.of("Q3_K"))
    assert ExpertBlobLayout.from_json(lay.to_json()) == lay
    gate, up, down = tensor_of("Q2_K", inter, h, 9), tensor_of("Q2_K", inter, h, 10), tensor_of("Q3_K", h, inter, 11)
    blob = lay.pack(QuantTensor.cat_rows([gate, up]), down)
    assert blob.numel() == lay.nbytes
    gu, dn = lay.unpack(blob, torch.float32)
    assert torch.equal(gu.section("data").reshape(-1)[: gate.section("data").numel()], gate.section("data").reshape(-1))
    x = torch.randn(3, h)
    g, u = F.linear(x, gate.dequantize(torch.float32)), F.linear(x, up.dequantize(torch.float32))
    want = F.linear(F.silu(g) * u, down.dequantize(torch.float32))
    got = PreparedExpert(lay, blob, torch.float32)(x)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_expert_blob_packs_gate_and_up_from_views_into_a_given_buffer() -> None:
    """GGUF loading writes each expert from read-only views of the mapped file straight into its row of
    the layer's buffer: the same bytes as packing the stacked copy, the padding zeroed (the buffer
    held garbage), the source left unshared with the blob; our own specs stack through cat_rows."""
    def ours(spec: QuantSpec, n: int, k: int, seed: int) -> QuantTensor:
        return QuantTensor.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), spec)

    def gguf_blocks(spec: QuantSpec, n: int, k: int, seed: int) -> QuantTensor:
        return tensor_of(spec.ggml, n, k, seed)  # type: ignore[attr-defined]

    h = 256  # inter 96: parts that need padding to the 64-byte offsets (K-quant rows: whole 256-weight blocks)
    for inter, gu_spec, dn_spec, make in ((256, GGMLSpec.of("Q4_K"), GGMLSpec.of("Q6_K"), gguf_blocks), (96, QuantSpec.for_bits(4), QuantSpec.for_bits(8), ours)):
        lay = ExpertBlobLayout(h, inter, gu_spec, dn_spec)
        gate, up, down = make(gu_spec, inter, h, 1), make(gu_spec, inter, h, 2), make(dn_spec, h, inter, 3)
        want = lay.pack(QuantTensor.cat_rows([gate, up]), down)
        views = [QuantTensor(t.spec, tuple(t.shape), t.buf.clone(), t.dtype) for t in (gate, up)]
        buf = torch.full((2, lay.nbytes), 0xAB, dtype=torch.uint8)
        got = lay.pack(views, down, out=buf[1])
        assert got.data_ptr() == buf[1].data_ptr() and torch.equal(buf[1], want)
        assert bool((buf[0] == 0xAB).all())  # the neighbouring row untouched
        with pytest.raises(QuantError, match="layout needs uint8"):
            lay.pack([gate, up], down, out=torch.empty(lay.nbytes - 1, dtype=torch.uint8))
        with pytest.raises(QuantError, match="does not match the layout"):
            lay.pack([gate], down)
    raw = random_blocks("Q2_K", 4)
    view = gguf_to_quant(raw.reshape(-1), "Q2_K", (4, 256), copy=False)
    assert view.buf.data_ptr() == raw.ctypes.data  # no copy: pack copies on
    assert gguf_to_quant(raw.reshape(-1), "Q2_K", (4, 256)).buf.data_ptr() != raw.ctypes.data


def test_gguf_expert_prompt_rows_take_the_bf16_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GGUF expert (PreparedExpert over blocks as stored) given bf16_gemm_rows() bf16 rows or more: both
    products from bf16 tiles of its blocks through torch's GEMM, close to the fp32 int8 path (bf16
    rounding); fewer rows, and one-token steps, keep the fp32 native expert."""
    if kquant_lib() is None:
        pytest.skip("no C compiler: the native kernels are not built")
    h, inter = 256, 256
    lay = ExpertBlobLayout(h, inter, GGMLSpec.of("Q4_K"), GGMLSpec.of("Q6_K"))
    gate, up, down = tensor_of("Q4_K", inter, h, 5), tensor_of("Q4_K", inter, h, 6), tensor_of("Q6_K", h, inter, 7)
    pe = PreparedExpert(lay, lay.pack(QuantTensor.cat_rows([gate, up]), down), torch.bfloat16)
    assert pe.mats is not None
    monkeypatch.setattr(quant_native, "bf16_gemm_rows", lambda: 6)
    monkeypatch.setattr(quant_native, "BF16_TILE_BYTES", 0)  # tiles of BF16_TILE_ROWS: the tiles joined
    tiles: list[tuple[int, int]] = []
    real = kquants.KQuantLib.dequantize_bf16
    monkeypatch.setattr(kquants.KQuantLib, "dequantize_bf16", lambda self, spec, data, shape, n0, n1, out: tiles.append((n0, n1)) or real(self, spec, data, shape, n0, n1, out))
    x = torch.randn(8, h).bfloat16()
    got = pe(x)
    assert tiles == [(0, 256), (256, 512), (0, 256)] and got.dtype == torch.float32  # gate_up's two tiles, down's one
    gu_bf16, dn_bf16 = (t.dequantize(torch.float32).to(torch.bfloat16) for t in (QuantTensor.cat_rows([gate, up]), down))
    dense = quant_native.bf16_expert(lambda v: F.linear(v, gu_bf16), lambda v: F.linear(v, dn_bf16), x)  # the same route, dense weights
    assert float((got - dense).norm() / dense.norm()) < 1e-2
    want = pe._lib.expert(*pe.mats, x.float().contiguous())  # the fp32 int8 expert: bf16 rounding apart
    assert float((got - want).norm() / want.norm()) < 5e-2
    tiles.clear()
    assert torch.equal(pe(x[:5]), pe._lib.expert(*pe.mats, x[:5].float().contiguous())) and tiles == []


# ---- a whole file from llama.cpp's quantizer -------------------------------------------------------


def _float_reference(path: Path) -> np.ndarray:
    """Our model on the same file with every tensor dequantized by gguf-py (kept in fp32)."""
    ref = localglm.load(path, dtype="float32", **{f"{c}_bits": 16 for c in CLASSES})
    return ref.logits(torch.tensor([TOKENS]))[0].numpy()


def test_llama_cpp_mix_loads_as_stored_and_matches_reference_dequantization(monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/data/glm4_moe_kquant_mix.gguf (llama.cpp's quantizer, a dynamic mix: see tests/data/README.md):
    every 2-D weight stays in its blocks (no re-quantization, no warning, no dense copy) and, with fp32
    activations everywhere, the logits equal those of the gguf-dequantized weights to fp32 rounding; with
    the default int8-activation kernel (activations rounded per 256 for the K types, as llama.cpp's Q8_K)
    they stay within that rounding: llama.cpp's own logits on this file are 2.9e-2 of the largest away."""
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(MIX).tensors}
    assert set(GGML_TYPES) - {"Q4_1", "Q5_1", "IQ4_NL", *IQ_GRID_TYPES} <= kinds  # every held type but three (and the i-quants: IQ_MIX) is in the file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "re-quantizing" warning
        m = localglm.load(MIX, dtype="float32")
    experts = m.net.experts
    specs = {lay.gate_up.ggml for lay in experts.layouts.values()} | {lay.down.ggml for lay in experts.layouts.values()}
    assert specs == {"Q2_K", "Q3_K", "IQ4_XS", "Q4_K"}
    assert experts.kernel.startswith("GGUF blocks as stored: native K-quant kernels")  # what --stats shows
    layer = m.net.w.layers[1]
    assert isinstance(layer.attn.qkv_weight, QuantStack) and isinstance(layer.shared.gate_up, QuantTensor)
    assert isinstance(m.net.w.embed, QuantTensor) and isinstance(m.net.w.lm_head, QuantTensor)
    ref = _float_reference(MIX)
    fast = m.logits(torch.tensor([TOKENS]))[0].numpy()
    assert np.abs(fast - ref).max() <= 4e-2 * np.abs(ref).max() and (fast.argmax(-1) == ref.argmax(-1)).all()
    monkeypatch.setattr(kquants, "NATIVE_MAX_ROWS", 0)  # every product through dequantize + fp32 GEMM
    m.net.fused_decode = m.net.fused_prefill = False  # in the torch layers: the fused ones take int8 activations only
    ours = m.logits(torch.tensor([TOKENS]))[0].numpy()
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


def test_iquant_mix_loads_as_stored_and_matches_reference_dequantization(monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/data/glm4_moe_iquant_mix.gguf (blocks from llama.cpp's own quantization code: see tests/data/README.md)
    holds every i-quant type (IQ1_S ... IQ3_S) in routed and shared experts, attention and the dense MLP. It loads
    with every 2-D weight in its blocks (no re-quantization warning), and with fp32 activations its logits are the
    gguf-dequantized model's to fp32 rounding."""
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(IQ_MIX).tensors}
    assert set(IQ_GRID_TYPES) <= kinds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = localglm.load(IQ_MIX, dtype="float32")
    layouts = m.net.experts.layouts
    assert {layer: (lay.gate_up.ggml, lay.down.ggml) for layer, lay in layouts.items()} == {
        1: ("IQ2_XXS", "IQ3_XXS"), 2: ("IQ2_XS", "IQ3_S"), 3: ("IQ1_S", "IQ2_S")}  # fmt: skip
    layer = m.net.w.layers[1]
    assert isinstance(layer.attn.qkv_weight, QuantStack) and isinstance(layer.shared.gate_up, QuantTensor)
    ref = _float_reference(IQ_MIX)
    monkeypatch.setattr(kquants, "NATIVE_MAX_ROWS", 0)  # every product through dequantize + fp32 GEMM
    m.net.fused_decode = m.net.fused_prefill = False
    ours = m.logits(torch.tensor([TOKENS]))[0].numpy()
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


def test_llama_cpp_agrees_on_the_iquant_mix() -> None:
    """llama.cpp runs the i-quants with activations rounded to Q8_K, as our int8 kernels do: the same products,
    so its logits and ours (fused and layer by layer) agree to fp32 rounding (measured 5e-7 of the largest)."""
    pytest.importorskip("llama_cpp")
    from test_gguf_llama_cpp import _llama_logits

    theirs = _llama_logits(IQ_MIX, TOKENS)
    m = localglm.load(IQ_MIX, dtype="float32")
    mine = m.logits(torch.tensor([TOKENS]))[0].numpy()
    assert np.abs(mine - theirs).max() <= 1e-5 * np.abs(theirs).max()
    m.net.fused_decode = m.net.fused_prefill = False
    layered = m.logits(torch.tensor([TOKENS]))[0].numpy()
    assert np.abs(layered - theirs).max() <= 1e-5 * np.abs(theirs).max()


def test_iq_grid_header_is_the_gguf_packages_tables() -> None:
    """quant/native/iq_grids.h is generated (python -m quant.iq_tables) from gguf's grids: still the same."""
    from quant.iq_tables import HEADER, render_header

    assert HEADER.read_text() == render_header()


@pytest.mark.parametrize("path", [MIX, IQ_MIX], ids=["kquant", "iquant"])
def test_torch_fallback_runs_the_mix(path: Path, monkeypatch: pytest.MonkeyPatch, exact_kernels: None) -> None:
    """Without the native kernels (no compiler; on a GPU the same torch code runs): blocks dequantized per chunk."""
    monkeypatch.setattr(kquants, "kquant_lib", lambda: None)
    ours = localglm.load(path, dtype="float32").logits(torch.tensor([TOKENS]))[0].numpy()
    ref = _float_reference(path)
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


def test_offload_moves_stored_blocks(tmp_path: Path, exact_kernels: None) -> None:
    """Offloaded (simulated device): experts move as their stored-block blobs and give the same logits."""
    m = localglm.load(MIX, dtype="float32", offload="sim", gpu_mem="64MiB", ctx=64, stats_path=tmp_path / "s.npz")
    layouts = {layer: codec.layout for layer, codec in m.net.experts.codecs.items()}
    assert {(lay.gate_up.name, lay.down.name) for lay in layouts.values()} == {("q2_k", "q3_k"), ("iq4_xs", "q4_k")}
    ours = m.logits(torch.tensor([TOKENS]))[0].numpy()
    ref = localglm.load(MIX, dtype="float32").logits(torch.tensor([TOKENS]))[0].numpy()
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()  # the same kernels on the same blocks


def test_types_not_held_are_requantized_per_layer_with_a_warning_naming_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer whose experts are in a type not run as stored (here IQ4_XS, made so by hiding it) is
    re-quantized to the nearest localglm bits, named in one warning; the other layers stay as stored."""
    from quant.gguf_packed import PACKED_SPECS

    monkeypatch.delitem(PACKED_SPECS, "IQ4_XS")
    with pytest.warns(UserWarning, match=r"layers 2: IQ4_XS/Q4_K -> q4") as caught:
        m = localglm.load(MIX, dtype="float32")
    assert "Q2_K" in str(caught[0].message) and "IQ4_XS," not in str(caught[0].message) and "IQ4_XS)" not in str(caught[0].message)
    layouts = m.net.experts.layouts
    assert layouts[1].gate_up == GGMLSpec.of("Q2_K") and layouts[2].gate_up == QuantSpec.for_bits(4)
    ours = m.logits(torch.tensor([TOKENS]))[0].numpy()
    ref = _float_reference(MIX)
    cos = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.99  # one layer re-quantized from IQ4_XS to q4: close, not equal


def test_llama_cpp_agrees_on_the_mix() -> None:
    """llama.cpp on the same file: it also quantizes activations (Q8_K) for its products, so logits
    agree closely, not exactly (the tiny random model's router can flip a near-tie)."""
    pytest.importorskip("llama_cpp")
    from test_gguf_llama_cpp import _llama_logits

    theirs = _llama_logits(MIX, TOKENS)
    mine = localglm.load(MIX, dtype="float32").logits(torch.tensor([TOKENS]))[0].numpy()
    cos = (theirs * mine).sum(-1) / np.linalg.norm(theirs, axis=-1) / np.linalg.norm(mine, axis=-1)
    assert np.median(cos) > 0.999 and (cos > 0.99).mean() >= 0.75, cos
    assert (theirs.argmax(-1) == mine.argmax(-1)).mean() >= 0.75


def test_stack_takes_dense_parts(exact_kernels: None) -> None:
    """A part the file keeps in float (or dequantizes) stacks with quantized ones, in either order."""
    q = tensor_of("Q4_K", 16, 256, 12)
    v = torch.randn(8, 256)
    for parts in ([q, v], [v, q]):
        fused = torch.cat(parts, 0)
        dense = torch.cat([p.dequantize(torch.float32) if isinstance(p, QuantTensor) else p for p in parts])
        assert isinstance(fused, QuantStack) and torch.equal(fused.dequantize(torch.float32), dense)
        x = torch.randn(2, 256)
        want = F.linear(x, dense)
        assert float((fused.matmul(x) - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_experts_not_taken_as_stored_load_as_floats_beside_stored_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MoE layer's experts in held types (hidden here), RAM to spare: the experts load as floats (the
    float expert path gets dense tensors, a Q4_K down projection included) while attention stays as stored."""
    from quant.gguf_packed import PACKED_SPECS

    for t in ("Q2_K", "Q3_K", "IQ4_XS"):
        monkeypatch.delitem(PACKED_SPECS, t)
    m = localglm.load(MIX, dtype="float32")
    assert type(m.net.experts).__name__ == "InMemoryExperts"
    assert isinstance(m.net.w.layers[1].attn.qkv_weight, QuantStack)
    ref = _float_reference(MIX)
    ours = m.logits(torch.tensor([TOKENS]))[0].numpy()
    assert np.abs(ours - ref).max() <= 4e-2 * np.abs(ref).max() and (ours.argmax(-1) == ref.argmax(-1)).all()  # int8 grid: see above


def test_offload_charges_no_prepared_copy_for_stored_blocks() -> None:
    """The GPU path multiplies the blocks as stored (dequantized chunk by chunk on the device), so an
    expert-cache slot costs its blob alone."""
    from quant.cuda_kernels import prepared_nbytes

    assert prepared_nbytes(GGMLSpec.of("Q4_K"), (2816, 4096), torch.bfloat16) == 0
    assert prepared_nbytes(QuantSpec.for_bits(8), (64, 64), torch.bfloat16) == 64 * 64 * 2  # unchanged for ours
