"""CUDA matmul kernels for QuantTensor. NOT RUN in this repository's CI machine (no GPU there):
written against torch's documented ops and checked only for import; run `benchmarks/bench_quant.py
--device cuda` and `pytest tests/test_quant.py -k cuda` on a GPU machine before trusting them.

- q4 / q2 -> torch's tinygemm `aten._weight_int4pack_mm(x_bf16, packed, group, scales_zeros)` (sm80+):
  codes are packed high-nibble-first as uint8 [N, K/2] and converted once on the GPU with
  `aten._convert_weight_to_int4pack(packed, inner_k_tiles)`; scales_zeros [K/G, N, 2] bf16 with the
  same w = (q - 8) * scale + zero convention as the CPU kernel.
- q8 -> torch has no int8 kernel with per-group scales (`_weight_int8pack_mm` takes one per row), so
  the weight is dequantized once to the compute dtype and multiplied with cuBLAS (cpu_kernels'
  DenseKernel, which runs on any device; 2x the memory of int8 for bf16, still correct).
- bitsandbytes (`LOCALGLM_CUDA_KERNEL=bnb`, if installed): q4/q2 tensors are dequantized once and
  re-quantized to bitsandbytes NF4 (group 64), q8 to LLM.int8 weights; an alternative to compare
  against tinygemm. Which one wins is NOT measured yet (no GPU in this session).
"""

from __future__ import annotations

import os

import torch

from .cpu_kernels import DenseKernel
from .formats import QuantTensor


def _inner_k_tiles(k: int) -> int:
    for t in (8, 4, 2):
        if k % (t * 16) == 0:
            return t
    raise ValueError(f"K={k} is not a multiple of 32; tinygemm cannot take it")


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
    if os.environ.get("LOCALGLM_CUDA_KERNEL", "").lower() == "bnb":
        return _Bnb(qt)
    return DenseKernel(qt) if qt.spec.bits == 8 else _TinyGemm4(qt)
