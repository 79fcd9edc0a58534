"""config.json of GLM-4.5 / 4.5-Air / 4.6 / 4.7 (`glm4_moe`): grouped-query attention fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import ConfigReader, ModelConfig
from ...errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Glm4MoeConfig(ModelConfig):
    """Architecture of a glm4_moe model (GLM-4.5, 4.5-Air, 4.6, 4.7)."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    attention_bias: bool = False
    use_qk_norm: bool = False
    model_type: str = "glm4_moe"

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per head (GLM rotates only the first half, NeoX-style)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def own_fields(cls, cfg: ConfigReader) -> dict[str, Any]:
        heads = cfg.positive_int("num_attention_heads")
        return dict(
            num_attention_heads=heads,
            num_key_value_heads=cfg.positive_int("num_key_value_heads", heads),
            head_dim=cfg.positive_int("head_dim", None) or (cfg.positive_int("hidden_size") // heads),
            attention_bias=cfg.bool("attention_bias", False),
            use_qk_norm=cfg.bool("use_qk_norm", False),
        )

    def check(self, source: str) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{source}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        super().check(source)
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(f"{source}: partial_rotary_factor {self.partial_rotary_factor} gives an invalid rotary dim")
