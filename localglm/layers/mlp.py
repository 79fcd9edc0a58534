"""The SwiGLU MLP (dense layers, shared experts)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .linear import linear


@dataclass
class MLPWeights:
    """A SwiGLU MLP with gate and up fused: gate_up [2 * inter, hidden], down [hidden, inter]."""

    gate_up: torch.Tensor
    down: torch.Tensor


def swiglu(x: torch.Tensor, w: MLPWeights) -> torch.Tensor:
    """down(silu(gate(x)) * up(x))."""
    gate, up = linear(x, w.gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w.down)
