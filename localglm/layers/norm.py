"""RMSNorm as transformers computes it (fp32, cast back, then the weight), natively on the CPU."""

from __future__ import annotations

import torch

from .native import native


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, cast back, then scaled (the cast comes before the weight, as in
    transformers). On the CPU one native call (quant/native.py) where the kernels are built: a
    norm is otherwise six torch ops of ~6 us each, ~50 norms per decoded token."""
    if x.device.type == "cpu":
        lib = native()
        out = lib.rms_norm(x, weight, eps) if lib is not None else None
        if out is not None:
            return out
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)
