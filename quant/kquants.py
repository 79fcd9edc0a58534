"""llama.cpp's K-quant, legacy and i-quant block formats held as stored: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, IQ4_XS and the grid types IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS,
IQ3_S (Q8_0 becomes our q8 losslessly: quant/gguf_packed.py). The block-32
types matter beside the K-quants: llama.cpp falls back to them for rows that are not whole 256-weight
blocks (GLM-4.5-Air's 1408-wide experts' down projections, for one).

Why as stored: the published GGUF mixes (one of these types per tensor) would otherwise be
dequantized to bf16 (4-8x the RAM) or re-quantized (a second loss). A tensor of one of these types is
a `QuantTensor` whose spec is a `GGMLSpec` and whose buffer has a single section, `data`: the
tensor's blocks exactly as the file stores them, row-major ([N, K / block] blocks, so rows can be
selected and concatenated like any section, and an expert blob is still one copy).

Every type here decodes a block into small integer codes q, one fp32 scale per sub-block and, for
the asymmetric types, one fp32 offset per sub-block:  w = scale[sub] * q  (- offset[sub]).
scale and offset are the fp16 super-block factors (converted exactly) times the integer sub-block
codes, one fp32 product each -- the same operations, in the same order, as `gguf.quants` (numpy) and
llama.cpp's dequantize_row_*, so `dequantize` here is bit-exact with both (tests/test_kquants.py).

Kernels (`prepare_ggml`): on the CPU the native C kernels (quant/native/kquants.c): for any number of
rows (decode, prefill) the codes times activations rounded to int8 per 256 (K types) or 32, as
llama.cpp multiplies (equal to `int8_grid(x, act_block(spec)) @ W.T` to fp32 rounding), integer
sums over each block, tokens 4 at a time per weight row, each token's result bit-identical whatever
the number of rows; `KQuantLib.matmul(..., int8=False)` is the fp32-activation kernel
(equal to dequantize + fp32 matmul to fp32 rounding). Elsewhere (no C compiler, CUDA) the torch fallback dequantizes a bounded chunk of
rows per call and multiplies it -- on a GPU this is the documented fallback: the blocks stay packed
in device memory and are expanded chunk by chunk on each call, never kept dense.

The fused decode (localglm/models/fused_decode.py) takes these tensors too: quant.native describes one
as an lg_mat of kind GGML (a stack of them, quant/stack.py, as kind STACK), and its lg_matvec and
lg_mat_rows call kq_matmul_q8 -- the same product, the same rounding, as GGMLKernel below.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .formats import QuantError, QuantSpec
from .native import MAT_GGML, LgMat, bf16_gemm_takes, bf16_tiled_linear


QK_K = 256


@dataclass(frozen=True)
class GGMLType:
    """One block format: weights per block, bytes per block, nominal bits, and its id in kquants.c."""

    name: str
    block: int
    nbytes: int
    bits: int
    cid: int


# The types held as stored (sizes as gguf.GGML_QUANT_SIZES; cid = kquants.c's `enum kq_type`).
GGML_TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("Q4_0", 32, 18, 4, 0),
        GGMLType("Q5_0", 32, 22, 5, 1),
        GGMLType("Q2_K", QK_K, 84, 2, 2),
        GGMLType("Q3_K", QK_K, 110, 3, 3),
        GGMLType("Q4_K", QK_K, 144, 4, 4),
        GGMLType("Q5_K", QK_K, 176, 5, 5),
        GGMLType("Q6_K", QK_K, 210, 6, 6),
        GGMLType("IQ4_XS", QK_K, 136, 4, 7),
        GGMLType("Q4_1", 32, 20, 4, 8),
        GGMLType("Q5_1", 32, 24, 5, 9),
        GGMLType("IQ4_NL", 32, 18, 4, 10),
        GGMLType("IQ2_XXS", QK_K, 66, 2, 11),
        GGMLType("IQ2_XS", QK_K, 74, 2, 12),
        GGMLType("IQ2_S", QK_K, 82, 2, 13),
        GGMLType("IQ3_XXS", QK_K, 98, 3, 14),
        GGMLType("IQ3_S", QK_K, 110, 3, 15),
        GGMLType("IQ1_S", QK_K, 50, 1, 16),
        GGMLType("IQ1_M", QK_K, 56, 1, 17),
    )
}
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # llama.cpp kvalues_iq4nl


@dataclass(frozen=True)
class GGMLSpec(QuantSpec):
    """A QuantSpec for a GGUF block type held as stored: `ggml` names the type; bits and group are
    the type's nominal bits and block size (for display and shape checks only)."""

    ggml: str = field(default="Q4_K")
    raw_blocks = True  # a class attribute (not a field): formats.QuantTensor reads the buffer as blocks

    @classmethod
    def of(cls, ggml: str) -> GGMLSpec:
        t = GGML_TYPES.get(ggml.upper())
        if t is None:
            raise QuantError(f"GGUF type {ggml} is not held as stored (held: {', '.join(GGML_TYPES)})")
        return cls(t.bits, t.block, t.name)

    def __post_init__(self) -> None:
        t = GGML_TYPES.get(self.ggml)
        if t is None or (self.bits, self.group) != (t.bits, t.block):
            raise QuantError(f"bad GGUF spec {self.ggml} (bits {self.bits}, block {self.group})")

    @property
    def type(self) -> GGMLType:
        return GGML_TYPES[self.ggml]

    @property
    def name(self) -> str:
        return self.ggml.lower()

    def check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise QuantError(f"only 2-D weights are held as {self.ggml}, got shape {list(shape)}")
        if shape[1] % self.group:
            raise QuantError(f"{self.ggml} rows of {shape[1]} weights do not split into blocks of {self.group}")

    def row_bytes(self, k: int) -> int:
        return k // self.group * self.type.nbytes

    def section_sizes(self, shape: tuple[int, int]) -> dict[str, int]:
        return {"data": shape[0] * self.row_bytes(shape[1])}

    def lg_mat(self, qt: object, bias: int | None) -> LgMat | None:
        """The C view of a tensor of this type for the fused decode (quant.native.describe_matrix asks the
        spec: an LgMat of kind GGML, `bias` an fp32 address or None), or None where no native K-quant
        kernels run it (kquant_lib() None, not on the CPU, rows not whole blocks)."""
        if kquant_lib() is None or qt.device.type != "cpu" or qt.buf.numel() == 0 or qt.shape[1] % self.type.block:  # type: ignore[attr-defined]
            return None
        return LgMat(MAT_GGML, qt.shape[0], qt.shape[1], self.type.cid, qt.section("data").data_ptr(), bias)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------
