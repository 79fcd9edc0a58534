"""CUDA matmul kernels for QuantTensor. First run on a GPU (an H200) on 2026-12-04 by
`python benchmarks/gpu_check.py --out DIR` (BENCHMARKS.md, "GPU check").

- q4 / q2 in a bf16 model -> torch's tinygemm `aten._weight_int4pack_mm(x_bf16, packed, group, scales_zeros)` (sm80+,
  a CUDA 12+ build): codes are packed high-nibble-first as uint8 [N, K/2] (even k in the high nibble,
  torchao's convention for the CUDA op since torch 2.5) and converted once on the GPU with
  `aten._convert_weight_to_int4pack(packed, inner_k_tiles)`; scales_zeros [K/G, N, 2] bf16 with the
  same w = (q - 8) * scale + zero convention as the CPU kernel. tinygemm takes N % 8 == 0 and
  K % 32 == 0 only; other shapes, other dtypes and GPUs older than sm80 use the dense kernel below.
- q8 -> torch has no int8 kernel with per-group scales (`_weight_int8pack_mm` takes one per row), so
  the weight is dequantized once to the compute dtype and multiplied with cuBLAS (cpu_kernels'
  DenseKernel, which runs on any device; 2x the memory of int8 for bf16, still correct).
- bitsandbytes (`LOCALGLM_CUDA_KERNEL=bnb`, if installed): q4/q2 tensors are dequantized once and
  re-quantized to bitsandbytes NF4 (group 64), q8 to LLM.int8 weights; an alternative to compare
  against tinygemm (benchmarks/gpu_check.py's bnb part measures both).

`prepared_nbytes` says how much device memory a prepared kernel keeps beside the canonical buffer, so
the offload backend can charge each expert-cache slot its real size.
"""

from __future__ import annotations

import os
from functools import cache

import torch

from .cpu_kernels import DenseKernel
from .formats import QuantSpec, QuantTensor
from .spec import cuda_prepared_nbytes, tinygemm_shape


def _inner_k_tiles(k: int) -> int:
    for t in (8, 4, 2):
        if k % (t * 16) == 0:
            return t
    raise ValueError(f"K={k} is not a multiple of 32; tinygemm cannot take it")


@cache
def _has_tinygemm(index: int) -> bool:
    """tinygemm's kernels are built for sm80+ only (they raise 'not available for build' elsewhere)."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


def uses_tinygemm(spec: QuantSpec, shape: tuple[int, int], device: torch.device | None = None, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether a q2/q4 tensor of this shape runs through tinygemm (else the dense kernel). Only for a
    bf16 model: tinygemm rounds activations, scales and zeros to bf16, so a float32 (or float16) model
    takes the dense kernel in its own dtype (float32 on the GPU then gives the CPU's greedy tokens)."""
    if dtype != torch.bfloat16 or not tinygemm_shape(spec, shape, 2):
        return False
    return device is None or _has_tinygemm(device.index if device.index is not None else torch.cuda.current_device())


def prepared_nbytes(spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype, device: torch.device | None = None) -> int:
    """How much device memory a prepared kernel keeps for one tensor beside its canonical buffer
    (quant.spec.cuda_prepared_nbytes, on this device: tinygemm where its GPU has it)."""
    size = torch.tensor([], dtype=dtype).element_size()
    return cuda_prepared_nbytes(spec, shape, size, tinygemm=uses_tinygemm(spec, shape, device, dtype))


class _TinyGemm4:
    def __init__(self, qt: QuantTensor) -> None:
        codes = qt.codes().to(torch.int32)
        if qt.spec.bits == 2:
            codes += 8
        s, m = qt.group_params(torch.float32)
        zero = m + 8 * s if qt.spec.bits == 4 else m
        packed = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()
        self.packed = torch.ops.aten._convert_weight_to_int4pack(packed, _inner_k_tiles(qt.shape[1]))
        self.sz = torch.stack([s.t(), zero.t()], -1).to(torch.bfloat16).contiguous()
        self.group = qt.spec.group

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group, self.sz)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(x.dtype).view(*shape[:-1], y.shape[-1])


class _Bnb:
    def __init__(self, qt: QuantTensor) -> None:
        import bitsandbytes as bnb  # optional

        self.bnb = bnb
        w = qt.dequantize(torch.float16)
        self.int8 = qt.spec.bits == 8
        if self.int8:
            self.layer = bnb.nn.Linear8bitLt(qt.shape[1], qt.shape[0], bias=False, has_fp16_weights=False)
            self.layer.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False)
            self.layer = self.layer.to(qt.device)
        else:
            self.w4, self.state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x16 = x.to(torch.float16)
        y = self.layer(x16) if self.int8 else self.bnb.matmul_4bit(x16, self.w4.t(), quant_state=self.state)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(x.dtype)


def prepare_cuda(qt: QuantTensor) -> object:
    """The kernel for a CUDA QuantTensor, built on the tensor's GPU (whatever the current device)."""
    with torch.cuda.device(qt.device):
        if os.environ.get("LOCALGLM_CUDA_KERNEL", "").lower() == "bnb":
            return _Bnb(qt)
        return _TinyGemm4(qt) if uses_tinygemm(qt.spec, tuple(qt.shape), qt.device, qt.dtype) else DenseKernel(qt)
