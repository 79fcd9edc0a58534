"""The native CPU kernels (quant/native/qkernels.c; the model side's layer ops and decoder layer in
localglm/layers/native/, localglm/models/native/) against a torch oracle that does the same math:
activations rounded to int8 in blocks of 32 (scale amax/127, round half to even), weights
dequantized exactly (codes and offsets both meet the rounded activations). Agreement is then float rounding only, so a wrong code order, scale or offset
shows up as a large error, not as noise."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import localglm.layers.native as layers_native
import quant.native as quant_native
from localglm.layers.native import LayerLib, build_layers, native
from quant.blob import ExpertBlobLayout, quantize_expert
from quant.formats import QuantSpec, QuantTensor
from quant.native import CFLAGS, NativeLib, _compiler, build, native_lib, native_status

pytestmark = pytest.mark.skipif(native_lib() is None, reason=f"native kernels not built: {native_status()}")

# The portable C path (what a CPU without AVX2 runs), built without -march=native.
PORTABLE_FLAGS = tuple(f for f in CFLAGS if not f.startswith("-march")) + ("-mno-avx2",) * (platform.machine() in ("x86_64", "AMD64"))


# Plain AVX2 (Haswell: FMA and F16C, no AVX-512): where -march=native picks VNNI, this still builds and
# checks the maddubs + madd path that AVX2-only CPUs run.
AVX2_FLAGS = tuple(f for f in CFLAGS if not f.startswith("-march")) + ("-march=haswell",)


def _cpu_has_avx2() -> bool:
    try:
        return " avx2" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.fixture(scope="module", params=["native", "avx2", "portable"])
def lib(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> NativeLib:
    if request.param == "native":
        return native_lib()
    if request.param == "avx2":
        if platform.machine() not in ("x86_64", "AMD64") or not _cpu_has_avx2():
            pytest.skip("the plain AVX2 build needs an x86 CPU with AVX2")
        built = NativeLib(build(_compiler(), AVX2_FLAGS, tmp_path_factory.mktemp("avx2")))
        assert built.avx2
        return built
    built = NativeLib(build(_compiler(), PORTABLE_FLAGS, tmp_path_factory.mktemp("portable")))
    assert not built.avx2
    return built


@pytest.fixture(scope="module")
def layer_lib(lib: NativeLib) -> LayerLib:
    """The model side's library (layer ops, decode layer), built with `lib`'s flags and linked against it."""
    if lib is native_lib():
        return native()
    return LayerLib(build_layers(_compiler(), lib.path, AVX2_FLAGS if lib.avx2 else PORTABLE_FLAGS), lib)


SPECS = ["q2", "q4", "q8", "q4g64", "q8g128"]


def act_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> the values the kernel multiplies: per block of 32, round(x / d) * d, d = amax / 127."""
    t, k = x.shape
    xb = x.float().view(t, k // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(xb / torch.where(d > 0, d, torch.ones_like(d))), torch.zeros_like(xb))
    return (q * d).view(t, k)


def oracle_linear(qt: QuantTensor, x: torch.Tensor) -> torch.Tensor:
    """What the kernel computes: the exactly dequantized weight against the rounded activations."""
    return (act_roundtrip(x).double() @ qt.dequantize(torch.float32).double().T).float()


def spec(name: str) -> QuantSpec:
    try:
        return QuantSpec.parse(name)
    except Exception as e:  # q8 groups arrive with the grouped 8-bit format
        pytest.skip(str(e))


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("tokens", [1, 3])
def test_linear_matches_oracle(lib: NativeLib, name: str, tokens: int) -> None:
    torch.manual_seed(0)
    w = torch.distributions.StudentT(4.0).sample((96, 256)) * 0.02  # heavy tails: wide scale range
    qt = QuantTensor.quantize(w, spec(name), torch.float32)
    if not lib.supports(qt):
        pytest.skip(f"{name} not taken by the native kernels yet")
    x = torch.randn(tokens, 256)
    bias = torch.randn(96)
    y = lib.linear(lib.describe(qt), x, bias)
    ref = oracle_linear(qt, x) + bias
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())), float((y - ref).abs().max())
    # and the activation rounding costs little against the exact product
    exact = x @ qt.dequantize(torch.float32).T + bias
    assert float((y - exact).norm() / exact.norm()) < 0.02


