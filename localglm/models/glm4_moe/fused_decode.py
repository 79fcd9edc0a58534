"""glm4_moe's part of the fused native decode (the driver: localglm/models/fused_decode.py): its
grouped-query attention as the native layer reads it -- fused q/k/v (with biases), optional per-head
q/k RMSNorm, partial NeoX RoPE on the first `rotary_dim` dims, attention over a KVCache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...layers.attention import AttentionWeights
from ...layers.kv_cache import KVCache
from ...layers.native import ATTN_GQA
from .. import fused_decode
from ..fused_decode import Pinned

if TYPE_CHECKING:
    from .model import Glm4MoeModel


class FusedDecoder(fused_decode.FusedDecoder):
    """glm4_moe's fused decoder: the shared driver with grouped-query attention."""

    cache_type = KVCache

    @classmethod
    def _attention(cls, model: Glm4MoeModel, attn: AttentionWeights, pin: Pinned) -> dict[str, Any] | None:
        cfg = model.cfg
        qkv, o = pin.mat(attn.qkv_weight, attn.qkv_bias), pin.mat(attn.o_weight)
        if qkv is None or o is None or not pin.takes_norms(attn.q_norm, attn.k_norm):
            return None
        return dict(
            attn_kind=ATTN_GQA, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, hd=cfg.head_dim,
            rot=cfg.rotary_dim, q_norm=pin.vec(attn.q_norm), k_norm=pin.vec(attn.k_norm), qkv=qkv, o=o,
        )  # fmt: skip

    @staticmethod
    def _cache(cache: KVCache) -> tuple[torch.Tensor, torch.Tensor | None]:
        return cache.k, cache.v
