"""glm4_moe_lite sizes from config.json alone: MLA parameters, the latent KV cache per token."""

from __future__ import annotations

from ..param_counts import HostableKV, ParamCounts, moe_param_counts
from .config import Glm4MoeLiteConfig


def mla_params(cfg: Glm4MoeLiteConfig) -> int:
    """One layer's MLA attention: projections, latent norms and (with attention_bias) biases."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    q_out = heads * cfg.qk_head_dim
    if cfg.q_lora_rank:
        q = h * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * q_out + (cfg.q_lora_rank if cfg.attention_bias else 0)
    else:
        q = h * q_out
    kv_a = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    kv = h * kv_a + cfg.kv_lora_rank + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    o = heads * cfg.v_head_dim * h
    bias = (kv_a + h) if cfg.attention_bias else 0
    return q + kv + o + bias


class Glm4MoeLiteSizes:
    def count_params(self, cfg: Glm4MoeLiteConfig) -> ParamCounts:
        return moe_param_counts(cfg, attention_per_layer=mla_params(cfg))

    def kv_bytes_per_token(self, cfg: Glm4MoeLiteConfig, bytes_per_value: int = 2) -> int:
        """The absorbed MLA cache: the normalized latent and the rope key, per layer (not per head)."""
        return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bytes_per_value

    def hostable_kv(self, cfg: Glm4MoeLiteConfig, bytes_per_value: int = 2) -> HostableKV | None:
        """None: dense attention reads every cached row each token, so the cache stays beside it."""
        return None

    def describe_attention(self, cfg: Glm4MoeLiteConfig) -> str:
        q = f"q_lora {cfg.q_lora_rank}" if cfg.q_lora_rank else "q_proj"
        return (
            f"MLA, {cfg.num_attention_heads} heads: {q}, kv_lora {cfg.kv_lora_rank}, qk {cfg.qk_nope_head_dim} + "
            f"{cfg.qk_rope_head_dim} rope, v {cfg.v_head_dim}; rope theta {cfg.rope_theta:g}"
            f"{' interleaved' if cfg.rope_interleave else ''}, bias {'on' if cfg.attention_bias else 'off'}"
        )
