"""Rotary position embeddings: GLM-4.x's partial NeoX-style rotation (halves paired)."""

from __future__ import annotations

import torch

from .native import native


class Rotary:
    """Partial rotary embedding: only the first `rotary_dim` dims of a head rotate, halves paired."""

    def __init__(self, rotary_dim: int, theta: float, device: torch.device | str = "cpu") -> None:
        self.rotary_dim = rotary_dim
        steps = torch.arange(0, rotary_dim, 2, dtype=torch.float, device=device)
        self.inv_freq = 1.0 / (theta ** (steps / rotary_dim))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape [T, rotary_dim] for integer positions [T]."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the leading `cos.shape[-1]` dims of x [B, heads, T, head_dim]; the rest pass through."""
    if x.shape[-2] == 1 and x.device.type == "cpu":  # decode: one native call instead of ~10 ops
        lib = native()
        out = lib.rope(x, cos, sin) if lib is not None else None
        if out is not None:
            return out
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    out = x_rot * cos + _rotate_half(x_rot) * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out
