"""glm4_moe_lite hub tensor names: the MLA projections (q_a/q_b or q_proj, kv_a_proj_with_mqa, kv_b, o)
and the two latent norms."""

from __future__ import annotations

from ..moe_names import MoeTensorSchema

SCHEMA = MoeTensorSchema(
    attention=("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
    attention_extra=("q_a_layernorm.weight", "kv_a_layernorm.weight"),
)
