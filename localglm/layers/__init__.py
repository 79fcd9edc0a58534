"""Shared building blocks of the GLM decoders, written once for every architecture (as llama.cpp's
graph builders and vLLM's layers are): norms, RoPE, attention, MLPs, the router, expert dispatch,
KV caches. Architectures (localglm/models/) compose them; nothing here names an architecture."""

from .attention import AttentionShape, AttentionWeights, attention
from .linear import linear
from .mlp import MLPWeights, swiglu
from .norm import rms_norm
from .rope import Rotary, _rotate_half, apply_rope

__all__ = [
    "AttentionShape",
    "AttentionWeights",
    "MLPWeights",
    "Rotary",
    "_rotate_half",
    "apply_rope",
    "attention",
    "linear",
    "rms_norm",
    "swiglu",
]
