"""GLM-4.7-Flash (`glm4_moe_lite`): the shared MoE decoder around multi-head latent attention.

Attention: `q_a_proj` -> `q_a_layernorm` -> `q_b_proj` (or one `q_proj`), `kv_a_proj_with_mqa`
into the latent and one shared rope key, `kv_a_layernorm`, `kv_b_proj`; interleaved RoPE on the
rope dims; the cache holds only the normalized latent and the roped key (layers/mla.py, LatentCache).
"""

from __future__ import annotations

from typing import Any

import torch

from ...layers.experts import ExpertBackend
from ...layers.kv_cache import HostRows, LatentCache, TokenCache
from ...layers.mla import MLAShape, MLAWeights, mla_attention
from ...layers.rope import Rotary
from ..arch import WeightReader
from ..moe_decoder import DecoderWeights, MoeBuilder, MoeDecoder
from .config import LATENT_NORM_EPS, Glm4MoeLiteConfig


def mla_shape(cfg: Glm4MoeLiteConfig) -> MLAShape:
    return MLAShape(
        heads=cfg.num_attention_heads,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        scale=cfg.attention_scale,
        latent_eps=LATENT_NORM_EPS,
        rope_interleave=cfg.rope_interleave,
    )


def load_attention(cfg: Glm4MoeLiteConfig, r: WeightReader, layer: int) -> MLAWeights:
    """One layer's MLA weights under transformers' names."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    a = f"model.layers.{layer}.self_attn"
    get, bias = r.get, cfg.attention_bias
    q_out = heads * cfg.qk_head_dim
    kv_a = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    q_a = q_a_norm = q_a_bias = None
    if cfg.q_lora_rank:
        q_a = get(f"{a}.q_a_proj.weight", (cfg.q_lora_rank, h))
        q_a_bias = get(f"{a}.q_a_proj.bias", (cfg.q_lora_rank,)) if bias else None
        q_a_norm = get(f"{a}.q_a_layernorm.weight", (cfg.q_lora_rank,))
        q_b = get(f"{a}.q_b_proj.weight", (q_out, cfg.q_lora_rank))
    else:
        q_b = get(f"{a}.q_proj.weight", (q_out, h))
    return MLAWeights(
        q_b=q_b,
        kv_a=get(f"{a}.kv_a_proj_with_mqa.weight", (kv_a, h)),
        kv_a_norm=get(f"{a}.kv_a_layernorm.weight", (cfg.kv_lora_rank,)),
        kv_b=get(f"{a}.kv_b_proj.weight", (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)),
        o=get(f"{a}.o_proj.weight", (h, heads * cfg.v_head_dim)),
        q_a=q_a,
        q_a_norm=q_a_norm,
        q_a_bias=q_a_bias,
        kv_a_bias=get(f"{a}.kv_a_proj_with_mqa.bias", (kv_a,)) if bias else None,
        o_bias=get(f"{a}.o_proj.bias", (h,)) if bias else None,
    )


class Glm4MoeLiteModel(MoeDecoder):
    """The glm4_moe_lite forward pass."""

    cfg: Glm4MoeLiteConfig

    def __init__(
        self, cfg: Glm4MoeLiteConfig, weights: DecoderWeights, experts: ExpertBackend, device: torch.device, kv_host: HostRows | None = None
    ) -> None:
        super().__init__(cfg, weights, experts, device, kv_host)
        self.rotary = Rotary(cfg.rotary_dim, cfg.rope_theta, device)
        self.mla_shape = mla_shape(cfg)

    def new_cache(self, max_tokens: int, batch: int = 1) -> LatentCache:
        c = self.cfg
        return LatentCache(c.num_hidden_layers, c.kv_lora_rank, c.qk_rope_head_dim, max_tokens, self.dtype, self.device, batch, self.kv_host)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary.cos_sin(positions, dtype)

    def attention(
        self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: TokenCache | None, start: int, step: dict[str, Any]
    ) -> torch.Tensor:
        return mla_attention(h, self.w.layers[layer].attn, self.mla_shape, cos, sin, cache, layer, start)  # type: ignore[arg-type]

    def build_fused_decoder(self) -> Any:
        from .fused_decode import FusedDecoder

        return FusedDecoder.build(self)


class Glm4MoeLiteBuilder(MoeBuilder):
    """Reads glm4_moe_lite weights and builds its forward pass (the registry's `model` piece)."""

    model_class = Glm4MoeLiteModel

    def load_attention(self, cfg: Glm4MoeLiteConfig, reader: WeightReader, layer: int) -> MLAWeights:
        return load_attention(cfg, reader, layer)