@pytest.mark.parametrize(
    "name,k",  # K = 96 to 416: 3 to 13 blocks, so every kind of partial eight after the eight-block steps runs too, with rows
    # shorter than one eight (96, 224) among them (each K only where the group divides it); 1280: rows longer than
    # qkernels.c's SMALL_K, whose 2-4 tokens go through the tile (shorter ones a token at a time, as 1 and 5+ do not)
    [(n, k) for n in SPECS for k in (96, 224, 256, 352, 384, 416, 1280) if k % QuantSpec.parse(n).group == 0],
)
def test_a_token_gets_the_same_numbers_in_any_tile(lib: NativeLib, name: str, k: int) -> None:
    """Tokens are multiplied four at a time; each token's result must not depend on its tile
    (offloaded experts, computed alone, must equal the same experts in a whole-layer call), nor on
    whether 2-4 tokens went through a tile or one at a time."""
    torch.manual_seed(1)
    qt = QuantTensor.quantize(torch.randn(40, k) * 0.02, spec(name), torch.float32)
    if not lib.supports(qt):
        pytest.skip(f"{name} not taken by the native kernels yet")
    desc = lib.describe(qt)
    x = torch.randn(7, k)  # tiles of 4 and 3
    together = lib.linear(desc, x)
    alone = torch.cat([lib.linear(desc, x[t : t + 1]) for t in range(7)])
    pairs = torch.cat([lib.linear(desc, x[t : t + 2]) for t in range(0, 6, 2)] + [lib.linear(desc, x[6:])])
    assert torch.equal(together, alone) and torch.equal(together, pairs)
    ref = oracle_linear(qt, x)
    assert torch.allclose(together, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())), float((together - ref).abs().max())


@pytest.mark.parametrize("name", SPECS)
def test_a_batch_over_several_token_blocks_equals_its_rows_alone(lib: NativeLib, name: str) -> None:
    """The batched path: lg_linear takes tokens in blocks (~128 KiB of quantized rows, 60 tokens at
    K = 2080) and weight rows in steps of 64 blocks; 66 tokens and K = 65 or more blocks cross both
    boundaries and leave odd tails. Every row equals that row computed alone, bit for bit, and the
    torch oracle within the usual tolerance."""
    torch.manual_seed(3)
    group = spec(name).group
    k = -(-2080 // group) * group
    qt = QuantTensor.quantize(torch.randn(24, k) * 0.02, spec(name), torch.float32)
    if not lib.supports(qt):
        pytest.skip(f"{name} not taken by the native kernels yet")
    desc = lib.describe(qt)
    x = torch.randn(66, k)
    together = lib.linear(desc, x)
    alone = torch.cat([lib.linear(desc, x[t : t + 1]) for t in range(x.shape[0])])
    assert torch.equal(together, alone)
    ref = oracle_linear(qt, x)
    assert torch.allclose(together, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())), float((together - ref).abs().max())


@pytest.mark.parametrize("name", ["q2", "q4", "q8"])
def test_activation_ties_round_half_to_even(lib: NativeLib, name: str) -> None:
    """Activations on exact halves (the block's scale is 1): rounded to even, as torch.round and
    lrintf do, by the vector quantizer as by the scalar one. A tie rounded away from zero moves the
    result by a whole weight, far outside the tolerance."""
    torch.manual_seed(4)
    qt = QuantTensor.quantize(torch.randn(8, 64), spec(name), torch.float32)
    halves = torch.arange(-15.5, 15.5, 1.0)  # 31 ties
    x = torch.cat([torch.tensor([127.0]), halves, torch.tensor([-127.0]), -halves]).view(1, 64)
    y = lib.linear(lib.describe(qt), x)
    ref = oracle_linear(qt, x)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())), float((y - ref).abs().max())


