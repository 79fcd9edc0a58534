"""glm4_moe hub tensor names: q/k/v/o projections (with biases when `attention_bias`), q/k norms."""

from __future__ import annotations

from ..moe_names import MoeTensorSchema

SCHEMA = MoeTensorSchema(attention=("q_proj", "k_proj", "v_proj", "o_proj"), attention_extra=("q_norm.weight", "k_norm.weight"))
