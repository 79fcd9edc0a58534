"""glm_moe_dsa sizes from config.json alone: MLA plus the indexer on its "full" layers; the latent
cache per token plus the indexer's keys on the full layers."""

from __future__ import annotations

from ..glm4_moe_lite.sizes import Glm4MoeLiteSizes, mla_params
from ..param_counts import HostableKV, ParamCounts, moe_param_counts
from .config import GlmMoeDsaConfig


def indexer_params(cfg: GlmMoeDsaConfig) -> int:
    """One indexer: wq_b, wk, the key LayerNorm (weight and bias), weights_proj."""
    h, d = cfg.hidden_size, cfg.index_head_dim
    return (cfg.q_lora_rank or 0) * cfg.index_n_heads * d + h * d + 2 * d + h * cfg.index_n_heads


class GlmMoeDsaSizes(Glm4MoeLiteSizes):
    def count_params(self, cfg: GlmMoeDsaConfig) -> ParamCounts:
        return moe_param_counts(cfg, mla_params(cfg), attention_extra=indexer_params(cfg) * len(cfg.index_layers))

    def kv_bytes_per_token(self, cfg: GlmMoeDsaConfig, bytes_per_value: int = 2) -> int:
        latent = super().kv_bytes_per_token(cfg, bytes_per_value)
        return latent + len(cfg.index_layers) * cfg.index_head_dim * bytes_per_value

    def hostable_kv(self, cfg: GlmMoeDsaConfig, bytes_per_value: int = 2) -> HostableKV | None:
        """The latent rows: past index_topk tokens a decoded token attends to only its top-k rows of each
        layer, so they can stay in pinned RAM and be gathered per step; the indexer keys stay on the GPU,
        where every one of them is scored."""
        return HostableKV((cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bytes_per_value, cfg.num_hidden_layers, cfg.index_topk)

    def describe_attention(self, cfg: GlmMoeDsaConfig) -> str:
        full = len(cfg.index_layers)
        return (
            super().describe_attention(cfg) + f"; DSA indexer {cfg.index_n_heads} heads x {cfg.index_head_dim}, top-{cfg.index_topk}, "
            f"on {full} of {cfg.num_hidden_layers} layers" + (f" ({cfg.num_hidden_layers - full} share its selection)" if full < cfg.num_hidden_layers else "")
        )
