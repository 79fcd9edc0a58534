"""Parameter counts of a GLM MoE decoder, by part: what `inspect` prints and `plan` places."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    embed: int
    lm_head: int
    attention: int  # all layers, incl. norms and biases
    dense_mlp: int  # the first_k_dense_replace layers
    router: int
    shared_experts: int
    routed_experts: int  # all of them
    routed_active: int  # the top-k chosen per token
    norms: int

    @property
    def total(self) -> int:
        return self.always_used + self.routed_experts

    @property
    def always_used(self) -> int:
        """Everything except routed experts: touched by every token."""
        return self.embed + self.lm_head + self.attention + self.dense_mlp + self.router + self.shared_experts + self.norms

    @property
    def active(self) -> int:
        """Parameters a token computes with, embeddings and lm_head excluded, as GLM's model cards count
        them (GLM-4.5: 32B of 355B, GLM-4.5-Air: 12B of 106B)."""
        return self.always_used - self.embed - self.lm_head + self.routed_active

    @property
    def routed_share(self) -> float:
        return self.routed_experts / self.total if self.total else 0.0


@dataclass(frozen=True)
class HostableKV:
    """The part of a KV cache that may live in (pinned) host RAM: a decoded token reads only a
    selection of its rows (DSA's top-k), which are gathered to the GPU each step, so the cache's bulk
    needs no VRAM. GLM-5.x at 131k tokens: ~11 GiB of latent rows kept off a 24 GiB card."""

    row_bytes: int  # one token's row in one layer
    layers: int
    rows_read: int  # the most rows a decoded token reads per layer (index_topk)

    @property
    def bytes_per_token(self) -> int:
        return self.row_bytes * self.layers

    def gather_bytes(self, ctx: int) -> int:
        """Bytes moved to the GPU per decoded token at context `ctx` (every layer's selected rows)."""
        return self.layers * min(self.rows_read, ctx) * self.row_bytes


def moe_param_counts(cfg: ModelConfig, attention_per_layer: int, attention_extra: int = 0) -> ParamCounts:
    """The counts of a GLM MoE decoder whose attention has `attention_per_layer` parameters per layer
    (norms and biases included), plus `attention_extra` on some layers only (GLM-5's indexers):
    everything but attention is the same in every architecture."""
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    h, moe_layers = cfg.hidden_size, cfg.num_moe_layers
    return ParamCounts(
        embed=cfg.vocab_size * h,
        lm_head=0 if cfg.tie_word_embeddings else cfg.vocab_size * h,
        attention=cfg.num_hidden_layers * attention_per_layer + attention_extra,
        dense_mlp=cfg.first_k_dense_replace * 3 * h * cfg.intermediate_size,
        router=moe_layers * (cfg.n_routed_experts * h + cfg.n_routed_experts),
        shared_experts=moe_layers * 3 * h * cfg.shared_intermediate_size,
        routed_experts=moe_layers * cfg.n_routed_experts * expert,
        routed_active=moe_layers * cfg.num_experts_per_tok * expert,
        norms=cfg.num_hidden_layers * 2 * h + h,
    )
