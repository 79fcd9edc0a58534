"""Quantized matrices of different formats stacked along the rows, multiplied part by part.

Why: model code fuses q/k/v (and gate/up) with `torch.cat` so one product serves them all. A GGUF
mix stores them in different types (llama.cpp's Q4_K_M keeps attn_v at Q6_K beside Q4_K q and k;
the dynamic GLM quants mix more), which one QuantTensor cannot hold without re-quantizing. A
`QuantStack` keeps each part as stored (a QuantTensor, or a dense tensor where the file keeps one in
F16/F32 or in a type that is dequantized) and concatenates the parts' products; to model code it is a
weight like a QuantTensor (`matmul`, `linear` dispatch, `shape`, `to`, `dequantize`).
"""

from __future__ import annotations

from typing import Any

import torch

from .cpu_kernels import dense_linear
from .formats import QuantError, QuantTensor

Part = QuantTensor | torch.Tensor


class QuantStack:
    """Row-wise concatenation of 2-D weights (QuantTensors, dense tensors, stacks) sharing K:
    y = cat(part's product with x for each part)."""

    def __init__(self, parts: list[Any]) -> None:
        flat: list[Part] = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, QuantStack) else [p])
        if not flat or any(p.dim() != 2 or p.shape[1] != flat[0].shape[1] for p in flat):
            raise QuantError("a stack of quantized rows needs 2-D parts with the same K")
        self.parts = flat
        self.shape = torch.Size((sum(p.shape[0] for p in flat), flat[0].shape[1]))
        self.dtype = next((p.dtype for p in flat if isinstance(p, QuantTensor)), flat[0].dtype)

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes if isinstance(p, QuantTensor) else p.numel() * p.element_size() for p in self.parts)

    def dim(self) -> int:
        return 2

    def size(self, i: int | None = None) -> Any:
        return self.shape if i is None else self.shape[i]

    def __repr__(self) -> str:
        names = (p.spec.name if isinstance(p, QuantTensor) else str(p.dtype).removeprefix("torch.") for p in self.parts)
        return f"QuantStack({', '.join(f'{n} {list(p.shape)}' for n, p in zip(names, self.parts))})"

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T (+ bias) in x's dtype: each part's product gets its rows of the bias before its one
        rounding to x's dtype, as one QuantTensor's does (and the fused decode's stacks: lg_mat_rows)."""
        ys, row = [], 0
        for p in self.parts:
            b = None if bias is None else bias[row : row + p.shape[0]]
            row += p.shape[0]
            ys.append(p.matmul(x, b) if isinstance(p, QuantTensor) else dense_linear(x.to(p.dtype), p, None if b is None else b.to(p.dtype)).to(x.dtype))
        return torch.cat(ys, -1)

    def prepare(self, drop_buffer: bool = False) -> QuantStack:
        for p in self.parts:
            if isinstance(p, QuantTensor):
                p.prepare(drop_buffer)
        return self

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dt = dtype or self.dtype
        return torch.cat([p.dequantize(dt) if isinstance(p, QuantTensor) else p.to(dt) for p in self.parts], 0)

    def float(self) -> torch.Tensor:
        return self.dequantize(torch.float32)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None, **_: Any) -> QuantStack:
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        return QuantStack([p.to(device, dtype) if isinstance(p, QuantTensor) else p.to(device) for p in self.parts])

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        """torch.cat and F.linear as for a QuantTensor (whose handler builds stacks and calls `matmul`)."""
        return QuantTensor.__torch_function__(func, types, args, kwargs)
