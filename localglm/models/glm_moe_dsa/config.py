"""config.json of GLM-5 / 5.1 / 5.2 (`glm_moe_dsa`): GLM-4.7-Flash's MLA plus DeepSeek sparse attention's
indexer, and GLM-5.2's IndexShare (layers marked "shared" reuse the previous "full" layer's top-k)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from ...config import ConfigReader, layer_count
from ...errors import ConfigError
from ..glm4_moe_lite.config import Glm4MoeLiteConfig

log = logging.getLogger("localglm")


def indexer_types(cfg: ConfigReader, layers: int) -> tuple[str, ...]:
    """Per layer "full" (runs the indexer) or "shared", derived exactly as transformers' GlmMoeDsaConfig
    derives it: `indexer_types`, else `index_topk_pattern` ("F"/"S" letters or a list), else every
    layer i with max(i - index_skip_topk_offset + 1, 0) % index_topk_freq == 0 is full."""
    raw = cfg.raw.get("indexer_types")
    if raw is None:
        pattern = cfg.raw.get("index_topk_pattern")
        if pattern is not None:
            letters = {"F": "full", "S": "shared"}
            if isinstance(pattern, str) and set(pattern) <= set(letters):
                raw = [letters[c] for c in pattern]
            elif isinstance(pattern, list):
                raw = pattern
            else:
                raise ConfigError(f"{cfg.source}: field 'index_topk_pattern' must be a string of F and S or a list, got {pattern!r}")
        else:
            freq = max(cfg.int("index_topk_freq", 1), 1)
            offset = cfg.int("index_skip_topk_offset", 2)
            raw = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(layers)]
    if not isinstance(raw, list) or len(raw) != layers or any(t not in ("full", "shared") for t in raw):
        raise ConfigError(f"{cfg.source}: field 'indexer_types' must list 'full' or 'shared' for each of the {layers} layers")
    if raw and raw[0] != "full":
        raise ConfigError(f"{cfg.source}: field 'indexer_types' starts with 'shared', but a shared layer reuses an earlier full layer's selection")
    return tuple(raw)


@dataclass(frozen=True, kw_only=True)
class GlmMoeDsaConfig(Glm4MoeLiteConfig):
    """Architecture of a glm_moe_dsa model (GLM-5, 5.1, 5.2)."""

    index_n_heads: int
    index_head_dim: int
    index_topk: int
    indexer_types: tuple[str, ...] = ()
    first_k_dense_replace: int = 3  # transformers' GlmMoeDsaConfig default
    model_type: str = "glm_moe_dsa"

    @property
    def index_layers(self) -> list[int]:
        """The layers that run their own indexer (and keep its keys)."""
        return [i for i, t in enumerate(self.indexer_types) if t == "full"]

    def mtp_block_config(self) -> GlmMoeDsaConfig:
        """The MTP block runs its own indexer (a "full" layer)."""
        return replace(super().mtp_block_config(), indexer_types=("full",))

    @classmethod
    def own_fields(cls, cfg: ConfigReader) -> dict[str, Any]:
        layers = layer_count(cfg)
        if not cfg.bool("rope_interleave", True):
            # Every published GLM-5.x config says true; transformers' GlmMoeDsa rotates interleaved pairs whatever it says
            log.warning("%s: rope_interleave false ignored: GLM-5.x rotates interleaved pairs, as transformers' GlmMoeDsa does", cfg.source)
        return super().own_fields(cfg) | dict(
            rope_interleave=True,
            index_n_heads=cfg.positive_int("index_n_heads", 32),
            index_head_dim=cfg.positive_int("index_head_dim", 128),
            index_topk=cfg.positive_int("index_topk", 2048),
            indexer_types=indexer_types(cfg, layers),
        )

    def check(self, source: str) -> None:
        super().check(source)
        if not self.q_lora_rank:
            raise ConfigError(f"{source}: q_lora_rank is required (the DSA indexer reads the query latent)")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ConfigError(f"{source}: index_head_dim {self.index_head_dim} is smaller than qk_rope_head_dim {self.qk_rope_head_dim}")