def test_zero_activation_block(lib: NativeLib) -> None:
    qt = QuantTensor.quantize(torch.randn(32, 64), QuantSpec.for_bits(4), torch.float32)
    x = torch.zeros(1, 64)
    x[0, 40] = 3.0  # first block all zeros: scale 0 must not produce NaN
    y = lib.linear(lib.describe(qt), x)
    assert torch.isfinite(y).all()
    assert torch.allclose(y, oracle_linear(qt, x), atol=1e-4)


def oracle_moe(lay: ExpertBlobLayout, blobs: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], lay.hidden, dtype=torch.float64)
    for t in range(x.shape[0]):
        for e, wt in zip(ids[t].tolist(), wts[t].tolist()):
            gu, dn = lay.unpack(blobs[e], torch.float32)
            g, u = oracle_linear(gu, x[t : t + 1]).chunk(2, dim=-1)
            h = F.silu(g) * u
            out[t] += wt * oracle_linear(dn, h)[0].double()
    return out.float()


@pytest.mark.parametrize("names", [("q4", "q4"), ("q2", "q4"), ("q8", "q8"), ("q4", "q8")])
@pytest.mark.parametrize("tokens", [1, 6])
def test_moe_layer_matches_oracle(lib: NativeLib, names: tuple[str, str], tokens: int) -> None:
    torch.manual_seed(1)
    hidden, inter, n_exp, k = 128, 64, 8, 3
    lay = ExpertBlobLayout(hidden, inter, spec(names[0]), spec(names[1]))
    blobs = torch.stack([
        quantize_expert(lay, torch.randn(inter, hidden) * 0.1, torch.randn(inter, hidden) * 0.1, torch.randn(hidden, inter) * 0.1)
        for _ in range(n_exp)
    ])
    parts = [lay.unpack(blobs[e], torch.float32) for e in range(n_exp)]
    if not all(lib.supports(qt) for qt in parts[0]):
        pytest.skip(f"{names} not taken by the native kernels yet")
    gu = (type(lib.describe(parts[0][0])) * n_exp)(*(lib.describe(p[0]) for p in parts))
    dn = (type(gu[0]) * n_exp)(*(lib.describe(p[1]) for p in parts))
    x = torch.randn(tokens, hidden)
    ids = torch.stack([torch.randperm(n_exp)[:k] for _ in range(tokens)])  # tokens share experts: grouping is exercised
    wts = torch.rand(tokens, k)
    y = lib.moe(gu, dn, inter, x, ids, wts)
    ref = oracle_moe(lay, blobs, x, ids, wts)
    # the intermediate activation is rounded again inside, where a near-tie may flip: compare in norm
    assert float((y - ref).norm() / ref.norm()) < 1e-3
    with pytest.raises(IndexError):
        lib.moe(gu, dn, inter, x, torch.full_like(ids, n_exp), wts)
    with pytest.raises(IndexError):
        lib.moe(gu, dn, inter, x, torch.full_like(ids, -2), wts)
    # id -1 skips a pair (its expert computed elsewhere): exactly the sum without it
    skip = ids == ids[0, 0]
    assert torch.equal(lib.moe(gu, dn, inter, x, ids.masked_fill(skip, -1), wts), lib.moe(gu, dn, inter, x, ids, wts.masked_fill(skip, 0.0)))
    assert torch.equal(lib.moe(gu, dn, inter, x, torch.full_like(ids, -1), wts), torch.zeros_like(x))


@pytest.mark.parametrize("name", SPECS)
def test_dequantize_is_exact(lib: NativeLib, name: str) -> None:
    qt = QuantTensor.quantize(torch.randn(40, 128), spec(name), torch.float32)
    if not lib.supports(qt):
        pytest.skip(f"{name} not taken by the native kernels yet")
    assert torch.allclose(lib.dequantize(lib.describe(qt)), qt.dequantize(torch.float32), rtol=1e-6, atol=1e-6)


