"""glm4_moe sizes from config.json alone: parameters, KV bytes per token, the attention line of `inspect`."""

from __future__ import annotations

from ..param_counts import HostableKV, ParamCounts, moe_param_counts
from .config import Glm4MoeConfig


class Glm4MoeSizes:
    def count_params(self, cfg: Glm4MoeConfig) -> ParamCounts:
        h, hd = cfg.hidden_size, cfg.head_dim
        q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        attn = h * (q + 2 * kv) + q * h
        if cfg.attention_bias:
            attn += q + 2 * kv
        if cfg.use_qk_norm:
            attn += 2 * hd
        return moe_param_counts(cfg, attention_per_layer=attn)

    def kv_bytes_per_token(self, cfg: Glm4MoeConfig, bytes_per_value: int = 2) -> int:
        """Keys and values of every kv head of every layer."""
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * bytes_per_value

    def hostable_kv(self, cfg: Glm4MoeConfig, bytes_per_value: int = 2) -> HostableKV | None:
        """None: dense attention reads every cached row each token, so the cache stays beside it."""
        return None

    def describe_attention(self, cfg: Glm4MoeConfig) -> str:
        return (
            f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv heads x {cfg.head_dim}, "
            f"rope theta {cfg.rope_theta:g} on {cfg.rotary_dim} dims, qk_norm {'on' if cfg.use_qk_norm else 'off'}, "
            f"qkv bias {'on' if cfg.attention_bias else 'off'}"
        )
