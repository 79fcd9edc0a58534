"""CPU matmul kernels for QuantTensor, prepared once per tensor.

`prepare_cpu` picks localglm's native kernel (quant/native.py: int8 dot products on the packed
bytes, built with the machine's C compiler at first use) wherever it is available; the torch
kernels below are the fallback when it cannot be built (no compiler, LOCALGLM_NATIVE=0).
`LOCALGLM_NATIVE=0 LOCALGLM_CPU_KERNEL=dense` makes every tensor a DenseKernel: in float32 the exact
math of the dequantized weights, the oracle benchmarks/gpu_check.py holds the GPU to.

- q8 -> torch's `aten._weight_int8pack_mm` takes one scale per row, our q8 has one per group of 32,
  so this fallback dequantizes the weight once, at prepare time, to a dense tensor in the compute
  dtype (2 bytes a weight for bf16) and multiplies in that dtype up to `DENSE_DIRECT_ROWS` rows, with
  `dense_linear` beyond (bf16 batches in fp32 on CPUs without native bf16). The native
  kernel (quant/native) reads the packed bytes instead.
- q4 / q2 -> `aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros[K/G, N, 2])`, whose
  convention is w = (q - 8) * scale + zero with q in [0, 16). Our w = s * c + m maps to
  q = c, zero = m + 8 s (q4) and q = c + 8, zero = m (q2: the 2-bit codes ride in the 4-bit
  kernel, so a q2 tensor costs 4 bits a weight in RAM once prepared; the file stays 2-bit).

Measured on this 2-core AVX2 machine (no AVX512, no native bf16): a matrix-vector product through
the int4 kernel is ~4x faster than bf16 F.linear. The kernels run in bf16 (fp32 activations with more
than one row are cast to bf16, where the int kernels are many times faster than in fp32). For large
batches (prefill) the weight is dequantized to fp32 once per call and multiplied by MKL's fp32 GEMM,
which beats the int kernels from about `DEQUANT_MIN_ROWS` rows on.
"""

from __future__ import annotations

import os

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F

from .formats import QuantTensor

_INT4MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default  # .default: skips overload resolution per call
DEQUANT_MIN_ROWS = 256  # int kernels in bf16 match dequant + fp32 GEMM up to ~64 rows (measured); beyond, dequant wins
# Below this many rows the dense q8 weight is used in its own dtype; from here on `linear` upcasts bf16 to
# fp32 per call (measured on a 4096x4096 bf16 weight, busy 2-core AVX2: 2 rows 8 ms direct vs 99 ms upcast, 128 rows 418 vs 160).
DENSE_DIRECT_ROWS = 32


@cache
def cpu_bf16_gemm_is_slow() -> bool:
    """True on CPUs without native bf16 (no AVX512-BF16 / AMX), where bf16 GEMM runs ~7x below fp32."""
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def dense_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, but batched bf16 on such CPUs upcasts to fp32 per call (weights stay bf16 in RAM).

    A matrix-vector product is memory-bound and stays in bf16; a matrix-matrix product (prefill,
    experts hit by several tokens) is compute-bound, where the upcast costs far less than it saves.
    """
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() > x.shape[-1] and cpu_bf16_gemm_is_slow():
        return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    return F.linear(x, w, b)


class DenseKernel:
    """q8 without a per-group int8 kernel in torch: the dense weight, built once (on the tensor's
    device: the CUDA q8 path uses it too)."""

    def __init__(self, qt: QuantTensor) -> None:
        self.w = qt.dequantize(qt.dtype).contiguous()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        xd, b = x.to(self.w.dtype), None if bias is None else bias.to(self.w.dtype)
        few_rows = xd.numel() < DENSE_DIRECT_ROWS * xd.shape[-1]
        return (F.linear(xd, self.w, b) if few_rows else dense_linear(xd, self.w, b)).to(x.dtype)


# torch's CPU int4 packing takes whole tiles of this many output rows (a 24-row k_proj, a 46-row kv_a_proj of 2-bit
# attention raised "_convert_weight_to_int4pack_cpu : expect N to be dividable by 16"); other shapes run dense.
INT4PACK_ROWS = 16


class _Int4Kernel:
    def __init__(self, qt: QuantTensor) -> None:
        n, k = qt.shape
        self.group = qt.spec.group
        codes = qt.codes().to(torch.int32)
        if qt.spec.bits == 2:
            codes += 8
        s, m = qt.group_params(torch.float32)
        zero = m + 8 * s if qt.spec.bits == 4 else m
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        # [K/G, N, 2]; the kernel runs in bf16 (fp32 activations are cast: the fp32 kernel is far slower)
        self._sz: dict[torch.dtype, torch.Tensor] = {torch.bfloat16: torch.stack([s.t(), zero.t()], -1).to(torch.bfloat16).contiguous()}
        self.qt = qt
        self.n, self.k = n, k

    def sz(self, dtype: torch.dtype) -> torch.Tensor:
        t = self._sz.get(dtype)
        if t is None:
            t = self._sz[dtype] = self._sz[torch.bfloat16].to(dtype)
        return t

    def dense(self) -> torch.Tensor:
        return self.qt.dequantize(torch.float32)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if bias is None and x.dim() == 2 and x.dtype is torch.bfloat16 and x.shape[0] < DEQUANT_MIN_ROWS:  # fast path
            return _INT4MM(x.contiguous(), self.packed, self.group, self._sz[torch.bfloat16])
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] >= DEQUANT_MIN_ROWS and self.qt.buf.numel():
            y = torch.nn.functional.linear(x2.float(), self.dense())
        else:
            xd = x2 if x2.dtype in (torch.bfloat16, torch.float16) else x2.to(torch.bfloat16)
            y = _INT4MM(xd.contiguous(), self.packed, self.group, self.sz(xd.dtype))
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(x.dtype).view(*shape[:-1], y.shape[-1])


def prepare_cpu(qt: QuantTensor) -> Callable[..., torch.Tensor]:
    """The native kernel where it is built and takes the tensor (quant/native.py), else torch's."""
    from .native import NativeLib, NativeLinear, native_lib

    lib = native_lib()
    if lib is not None and NativeLib.supports(qt):
        return NativeLinear(lib, qt)
    if qt.spec.bits == 8 or qt.shape[0] % INT4PACK_ROWS or os.environ.get("LOCALGLM_CPU_KERNEL", "").lower() == "dense":
        return DenseKernel(qt)
    return _Int4Kernel(qt)
