"""config.json of GLM-4.7-Flash (`glm4_moe_lite`): multi-head latent attention (MLA) fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import ConfigReader, ModelConfig
from ...errors import ConfigError

# transformers builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True, kw_only=True)
class Glm4MoeLiteConfig(ModelConfig):
    """Architecture of a glm4_moe_lite model (GLM-4.7-Flash): MLA attention on the GLM MoE decoder."""

    num_attention_heads: int
    q_lora_rank: int | None  # None: one q_proj from the hidden state
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True
    attention_bias: bool = False
    partial_rotary_factor: float = 1.0
    model_type: str = "glm4_moe_lite"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rotary_dim(self) -> int:
        """Rotated dims of each query head and of the shared rope key (all of qk_rope_head_dim)."""
        return int(self.qk_rope_head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        """Softmax scale: qk_head_dim ** -0.5 (transformers' `scaling` for plain RoPE)."""
        return self.qk_head_dim**-0.5

    @classmethod
    def own_fields(cls, cfg: ConfigReader) -> dict[str, Any]:
        return dict(
            num_attention_heads=cfg.positive_int("num_attention_heads"),
            q_lora_rank=cfg.positive_int("q_lora_rank", None),
            kv_lora_rank=cfg.positive_int("kv_lora_rank"),
            qk_nope_head_dim=cfg.positive_int("qk_nope_head_dim"),
            qk_rope_head_dim=cfg.positive_int("qk_rope_head_dim"),
            v_head_dim=cfg.positive_int("v_head_dim"),
            rope_interleave=cfg.bool("rope_interleave", True),
            attention_bias=cfg.bool("attention_bias", False),
        )

    def check(self, source: str) -> None:
        super().check(source)
        if self.rotary_dim != self.qk_rope_head_dim:
            raise ConfigError(
                f"{source}: partial_rotary_factor {self.partial_rotary_factor} would rotate {self.rotary_dim} of the "
                f"{self.qk_rope_head_dim} rope dims; MLA rotates all of qk_rope_head_dim (use 1.0)"
            )
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{source}: qk_rope_head_dim {self.qk_rope_head_dim} must be even")
