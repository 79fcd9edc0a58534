"""GLM-4.5 / 4.5-Air / 4.6 / 4.7 (`glm4_moe`): the shared MoE decoder around grouped-query attention.

Attention: fused q/k/v projection (with biases when `attention_bias`), optional per-head RMSNorm
on q and k, partial NeoX RoPE on the first `rotary_dim` dims of each head, GQA over a KVCache.
"""

from __future__ import annotations

from typing import Any

import torch

from ...layers.attention import AttentionShape, AttentionWeights, attention
from ...layers.experts import ExpertBackend
from ...layers.kv_cache import HostRows, KVCache, TokenCache
from ...layers.rope import Rotary
from ..arch import WeightReader
from ..moe_decoder import DecoderWeights, MoeBuilder, MoeDecoder
from .config import Glm4MoeConfig


def load_attention(cfg: Glm4MoeConfig, r: WeightReader, layer: int) -> AttentionWeights:
    """One layer's attention, q/k/v fused into one matrix so a token costs one matmul."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    a = f"model.layers.{layer}.self_attn"
    get = r.get
    qkv_w = torch.cat([get(f"{a}.q_proj.weight", (q, h)), get(f"{a}.k_proj.weight", (kv, h)), get(f"{a}.v_proj.weight", (kv, h))], 0)
    qkv_b = None
    if cfg.attention_bias:
        qkv_b = torch.cat([get(f"{a}.q_proj.bias", (q,)), get(f"{a}.k_proj.bias", (kv,)), get(f"{a}.v_proj.bias", (kv,))], 0)
    return AttentionWeights(
        qkv_weight=qkv_w,
        qkv_bias=qkv_b,
        o_weight=get(f"{a}.o_proj.weight", (h, q)),
        q_norm=get(f"{a}.q_norm.weight", (hd,)) if cfg.use_qk_norm else None,
        k_norm=get(f"{a}.k_norm.weight", (hd,)) if cfg.use_qk_norm else None,
    )


class Glm4MoeModel(MoeDecoder):
    """The glm4_moe forward pass."""

    cfg: Glm4MoeConfig

    def __init__(
        self, cfg: Glm4MoeConfig, weights: DecoderWeights, experts: ExpertBackend, device: torch.device, kv_host: HostRows | None = None
    ) -> None:
        super().__init__(cfg, weights, experts, device, kv_host)
        self.rotary = Rotary(cfg.rotary_dim, cfg.rope_theta, device)
        self.attn_shape = AttentionShape(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps)

    def new_cache(self, max_tokens: int, batch: int = 1) -> KVCache:
        c = self.cfg
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, max_tokens, self.dtype, self.device, batch)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary.cos_sin(positions, dtype)

    def attention(
        self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: TokenCache | None, start: int, step: dict[str, Any]
    ) -> torch.Tensor:
        return attention(h, self.w.layers[layer].attn, self.attn_shape, cos, sin, cache, layer, start)  # type: ignore[arg-type]

    def build_fused_decoder(self) -> Any:
        from .fused_decode import FusedDecoder

        return FusedDecoder.build(self)


class Glm4MoeBuilder(MoeBuilder):
    """Reads glm4_moe weights and builds its forward pass (the registry's `model` piece)."""

    model_class = Glm4MoeModel

    def load_attention(self, cfg: Glm4MoeConfig, reader: WeightReader, layer: int) -> AttentionWeights:
        return load_attention(cfg, reader, layer)
