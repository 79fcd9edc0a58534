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

# A long chunk of tokens after cached context past the indexer's top-k goes through the native layers in pieces of
# at most this many tokens (`GlmMoeDsaModel.residual`): there each query attends only its own picked rows
# (mla_attention.c lg_mla_tokens), where the torch layers run MLA over every cached row with the rest masked, a
# cost that grows with the context. GLM-5 widths (glm5-1b-long-bf16), 2 threads, torch -> native:
# a 512-token chunk after 2,304 / 3,072 / 4,096 / 8,192 cached tokens 4.4-4.5 / 5.7-5.9 / 6.8-8.9 / 15.3-17.3 s ->
# 4.8-5.0 / 5.7-5.8 / 5.5-5.8 / 6.9-7.1 s (llama.cpp: 9.2 s at 4,096, 17.6 s at 8,192); a 64-token one
# 0.66-0.78 / 0.87-1.07 / 1.16 s -> 0.64-0.68 / 0.65-0.66 / 0.78-0.79 s. The same with 4-bit experts (`quantize
# --experts 4`: the torch layers' bf16 GEMM runs them at about twice the native int8 tiles' rate), a 512-token chunk
# after 3,072 / 4,096 / 8,192: 5.1-5.4 / 6.5 / 11.5-12.1 s -> 5.9-6.0 / 6.1-6.5 / 7.3-7.4 s.
PICKED_PIECE = 128
# ... from this many top-k's of cached context on (before it the torch layers' GEMMs still win for long chunks: see
# above); chunks up to the native layers' own limit (`fused_prefill_max`) run there anyway.
PICKED_FROM_TOPKS = 2.0


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

    def native_piece(self, tokens: int, start: int) -> int:
        """MoeDecoder's, but a chunk longer than the native layers take at once, after PICKED_FROM_TOPKS top-k's of
        cached context (its queries pick among the cached rows), runs through them in pieces of PICKED_PIECE,
        where the torch layers' masked attention would cost more. A prompt's first chunk keeps the torch layers
        (transformers' rounding)."""
        if tokens > self.fused_prefill_max and self.fused_prefill and start >= PICKED_FROM_TOPKS * self.index_shape.topk:
            return PICKED_PIECE
        return super().native_piece(tokens, start)

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
            step["topk"] = (
                select_tokens(h, q_resid, keys, w.indexer, self.index_shape, cos, sin, start, steps=step["steps"]) if total > self.index_shape.topk else None
            )
        return mla_attention(h, w.mla, self.mla_shape, cos, sin, cache, layer, start, allowed=step.get("topk"), q_resid=q_resid)  # type: ignore[arg-type]

    def build_fused_decoder(self) -> Any:
        from .fused_decode import FusedDecoder

        return FusedDecoder.build(self)


class GlmMoeDsaBuilder(MoeBuilder):
    """Reads glm_moe_dsa weights and builds its forward pass (the registry's `model` piece)."""

    model_class = GlmMoeDsaModel

    def load_attention(self, cfg: GlmMoeDsaConfig, reader: WeightReader, layer: int) -> DsaAttentionWeights:
        return load_attention(cfg, reader, layer)
