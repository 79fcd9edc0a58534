"""glm_moe_dsa hub tensor names: GLM-4.7-Flash's MLA names plus the indexer's (`self_attn.indexer.*`
on "full" layers). The indexer's projections are their own recipe class ("indexer", kept in float by
default); its weights_proj is read in fp32 like the router and never quantized."""

from __future__ import annotations

from ..glm4_moe_lite.schema import SCHEMA as MLA_SCHEMA
from ..moe_names import MoeTensorSchema

SCHEMA = MoeTensorSchema(
    attention=MLA_SCHEMA.attention,
    attention_extra=(
        *MLA_SCHEMA.attention_extra,
        "indexer.wq_b.weight", "indexer.wk.weight", "indexer.k_norm.weight", "indexer.k_norm.bias", "indexer.weights_proj.weight",
    ),
    attention_classes=(("indexer.wq_b", "indexer"), ("indexer.wk", "indexer"), ("indexer.weights_proj", None)),
)  # fmt: skip
