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


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate all of x's last dim [..., T, rot] in interleaved pairs (2i, 2i+1), as MLA checkpoints
    (DeepSeek, GLM-4.7-Flash, GLM-5) lay out their rope dims.

    cos/sin come in `Rotary.cos_sin`'s `cat(freqs, freqs)` layout [T, rot]; pair i uses column i.
    The result is de-interleaved (every pair's first output, then every pair's second), exactly as
    transformers' `apply_rotary_pos_emb_interleave` returns it, op for op, so queries and keys
    agree bit for bit with it; a dot product of two such outputs is the same as of interleaved ones.
    """
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