def test_bf16_in_and_out_round_as_torch_does(lib: NativeLib) -> None:
    qt = QuantTensor.quantize(torch.randn(64, 128), QuantSpec.for_bits(4), torch.bfloat16)
    x = torch.randn(2, 128).bfloat16()
    y = lib.linear(lib.describe(qt), x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, lib.linear(lib.describe(qt), x.float()).bfloat16())


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_torch_formula(layer_lib: LayerLib, dtype: torch.dtype) -> None:
    x, w = (torch.randn(3, 4, 96) * 5).to(dtype), torch.randn(96).to(dtype)
    y = layer_lib.rms_norm(x, w, 1e-5)
    ref = torch_rms_norm(x, w, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    if dtype == torch.bfloat16:
        assert torch.equal(y, ref)  # fp32 inside, then the same two roundings
    else:
        assert torch.allclose(y, ref, rtol=1e-6, atol=1e-6)
    assert layer_lib.rms_norm(x.transpose(0, 1), w, 1e-5) is None  # not contiguous: the caller's torch path


def torch_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    _, heads, _, hd = q.shape
    qg = q.float().view(1, k.shape[1], heads // k.shape[1], hd)
    probs = torch.softmax(torch.matmul(qg, k.float().transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(probs, v.float()).view(1, heads, 1, hd).to(q.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,length,scale", [(8, 2, 1, 0.125), (8, 2, 37, 0.125), (4, 4, 300, 0.125), (8, 2, 300, 3.0)])
def test_decode_attention_matches_torch(layer_lib: LayerLib, dtype: torch.dtype, heads: int, kv_heads: int, length: int, scale: float) -> None:
    """scale 3.0: peaked softmaxes, scores ~100 apart (the vector exp's clamp at -88 in play); a
    score's float rounding (~1e-6 of |score|) then moves the output by ~|score| times that."""
    torch.manual_seed(heads * 1000 + length)
    cache_k = torch.randn(2, 1, kv_heads, 400, 64).to(dtype)  # [layers, batch, kv heads, max tokens, hd], as KVCache
    cache_v = torch.randn(2, 1, kv_heads, 400, 64).to(dtype)
    q = torch.randn(1, heads, 1, 64).to(dtype)
    k, v = cache_k[1, :, :, :length], cache_v[1, :, :, :length]
    out = layer_lib.decode_attention(q, k, v, scale)
    ref = torch_decode_attention(q, k, v, scale)
    tol = (1e-5 if scale < 1 else 2e-4) if dtype == torch.float32 else 1e-2
    assert out.shape == q.shape and torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol)
    assert layer_lib.decode_attention(q.expand(2, -1, -1, -1), k, v, 0.125) is None  # batch > 1: torch's path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot", [32, 64])
def test_rope_matches_torch(layer_lib: LayerLib, dtype: torch.dtype, rot: int) -> None:
    from localglm.layers import Rotary, _rotate_half

    x = torch.randn(1, 6, 1, 64).to(dtype)
    cos, sin = Rotary(rot, 10000.0).cos_sin(torch.tensor([17]), dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    ref = torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)
    assert torch.equal(layer_lib.rope(x, cos, sin), ref)  # same roundings, element by element


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_native_dequantize_and_embedding_rows_equal_dequantize(bits: int) -> None:
    """The C scale table and quant.formats' are the same floats, so the native dequantize (prefill's
    GEMM path, a decoded token's embedding row) equals QuantTensor.dequantize() bit for bit."""
    torch.manual_seed(bits)
    qt = QuantTensor.quantize(torch.distributions.StudentT(4.0).sample((50, 128)), QuantSpec.for_bits(bits), torch.bfloat16)
    lib = native_lib()
    assert torch.equal(lib.dequantize(lib.describe(qt)), qt.dequantize(torch.float32))
    ids = torch.tensor([[3, 49, 0, 3]])
    assert torch.equal(qt.embedding(ids), qt.dequantize()[ids])
    with pytest.raises(IndexError):
        qt.embedding(torch.tensor([[50]]))


def test_the_decoder_layer_of_each_build_matches_the_torch_ops(layer_lib: LayerLib, tmp_path: Path) -> None:
    """lg_decode_layers (and through it every layer op and the quant kernels it calls) in this build:
    a tiny model with quantized attention and experts decoded by it and by the torch ops."""
    import localglm
    from localglm.models.glm4_moe.tiny import TinySpec
    from localglm.tiny import make_tiny

    spec = TinySpec(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, head_dim=32)
    net = localglm.load(str(make_tiny(tmp_path / "tiny", spec)), experts_bits=4, attn_bits=4).net
    fused = net._fused_decoder()
    assert fused is not None and fused._experts_in_ram()[1] is not None  # the whole token in one call
    fused.lib = layer_lib
    prompt = [1, 5, 9, 33, 7, 100, 3, 200]
    logits = []
    for on in (True, False):
        net.fused_decode = on
        cache = net.new_cache(16)
        with torch.inference_mode():
            net.hidden_states(torch.tensor([prompt[:4]]), cache, 0)
            logits.append(torch.stack([net.lm_head(net.hidden_states(torch.tensor([[t]]), cache, p)[0, -1]).float() for p, t in enumerate(prompt[4:], 4)]))
    assert (logits[0] - logits[1]).abs().max() <= 0.02 * logits[1].abs().max()


def test_a_struct_out_of_step_with_its_c_struct_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each library answers sizeof for the structs ctypes mirrors; a mirror that lost a field (or a C
    struct that gained one) is a programming error, named at load, not a crash in a kernel."""

    class LgMat(ctypes.Structure):
        _fields_ = quant_native.LgMat._fields_[:-1]

    class LgLayer(ctypes.Structure):
        _fields_ = layers_native.LgLayer._fields_[:-1]

    quant, layers = native_lib(), native()
    monkeypatch.setattr(quant_native, "_STRUCTS", (("lg_qtensor", quant_native._QTensor), ("lg_mat", LgMat)))
    with pytest.raises(quant_native.StructLayoutError, match=r"ctypes LgMat is \d+ bytes, C lg_mat"):
        NativeLib(quant.path)
    monkeypatch.setattr(layers_native, "_STRUCTS", (("lg_layer", LgLayer), ("lg_experts", layers_native.LgExperts)))
    with pytest.raises(quant_native.StructLayoutError, match=r"ctypes LgLayer is \d+ bytes, C lg_layer"):
        LayerLib(layers.path, quant)
    monkeypatch.setattr(layers_native, "_STRUCTS", (("lg_layer", layers_native.LgLayer),))  # lg_experts left unchecked
    with pytest.raises(quant_native.StructLayoutError, match="a ctypes mirror is missing"):
        LayerLib(layers.path, quant)


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/maps")
def test_the_layer_library_uses_the_quant_build_it_was_linked_against() -> None:
    """The model side's library records quant's build by SONAME (its file name) and finds it beside
    itself ($ORIGIN): the quant kernels it calls are the very library native_lib() loaded."""
    quant, layers = native_lib(), native()
    assert layers.path.parent == quant.path.parent
    maps = {line.split()[-1] for line in open("/proc/self/maps") if line.rstrip().endswith(".so")}
    assert str(layers.path) in maps
    assert {p for p in maps if p.startswith(str(quant.path.parent)) and "qkernels-" in p} == {str(quant.path)}


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("k", [128, 384])
def test_bf16_dequantized_rows_are_dequantize_rounded_to_bf16(lib: NativeLib, name: str, k: int) -> None:
    """lg_dequant_bf16 (the prompt's bf16 GEMM tiles): every build gives dequantize()'s floats rounded to
    nearest even, bit for bit, for any row range."""
    qt = QuantTensor.quantize(torch.randn(40, k), spec(name), torch.bfloat16)
    if not lib.supports(qt):
        pytest.skip(f"{name} not taken by the native kernels yet")
    want = qt.dequantize(torch.float32).to(torch.bfloat16)
    buf = torch.empty(40 * k, dtype=torch.bfloat16)
    assert torch.equal(lib.dequantize_bf16(lib.describe(qt), 0, 40, buf), want)
    assert torch.equal(lib.dequantize_bf16(lib.describe(qt), 7, 23, buf), want[7:23])


def test_prompt_rows_take_the_bf16_gemm_where_the_cpu_has_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """NativeLinear: bf16 activations of at least bf16_gemm_rows() rows go through torch's bf16 GEMM on
    tiles of the weight dequantized to bf16 (the tiles joined exactly: the product of the whole bf16
    weight to its rounding); fewer rows, fp32 rows, or a CPU without a fast bf16 GEMM keep the int8 tiles."""
    lib = native_lib()
    qt = QuantTensor.quantize(torch.randn(600, 256), QuantSpec.for_bits(4), torch.bfloat16)  # 600 rows: tiles of 256, 256, 88
    bias = torch.randn(600)
    tiles: list[tuple[int, int]] = []
    real = NativeLib.dequantize_bf16

    def counting(self: NativeLib, desc: object, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
        tiles.append((n0, n1))
        return real(self, desc, n0, n1, out)

    monkeypatch.setattr(NativeLib, "dequantize_bf16", counting)
    monkeypatch.setattr(quant_native, "bf16_gemm_rows", lambda: 6)
    lin = quant_native.NativeLinear(lib, qt)
    x = torch.randn(8, 256).bfloat16()
    y_one_tile = lin(x, bias)
    assert tiles == [(0, 600)]  # 600 x 256 bf16 is far below BF16_TILE_BYTES: one tile
    tiles.clear()
    monkeypatch.setattr(quant_native, "BF16_TILE_BYTES", 0)  # tiles of the least rows, BF16_TILE_ROWS
    y = lin(x, bias)
    assert tiles == [(0, 256), (256, 512), (512, 600)] and y.dtype == torch.bfloat16 and torch.equal(y, y_one_tile)
    w = qt.dequantize(torch.float32).to(torch.bfloat16).float()
    ref = F.linear(x.float(), w, bias.bfloat16().float())
    assert float((y.float() - ref).abs().max()) <= 2**-7 * float(ref.abs().max())
    tiles.clear()
    shapes: list[tuple[int, ...]] = []
    real_linear = F.linear
    monkeypatch.setattr(quant_native.F, "linear", lambda a, *r: shapes.append(tuple(a.shape)) or real_linear(a, *r))
    y7 = lin(x[:7], bias)  # 7 rows padded to a multiple of BF16_ROW_BUCKET: the GEMM sees repeated shapes only
    assert y7.shape == (7, 600) and shapes == [(quant_native.BF16_ROW_BUCKET, 256)] * 3
    assert float((y7.float() - ref[:7]).abs().max()) <= 2**-7 * float(ref.abs().max())
    tiles.clear()
    lin(x[:5], bias), lin(x.float(), bias)  # below the rows, and fp32: the int8 tiles
    monkeypatch.setattr(quant_native, "bf16_gemm_rows", lambda: None)
    lin(x, bias)
    assert tiles == []


def test_speculative_verification_rows_stay_below_the_bf16_gemm() -> None:
    """A verification of MAX_DRAFT drafted tokens plus one must keep the int8 kernels' arithmetic (greedy
    speculation equals plain decoding bit for bit): the bf16 route starts above it."""
    from localglm.options import MAX_DRAFT

    assert quant_native.BF16_GEMM_ROWS > MAX_DRAFT + 1


def test_fused_prefill_hands_long_chunks_to_the_bf16_gemm_on_wide_bf16_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """MoeDecoder: where the CPU has a bf16 GEMM, a bf16 model at least BF16_PREFILL_MIN_HIDDEN wide
    sends prompt chunks of bf16_gemm_rows() tokens or more to the torch layers (whose products use it);
    narrower, fp32, or without the GEMM, the fused layers keep chunks up to 128 tokens."""
    import localglm
    import localglm.models.moe_decoder as moe_decoder
    from localglm.models.glm4_moe.tiny import TinySpec
    from localglm.tiny import make_tiny

    path = make_tiny(tmp_path / "m", TinySpec())
    monkeypatch.setattr(moe_decoder, "BF16_PREFILL_MIN_HIDDEN", 64)
    monkeypatch.setattr(moe_decoder, "bf16_gemm_rows", lambda: 48)
    assert localglm.load(str(path)).net.fused_prefill_max == 47  # chunks of 48 tokens or more: the torch layers
    assert localglm.load(str(path), dtype="float32").net.fused_prefill_max == 128
    monkeypatch.setattr(moe_decoder, "BF16_PREFILL_MIN_HIDDEN", 1 << 20)
    assert localglm.load(str(path)).net.fused_prefill_max == 128
    monkeypatch.setattr(moe_decoder, "BF16_PREFILL_MIN_HIDDEN", 64)
    monkeypatch.setattr(moe_decoder, "bf16_gemm_rows", lambda: None)
    assert localglm.load(str(path)).net.fused_prefill_max == 128


def test_prompt_experts_chosen_by_many_tokens_take_the_bf16_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    """QuantizedExperts on a bf16 prompt where the CPU has a bf16 GEMM: experts chosen by a third more tokens
    than bf16_gemm_rows() go through it (NativeExpert), the others through one int8 MoE kernel call that skips the
    busy experts' pairs -- the layer's output close to the whole-layer kernel's (bf16 rounding), and with
    the route off equal to it."""
    import localglm.layers.experts as experts_mod
    from localglm.layers.experts import QuantizedExperts

    lib = native_lib()
    torch.manual_seed(2)
    hidden, inter, n_exp = 128, 64, 4
    lay = ExpertBlobLayout(hidden, inter, QuantSpec.for_bits(4), QuantSpec.for_bits(4))
    blobs = torch.stack([quantize_expert(lay, torch.randn(inter, hidden) * 0.1, torch.randn(inter, hidden) * 0.1, torch.randn(hidden, inter) * 0.1)
                         for _ in range(n_exp)])  # fmt: skip
    experts = QuantizedExperts({0: lay}, {0: blobs}, torch.bfloat16)
    x = torch.randn(12, hidden).bfloat16()
    ids = torch.tensor([[0, 1]] * 10 + [[2, 3]] * 2)  # experts 0 and 1: 10 tokens each; 2 and 3: 2 each
    wts = torch.rand(12, 2)
    whole = lib.moe(*experts._native_layers[0], x, ids, wts).bfloat16()
    calls: list[int] = []
    real = quant_native.NativeLinear.__call__
    monkeypatch.setattr(quant_native.NativeLinear, "__call__", lambda self, x_, bias=None: calls.append(x_.shape[0]) or real(self, x_, bias))
    monkeypatch.setattr(quant_native, "bf16_gemm_rows", lambda: 8)  # an expert needs a third more: 11 rows
    assert torch.equal(experts.forward(0, x, ids, wts), whole) and not calls
    monkeypatch.setattr(quant_native, "bf16_gemm_rows", lambda: 7)  # experts from 10 rows
    moe_ids: list[torch.Tensor] = []
    real_moe = type(lib).moe
    monkeypatch.setattr(type(lib), "moe", lambda self, *a: moe_ids.append(a[4]) or real_moe(self, *a))
    split = experts.forward(0, x, ids, wts)
    assert calls == [10, 10, 10, 10]  # gate_up and down of experts 0 and 1 through NativeLinear's bf16 route
    assert len(moe_ids) == 1 and torch.equal(moe_ids[0], ids.masked_fill(ids < 2, -1))  # experts 2 and 3 in one call
    assert float((split.float() - whole.float()).norm() / whole.float().norm()) < 2e-2
    monkeypatch.setattr(quant_native, "bf16_gemm_rows", lambda: None)
    assert torch.equal(experts.forward(0, x, ids, wts), whole)


@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16], ids=["fp32-out", "bf16-out"])
def test_streamed_rows_interleaved_or_one_after_another(lib: NativeLib, layer_lib: LayerLib, out: torch.dtype) -> None:
    """Dense bf16 rows -- a decoded token's (lg_matvec: AVX2's dot_dense4, AVX-512's dense_tile16 for fp32
    outputs, dense_tile_bh for bf16 ones), a verification's 2-4 tokens' and more tokens' (lg_mat_rows'
    tiles, chunks of rows through every tile of tokens) -- read several at a time, interleaved, or one
    after another (what AMD CPUs get by default: set_interleaved_rows): the same numbers, and every token's
    the same alone or among others, on row counts no block or chunk divides and K tails past the 16-value
    steps; the setting is restored after."""
    was = lib.set_interleaved_rows(None)
    g = torch.Generator().manual_seed(9)
    try:
        for n, k in ((13, 40), (8, 256), (37, 1040), (301, 1040)):
            w = torch.randn(n, k, generator=g).to(torch.bfloat16)
            bias = torch.randn(n, generator=g)
            mat = LayerLib.describe_matrix(w, torch.bfloat16, bias)
            x = torch.randn(9, k, generator=g).to(torch.bfloat16).float()
            got = {}
            for on in (True, False):
                assert lib.set_interleaved_rows(on) is on
                got[on] = {T: layer_lib.rows_linear(mat, x[:T], out) for T in (1, 2, 3, 4, 5, 9)}
                alone = [layer_lib.rows_linear(mat, x[t : t + 1], out) for t in range(9)]
                for T, rows in got[on].items():
                    for t in range(T):  # every token's numbers whatever T and its place among the tokens
                        assert torch.equal(rows[t : t + 1], alone[t]), (n, k, T, t, on)
            for T in got[True]:
                assert torch.equal(got[True][T], got[False][T]), (n, k, T)
            ref = (x[:1].double() @ w.double().T + bias.double()).float()
            assert (got[False][1].float() - ref).abs().max() <= 1e-2 * ref.abs().max()
    finally:
        lib.set_interleaved_rows(was)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_dense_experts_tokens_get_their_one_token_numbers(lib: NativeLib, dtype: torch.dtype) -> None:
    """expert_swiglu's native kernel (lg_dense_expert: a verification's or an append's few tokens routed to
    one expert) reads each weight row once for a tile of tokens, and every token still gets the numbers it
    gets alone, so greedy speculation stays plain decoding; close to the torch formula."""
    g = torch.Generator().manual_seed(3)
    hidden, inter = 96, 80
    gate_up = (torch.randn(2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)  # a model's weights are in its dtype
    down = (torch.randn(hidden, inter, generator=g) / inter**0.5).to(dtype)
    x = torch.randn(11, hidden, generator=g).to(dtype)
    batch = lib.dense_expert(gate_up, down, x)
    assert batch is not None and batch.dtype == dtype
    for t in range(11):
        assert torch.equal(batch[t : t + 1], lib.dense_expert(gate_up, down, x[t : t + 1].contiguous())), t
    gate, up = (x.float() @ gate_up.float().T).chunk(2, dim=-1)
    ref = (F.silu(gate) * up) @ down.float().T
    assert (batch.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_a_described_tensor_still_pickles_and_copies_with_its_own_view(lib: NativeLib) -> None:
    """describe() keeps a tensor's section addresses on it (a decoded token's embedding lookup asks every
    step): plain ints, so the tensor still pickles and deep-copies, and a copy's view points at the copy's
    own buffer, not the original's."""
    import copy
    import pickle

    qt = QuantTensor.quantize(torch.randn(24, 128), spec("q4"), torch.float32)
    if not lib.supports(qt):
        pytest.skip("q4 not taken by the native kernels")
    x = torch.randn(3, 128)
    want = lib.linear(lib.describe(qt), x)
    for other in (pickle.loads(pickle.dumps(qt)), copy.deepcopy(qt)):
        view = lib.describe(other)
        assert view.data == other.section("data").data_ptr() != qt.section("data").data_ptr()
        assert torch.equal(lib.linear(view, x), want)
