"""GLM-5 / 5.1 / 5.2 (`glm_moe_dsa`): GLM-4.7-Flash's MLA decoder with DeepSeek sparse attention.

Each layer that runs an indexer ("full") scores the cached tokens and picks the top `index_topk` for
MLA to attend to; GLM-5.2's "shared" layers reuse the previous full layer's pick (IndexShare). While
the context is at most `index_topk` nothing is scored and attention is dense (exactly what the
selection would give). The cache is a DsaCache: the latent rows of every layer plus the indexer
keys of the full layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...layers.dsa import DsaCache, IndexerShape, IndexerWeights, indexer_keys, select_tokens
from ...layers.experts import ExpertBackend
from ...layers.kv_cache import HostRows, TokenCache
from ...layers.mla import MLAWeights, mla_attention, query_latent
from ..arch import WeightReader
from ..glm4_moe_lite.model import Glm4MoeLiteModel
from ..glm4_moe_lite.model import load_attention as load_mla
from ..moe_decoder import DecoderWeights, MoeBuilder
from .config import GlmMoeDsaConfig


@dataclass
class DsaAttentionWeights:
    mla: MLAWeights
    indexer: IndexerWeights | None  # None on "shared" layers


def load_attention(cfg: GlmMoeDsaConfig, r: WeightReader, layer: int) -> DsaAttentionWeights:
    """One layer's MLA weights, and its indexer's on a "full" layer."""
    indexer = None
    if cfg.indexer_types[layer] == "full":
        a, d = f"model.layers.{layer}.self_attn.indexer", cfg.index_head_dim
        indexer = IndexerWeights(
            wq_b=r.get(f"{a}.wq_b.weight", (cfg.index_n_heads * d, cfg.q_lora_rank)),
            wk=r.get(f"{a}.wk.weight", (d, cfg.hidden_size)),
            k_norm=r.get(f"{a}.k_norm.weight", (d,)),
            k_norm_bias=r.get(f"{a}.k_norm.bias", (d,)),
            weights_proj=r.get_fp32(f"{a}.weights_proj.weight", (cfg.index_n_heads, cfg.hidden_size)),
        )
    return DsaAttentionWeights(load_mla(cfg, r, layer), indexer)


class GlmMoeDsaModel(Glm4MoeLiteModel):
    """The glm_moe_dsa forward pass."""

    cfg: GlmMoeDsaConfig

    def __init__(
        self, cfg: GlmMoeDsaConfig, weights: DecoderWeights, experts: ExpertBackend, device: torch.device, kv_host: HostRows | None = None
    ) -> None:
        super().__init__(cfg, weights, experts, device, kv_host)
        self.index_shape = IndexerShape(cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim, cfg.index_topk)

    def new_cache(self, max_tokens: int, batch: int = 1) -> DsaCache:
        c = self.cfg
        return DsaCache(
            c.num_hidden_layers, c.kv_lora_rank, c.qk_rope_head_dim, c.index_layers, c.index_head_dim, max_tokens, self.dtype, self.device, batch,
            self.kv_host,
        )

    def attention(
        self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: TokenCache | None, start: int, step: dict[str, Any]
    ) -> torch.Tensor:
        w: DsaAttentionWeights = self.w.layers[layer].attn
        q_resid = query_latent(h, w.mla, self.mla_shape)
        if w.indexer is not None:  # a full layer: cache its keys, and select unless every key fits the top-k
            keys = indexer_keys(h, w.indexer, self.index_shape, cos, sin)
            if cache is not None:
                keys = cache.write_index(layer, start, keys)  # type: ignore[attr-defined]
            total = start + h.shape[1]
            step["topk"] = select_tokens(h, q_resid, keys, w.indexer, self.index_shape, cos, sin, start) if total > self.index_shape.topk else None
        return mla_attention(h, w.mla, self.mla_shape, cos, sin, cache, layer, start, allowed=step.get("topk"), q_resid=q_resid)  # type: ignore[arg-type]

    def build_fused_decoder(self) -> Any:
        from .fused_decode import FusedDecoder

        return FusedDecoder.build(self)


class GlmMoeDsaBuilder(MoeBuilder):
    """Reads glm_moe_dsa weights and builds its forward pass (the registry's `model` piece)."""

    model_class = GlmMoeDsaModel

    def load_attention(self, cfg: GlmMoeDsaConfig, reader: WeightReader, layer: int) -> DsaAttentionWeights:
        return load_attention(cfg, reader, layer)