# Decoding blocks with torch: codes, per-sub-block scales and offsets
# ------------------------------------------------------------------------------------------------


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per block (little-endian fp16) -> fp32 [nb, 1], exactly."""
    return b.contiguous().view(torch.float16).float()


def _bits(b: torch.Tensor, shifts: list[int], mask: int, view: tuple[int, ...], out: tuple[int, ...]) -> torch.Tensor:
    """(b viewed as `view`, with a new axis before the last) >> each of `shifts`, & mask, as `out`."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=b.device).view(1, 1, -1, 1)
    return ((b.reshape(view).unsqueeze(2) >> s) & mask).reshape(out)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (get_scale_min_k4)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], 1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], 1)
    return sc, mn


def decode_blocks(blocks: torch.Tensor, ggml: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """uint8 blocks [nb, nbytes] -> (codes float [nb, subs, sub], scale fp32 [nb, subs, 1], offset
    fp32 [nb, subs, 1] or None), with w = scale * codes (- offset). (Q4_1 / Q5_1 add their fp16 m: the offset
    is -m, and x - (-m) is x + m exactly.)"""
    nb = blocks.shape[0]
    b = blocks
    if ggml == "Q4_0":
        q = _bits(b[:, 2:18], [0, 4], 15, (nb, 1, 16), (nb, 1, 32)).float() - 8
        return q, _f16(b[:, 0:2]).view(nb, 1, 1), None
    if ggml in ("Q5_0", "Q5_1"):
        o = 0 if ggml == "Q5_0" else 2  # Q5_1: d, m, then as Q5_0
        lo = _bits(b[:, 6 + o : 22 + o], [0, 4], 15, (nb, 1, 16), (nb, 32))
        hi = _bits(b[:, 2 + o : 6 + o], list(range(8)), 1, (nb, 4, 1), (nb, 4, 8, 1))  # bit j of the LE uint32 = element j
        q = (lo | (hi.reshape(nb, 32) << 4)).float()
        if ggml == "Q5_0":
            return (q - 16).view(nb, 1, 32), _f16(b[:, 0:2]).view(nb, 1, 1), None
        return q.view(nb, 1, 32), _f16(b[:, 0:2]).view(nb, 1, 1), -_f16(b[:, 2:4]).view(nb, 1, 1)
    if ggml == "Q4_1":
        q = _bits(b[:, 4:20], [0, 4], 15, (nb, 1, 16), (nb, 1, 32)).float()
        return q, _f16(b[:, 0:2]).view(nb, 1, 1), -_f16(b[:, 2:4]).view(nb, 1, 1)
    if ggml == "IQ4_NL":
        idx = _bits(b[:, 2:18], [0, 4], 15, (nb, 1, 16), (nb, 1, 32)).long()
        return torch.tensor(IQ4_VALUES, dtype=torch.float32, device=b.device)[idx], _f16(b[:, 0:2]).view(nb, 1, 1), None
    if ggml == "Q2_K":
        scales, d, dmin = b[:, 0:16], _f16(b[:, 80:82]), _f16(b[:, 82:84])
        q = _bits(b[:, 16:80], [0, 2, 4, 6], 3, (nb, 2, 32), (nb, 16, 16)).float()
        return q, (d * (scales & 15).float()).unsqueeze(-1), (dmin * (scales >> 4).float()).unsqueeze(-1)
    if ggml == "Q3_K":
        hmask, qs, s, d = b[:, 0:32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
        lo = _bits(s[:, 0:8], [0, 4], 15, (nb, 1, 8), (nb, 16))
        hi = _bits(s[:, 8:12], [0, 2, 4, 6], 3, (nb, 1, 4), (nb, 16))
        sc = (lo | (hi << 4)).float() - 32
        ql = _bits(qs, [0, 2, 4, 6], 3, (nb, 2, 32), (nb, 16, 16)).float()
        qh = _bits(hmask, list(range(8)), 1, (nb, 1, 32), (nb, 16, 16)).float()
        return ql - 4 * (1 - qh), (d * sc).unsqueeze(-1), None
    if ggml in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = _scale_min_k4(b[:, 4:16])
        qs = b[:, 16:144] if ggml == "Q4_K" else b[:, 48:176]
        q = _bits(qs, [0, 4], 15, (nb, 4, 32), (nb, 8, 32))
        if ggml == "Q5_K":
            q = q | (_bits(b[:, 16:48], list(range(8)), 1, (nb, 1, 32), (nb, 8, 32)) << 4)
        return q.float(), (d * sc.float()).unsqueeze(-1), (dmin * mn.float()).unsqueeze(-1)
    if ggml == "Q6_K":
        ql = _bits(b[:, 0:128], [0, 4], 15, (nb, 2, 64), (nb, 8, 32))
        qh = _bits(b[:, 128:192], [0, 2, 4, 6], 3, (nb, 2, 32), (nb, 8, 32))
        q = ((ql | (qh << 4)).float() - 32).view(nb, 16, 16)
        sc = b[:, 192:208].contiguous().view(torch.int8).float()
        return q, (_f16(b[:, 208:210]) * sc).unsqueeze(-1), None
    if ggml == "IQ4_XS":
        d = _f16(b[:, 0:2])
        sh = b[:, 2:4].to(torch.int32)
        sh = ((sh[:, :1] | (sh[:, 1:2] << 8)) >> torch.arange(0, 16, 2, device=b.device, dtype=torch.int32)) & 3
        sl = _bits(b[:, 4:8], [0, 4], 15, (nb, 4, 1), (nb, 8))
        sc = (sl.to(torch.int32) | (sh << 4)).float() - 32
        idx = _bits(b[:, 8:136], [0, 4], 15, (nb, 8, 16), (nb, 8, 32)).long()
        q = torch.tensor(IQ4_VALUES, dtype=torch.float32, device=b.device)[idx]
        return q, (d * sc).unsqueeze(-1), None
    if ggml in IQ_GRID_TYPES:
        return _decode_iq(b, ggml)
    raise QuantError(f"GGUF type {ggml} is not held as stored (held: {', '.join(GGML_TYPES)})")


# The i-quants: each weight a value of a fixed grid (quant/iq_tables.py) with a sign, times its sub-block's scale.
IQ_GRID_TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M")


@functools.cache
def _iq_grid(name: str) -> torch.Tensor:
    """gguf.quants' grid of the type as float32 [rows, values per row] (IQ1_M shares IQ1_S's)."""
    from .iq_tables import grid_values

    return torch.from_numpy(grid_values("IQ1_S" if name == "IQ1_M" else name)).float()


@functools.cache
def _ksigns() -> torch.Tensor:
    from .iq_tables import ksigns

    return torch.tensor(list(ksigns()), dtype=torch.int64)


def _sign_bits(bytes_: torch.Tensor, nb: int, groups: int) -> torch.Tensor:
    """Sign bytes [nb, groups] (bit j: the group's weight j negative) -> +-1 floats [nb, groups, 8]."""
    bits = (bytes_.to(torch.int64).unsqueeze(-1) >> torch.arange(8, device=bytes_.device)) & 1
    return (1 - 2 * bits).float().reshape(nb, groups, 8)


def _le(bits: int, b: torch.Tensor) -> torch.Tensor:
    """Bytes [..., n] read as little-endian unsigned words of 16 or 32 bits, as int64 [..., n * 8 / bits]."""
    dtype = torch.int32 if bits == 32 else torch.int16
    return b.contiguous().view(dtype).to(torch.int64) & ((1 << bits) - 1)


def _decode_iq(b: torch.Tensor, ggml: str) -> tuple[torch.Tensor, torch.Tensor, None]:
    """decode_blocks for the i-quants, as gguf.quants computes them: scale [nb, subs, 1] the sub-block's
    fp32 factor, codes the signed grid values (IQ1: 8 * (value + delta), the scale carrying the 1/8,
    so scale * code is gguf's d * (value + delta) exactly)."""
    nb, dev = b.shape[0], b.device
    grid = _iq_grid(ggml).to(dev)
    if ggml in ("IQ2_XXS", "IQ3_XXS"):
        d = _f16(b[:, 0:2])
        if ggml == "IQ2_XXS":
            words = _le(32, b[:, 2:66]).view(nb, 8, 2)
            idx, aux = (words[..., 0:1] >> torch.arange(0, 32, 8, device=dev)) & 255, words[..., 1]
            q = grid[idx].reshape(nb, 8, 32)  # 4 rows of 8 a sub-block
            factor = 0.25
        else:
            aux = _le(32, b[:, 66:98])
            q = grid[b[:, 2:66].to(torch.int64)].reshape(nb, 8, 32)  # 8 rows of 4 a sub-block
            factor = 0.5
        db = d * (0.5 + (aux >> 28).float()) * factor
        signs = _ksigns().to(dev)[(aux.unsqueeze(-1) >> torch.arange(0, 28, 7, device=dev)) & 127]
        return q * _sign_bits(signs, nb, 32).reshape(nb, 8, 32), db.unsqueeze(-1), None
    if ggml in ("IQ2_XS", "IQ2_S"):
        d = _f16(b[:, 0:2])
        if ggml == "IQ2_XS":
            v = _le(16, b[:, 2:66])
            idx, signs = v & 511, _ksigns().to(dev)[v >> 9]
            sc = b[:, 66:74]
        else:
            qh = (b[:, 66:74].to(torch.int64).unsqueeze(-1) >> torch.arange(0, 8, 2, device=dev)) & 3
            idx, signs = b[:, 2:34].to(torch.int64) | (qh.reshape(nb, 32) << 8), b[:, 34:66]
            sc = b[:, 74:82]
        ls = _bits(sc, [0, 4], 15, (nb, 8, 1), (nb, 16)).float()  # low nibble first, byte by byte
        db = d * (0.5 + ls) * 0.25
        q = grid[idx].reshape(nb, 32, 8) * _sign_bits(signs, nb, 32)
        return q.reshape(nb, 16, 16), db.unsqueeze(-1), None
    if ggml == "IQ3_S":
        d = _f16(b[:, 0:2])
        qh = (b[:, 66:74].to(torch.int64).unsqueeze(-1) >> torch.arange(8, device=dev)) & 1
        q = grid[b[:, 2:66].to(torch.int64) | (qh.reshape(nb, 64) << 8)].reshape(nb, 32, 8) * _sign_bits(b[:, 74:106], nb, 32)
        ls = _bits(b[:, 106:110], [0, 4], 15, (nb, 4, 1), (nb, 8)).float()
        return q.reshape(nb, 8, 32), (d * (1 + 2 * ls)).unsqueeze(-1), None
    if ggml == "IQ1_S":
        d = _f16(b[:, 0:2])
        qh = _le(16, b[:, 34:50])  # [nb, 8]
        idx = b[:, 2:34].to(torch.int64).view(nb, 8, 4) | (((qh.unsqueeze(-1) >> torch.arange(0, 12, 3, device=dev)) & 7) << 8)
        delta = torch.where(qh & 0x8000 != 0, -1.0, 1.0).view(nb, 8, 1, 1)
        q = (8 * grid[idx] + delta).reshape(nb, 8, 32)
        dl = d * (2 * ((qh >> 12) & 7) + 1).float() * 0.125
        return q, dl.unsqueeze(-1), None
    # IQ1_M: d from the top nibbles of the four scale words
    u = _le(16, b[:, 48:56])  # [nb, 4]
    h = ((u[:, 0] >> 12) | ((u[:, 1] >> 8) & 0xF0) | ((u[:, 2] >> 4) & 0xF00) | (u[:, 3] & 0xF000)).to(torch.int16)
    d = h.view(torch.float16).float().view(nb, 1)
    nib = (b[:, 32:48].to(torch.int64).unsqueeze(-1) >> torch.tensor([0, 4], device=dev)) & 15  # [nb, 16, 2] -> index order
    nib = nib.reshape(nb, 32)
    q = 8 * grid[b[:, 0:32].to(torch.int64) | ((nib & 7) << 8)] + torch.where(nib & 8 != 0, -1.0, 1.0).unsqueeze(-1)
    ls = ((u.unsqueeze(-1) >> torch.arange(0, 12, 3, device=dev)) & 7).reshape(nb, 16)
    dl = d * (2 * ls + 1).float() * 0.125
    return q.reshape(nb, 16, 16), dl.unsqueeze(-1), None


def dequantize_blocks(blocks: torch.Tensor, ggml: str) -> torch.Tensor:
    """uint8 blocks [nb, nbytes] -> fp32 weights [nb, block], bit-exact with gguf.quants.dequantize."""
    q, scale, offset = decode_blocks(blocks, ggml)
    w = scale * q
    if offset is not None:
        w = w - offset
    return w.reshape(blocks.shape[0], -1)


def dequantize(data: torch.Tensor, spec: GGMLSpec, shape: tuple[int, int]) -> torch.Tensor:
    """A tensor's blocks (uint8 [N, row bytes] or flat) -> fp32 [N, K]."""
    n, k = shape
    t = spec.type
    return dequantize_blocks(data.reshape(n * (k // t.block), t.nbytes), spec.ggml).view(n, k)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

SOURCE = Path(__file__).with_name("native") / "kquants.c"  # built into quant.native's library
# Up to this many rows (tokens) per call the native kernel multiplies the blocks with int8 activations
# (kquants.c kq_matmul_q8, llama.cpp's approach: integer sums over each block, tokens 4 at a time per
# weight row); a token's result is then the same whatever the number of tokens beside it. The default
# takes every row count; tests set it to 0 to multiply through dequantize + fp32 GEMM (exact products).
NATIVE_MAX_ROWS = 1 << 62
CHUNK_ELEMENTS = 1 << 22  # the torch fallback expands at most this many weights (16 MB of fp32) at a time


class KQuantLib:
    """quant/native/kquants.c loaded: `matmul` (x [T, K] fp32 -> [T, N]) and `dequantize`."""

    def __init__(self, path: Path) -> None:
        self._lib = ctypes.CDLL(str(path))
        p, i = ctypes.c_void_p, ctypes.c_int
        for fn in (self._lib.kq_matmul, self._lib.kq_matmul_q8):
            fn.argtypes = [i, p, i, i, p, i, p, i]
            fn.restype = i
        self._lib.kq_dequant.argtypes = [i, p, i, i, p, i]
        self._lib.kq_dequant.restype = i
        self._lib.kq_dequant_bf16.argtypes = [i, p, i, i, i, i, p, i]
        self._lib.kq_dequant_bf16.restype = i

    def matmul(self, spec: GGMLSpec, data: torch.Tensor, shape: tuple[int, int], x: torch.Tensor, int8: bool = False) -> torch.Tensor:
        """x [T, K] @ W.T in fp32: with fp32 activations (exact to fp32 rounding), or `int8` (activations
        rounded to int8 per act_block values, as llama.cpp does: several times faster on AVX2; equals
        `int8_grid(x, act_block(spec)) @ W.T` to fp32 rounding, each token's row bit-identical whatever T)."""
        n, k = shape
        x = x.float().contiguous()
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        fn = self._lib.kq_matmul_q8 if int8 else self._lib.kq_matmul
        rc = fn(spec.type.cid, data.data_ptr(), n, k, x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads())
        if rc:
            raise QuantError(f"native {spec.ggml} kernel refused [{n}, {k}] x {x.shape[0]} rows (code {rc})")
        return y

    def dequantize_bf16(self, spec: GGMLSpec, data: torch.Tensor, shape: tuple[int, int], n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [n0, n1) as bf16 [n1 - n0, K] in out's first values (quant.native.bf16_tiled_linear's tile):
        `dequantize`'s floats rounded to nearest even."""
        n, k = shape
        if self._lib.kq_dequant_bf16(spec.type.cid, data.data_ptr(), n, k, n0, n1, out.data_ptr(), torch.get_num_threads()):
            raise QuantError(f"native {spec.ggml} dequantize refused rows [{n0}, {n1}) of [{n}, {k}]")
        return out[: (n1 - n0) * k].view(n1 - n0, k)

    def dequantize(self, spec: GGMLSpec, data: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        n, k = shape
        out = torch.empty(n, k, dtype=torch.float32)
        if self._lib.kq_dequant(spec.type.cid, data.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads()):
            raise QuantError(f"native {spec.ggml} dequantize refused [{n}, {k}]")
        return out


@functools.cache
def kquant_lib() -> KQuantLib | None:
    """The native K-quant kernels: kquants.c is built into quant's library (quant.native, which the
    fused decode's lg_matvec calls it from), so one build serves both; None where that library is
    not built (no compiler, LOCALGLM_NATIVE=0: quant.native has logged why)."""
    from .native import native_lib

    lib = native_lib()
    return KQuantLib(lib.path) if lib is not None else None


class GGMLKernel:
    """x @ W.T for a GGMLSpec tensor: native on the CPU where built, else the torch fallback."""

    def __init__(self, qt: object, lib: KQuantLib | None) -> None:
        # The blocks themselves (a view: no copy), kept here so `prepare(drop_buffer=True)` may drop the
        # tensor's buffer reference: the kernel multiplies the stored blocks, it has no form of its own.
        self.spec: GGMLSpec = qt.spec  # type: ignore[attr-defined]
        self.shape = (int(qt.shape[0]), int(qt.shape[1]))  # type: ignore[attr-defined]
        self.data = qt.section("data")  # type: ignore[attr-defined]
        self.lib = lib

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        spec, shape, data = self.spec, self.shape, self.data
        lead = x.shape[:-1]
        x2 = x.reshape(-1, shape[1])
        if self.lib is not None and data.device.type == "cpu" and bf16_gemm_takes(x2.dtype, x2.shape[0]):
            lib = self.lib  # a prompt chunk on a CPU with a native bf16 GEMM: the blocks to bf16 a tile at a time
            y = bf16_tiled_linear(x2.contiguous(), shape[0], shape[1], lambda n0, n1, buf: lib.dequantize_bf16(spec, data, shape, n0, n1, buf), bias)
            return y.view(*lead, shape[0])
        if self.lib is not None and data.device.type == "cpu":
            if x2.shape[0] <= NATIVE_MAX_ROWS:
                y = self.lib.matmul(spec, data, shape, x2, int8=True)
            else:
                y = F.linear(x2.float(), self.lib.dequantize(spec, data, shape))
        else:
            y = torch_matmul(spec, data, shape, x2)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(x.dtype).view(*lead, shape[0])


def act_block(spec: GGMLSpec) -> int:
    """Values per activation scale in kq_matmul_q8: 256 for the K-quant types (llama.cpp's Q8_K), 32 for
    the 32-weight types (Q8_0)."""
    return QK_K if spec.type.block == QK_K else 32


def int8_grid(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x [T, K] (K a multiple of `block`) rounded to the int8 grid kq_matmul_q8 multiplies with: per
    `block` values (act_block) d = amax / 127, q = round-half-even(x * (1 / d)) -- the same fp32
    operations as kquants.c quant_act."""
    xb = x.float().reshape(x.shape[0], -1, block)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(xb * inv) * d).reshape(x.shape)


def torch_matmul(spec: GGMLSpec, data: torch.Tensor, shape: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
    """The torch fallback: x [T, K] @ W.T in fp32, W dequantized CHUNK_ELEMENTS weights at a time (so
    a dense copy of the whole weight never exists), on data's device."""
    n, k = shape
    rows = max(1, CHUNK_ELEMENTS // k)
    data = data.reshape(n, -1)
    xf = x.to(device=data.device, dtype=torch.float32)
    parts = [F.linear(xf, dequantize(data[r : r + rows], spec, (min(rows, n - r), k))) for r in range(0, n, rows)]
    return torch.cat(parts, -1)


def prepare_ggml(qt: object) -> Callable[..., torch.Tensor]:
    """The kernel for a GGMLSpec QuantTensor on its device (quant.formats.prepare calls this)."""
    lib = kquant_lib() if qt.device.type == "cpu" else None  # type: ignore[attr-defined]
    return GGMLKernel(qt, lib)


def kernel_status() -> str:
    """One line: which kernels run GGUF blocks held as stored."""
    return "native K-quant kernels (int8 activations)" if kquant_lib() is not None else "torch fallback (dequantized per chunk)"


__all__ = ["GGML_TYPES", "GGMLSpec", "GGMLType", "decode_blocks", "dequantize", "dequantize_blocks", "int8_grid", "act_block", "prepare_ggml", "kquant_lib", "torch_matmul"]
