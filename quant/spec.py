"""What a localglm quantized tensor is, apart from its numbers: the spec (bits, group) and the
layout of its flat uint8 buffer. No torch here, so `localglm plan` reads recipes and sizes without
loading it; quant/formats.py (the quantizers and QuantTensor) re-exports all of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

SUPPORTED_BITS = (2, 4, 8)
GROUP = 32  # default group size along K (torch's int4 CPU kernel takes 32..256; Q8_0's block is 32)
GROUPS = (32, 64, 128, 256)
_ALIGN = 64


class QuantError(ValueError):
    """A bad quantization request (bits, group, shape); the message is one line."""


def _align(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class QuantSpec:
    """Which scheme: bits in {2, 4, 8} and the group size along K (32, 64, 128 or 256) for every width."""

    bits: int
    group: int = GROUP
    # True for GGUF block types held as stored (quant.kquants.GGMLSpec): one section, the blocks.
    raw_blocks: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QuantError(f"bits must be one of 2, 4, 8 (got {self.bits})")
        if self.group == 0:
            raise QuantError(f"q{self.bits}: per-row scales (group 0) are no longer a format; groups are 32, 64, 128 or 256")
        if self.group not in GROUPS:
            raise QuantError(f"{self.bits}-bit group must be 32, 64, 128 or 256 (got {self.group})")

    @classmethod
    def for_bits(cls, bits: int) -> QuantSpec:
        if bits not in SUPPORTED_BITS:
            raise QuantError(f"bits must be one of 2, 4, 8 (got {bits})")
        return cls(bits, GROUP)

    @property
    def name(self) -> str:
        return f"q{self.bits}" if self.group == GROUP else f"q{self.bits}g{self.group}"

    @classmethod
    def parse(cls, name: str) -> QuantSpec:
        """'q4', 'q8g64', ... (the names `name` gives; 'q4_k', 'iq4_xs', ...: a GGUF block type held as
        stored, quant.kquants); a bad width or group says which."""
        if "_" in name:
            from .kquants import GGMLSpec

            return GGMLSpec.of(name)
        bits, _, group = name[1:].partition("g")
        if not name.startswith("q") or not bits.isdigit() or not (group.isdigit() or not group):
            raise QuantError(f"unknown quant spec {name!r} (expected q2, q4 or q8, with an optional group as in q8g64)")
        return cls(int(bits), int(group)) if group else cls.for_bits(int(bits))

    def check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise QuantError(f"only 2-D weights are quantized, got shape {list(shape)}")
        if shape[1] % self.group:
            raise QuantError(f"K={shape[1]} is not a multiple of the group size {self.group}")
        if shape[1] % (8 // self.bits):
            raise QuantError(f"K={shape[1]} does not pack into bytes at {self.bits} bits")

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        return 8.0 * layout_nbytes(self, shape, aligned=False) / (shape[0] * shape[1])

    def section_sizes(self, shape: tuple[int, int]) -> dict[str, int]:
        """Section name -> byte length, in buffer order (see `layout`)."""
        n, k = shape
        ng = n * (k // self.group)
        if self.bits == 8:
            return {"rowf": n * 4, "data": n * k, "gscale": 2 * ng}
        return {"rowf": n * 8, "data": n * k * self.bits // 8, "scode": ng, "mcode": ng}


# ------------------------------------------------------------------------------------------------
# What the CUDA kernels keep beside a tensor (torch-free: the planner sizes GPU memory with it)
# ------------------------------------------------------------------------------------------------
TINYGEMM_N = 8  # tinygemm's N tile
TINYGEMM_K = 32  # the smallest K it packs (2 inner k-tiles of 16)


def tinygemm_shape(spec: QuantSpec, shape: tuple[int, int], dtype_bytes: int) -> bool:
    """Whether quant/cuda_kernels.py multiplies this tensor through tinygemm on an sm80+ GPU: q2/q4
    in a bf16 model (2-byte compute dtype; a float16 one takes the dense kernel too, see
    cuda_kernels.uses_tinygemm), N a multiple of 8 and K of 32."""
    n, k = shape
    return not spec.raw_blocks and spec.bits in (2, 4) and dtype_bytes == 2 and n % TINYGEMM_N == 0 and k % TINYGEMM_K == 0


def cuda_prepared_nbytes(spec: QuantSpec, shape: tuple[int, int], dtype_bytes: int, tinygemm: bool = True) -> int:
    """Device bytes the CUDA kernel of one tensor keeps beside its stored buffer: tinygemm's int4 tiles
    (K/2 bytes a row, q2 included) plus bf16 scale/zero pairs (4 bytes a group), or the dense weight in
    the compute dtype (q8, and shapes / dtypes / GPUs tinygemm does not take); nothing for GGUF blocks
    (their kernel expands a bounded chunk per call)."""
    n, k = shape
    if spec.raw_blocks:
        return 0
    if tinygemm and tinygemm_shape(spec, shape, dtype_bytes):
        return n * k // 2 + 4 * n * (k // spec.group)
    return n * k * dtype_bytes


# ------------------------------------------------------------------------------------------------
# Layout of one quantized tensor in its uint8 buffer
# ------------------------------------------------------------------------------------------------


def layout(spec: QuantSpec, shape: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Section name -> (byte offset, byte length) inside the tensor's buffer.

    q8: rowf (fp32 [N, 1]) | data (int8 [N, K], row-major) | gscale (fp16 [N, K/G]);
        w[n, k] = rowf[n] * gscale[n, k // G] * data[n, k]. Our quantizer stores the row's largest
        group scale in rowf, so gscale lies in (0, 1]; the contract is only the product (a GGUF Q8_0
        tensor is stored with rowf = 1 and gscale = its block scales d, bit for bit).
    q2/q4: rowf (fp32 [N, 2]: largest group scale, largest |offset|) | data (codes packed little-end
    first: element k of a row sits in byte k*b//8 at bit (k*b) % 8) | scode (uint8 [N, K/G]) | mcode (int8 [N, K/G]).
    """
    out: dict[str, tuple[int, int]] = {}
    pos = 0
    for key, size in spec.section_sizes(shape).items():
        out[key] = (pos, size)
        pos += size
    return out


def layout_nbytes(spec: QuantSpec, shape: tuple[int, int], aligned: bool = True) -> int:
    end = max(o + n for o, n in layout(spec, shape).values())
    return _align(end) if aligned else end
