"""Matrix products that pick their kernel: a QuantTensor's own packed kernels, or F.linear with the
CPU bf16 workaround (quant.cpu_kernels.dense_linear)."""

from __future__ import annotations

import torch

from quant.cpu_kernels import dense_linear


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b): a quant.QuantTensor multiplies with its own packed kernels, a dense weight
    through `dense_linear` (batched bf16 upcast to fp32 on CPUs without native bf16)."""
    if not isinstance(w, torch.Tensor):  # a quant.QuantTensor: its own packed kernels
        return w.matmul(x, b)
    return dense_linear(x, w, b)
