"""glm4_moe as llama.cpp writes it: GGUF architecture `glm4moe` (convert_hf_to_gguf.py's Glm4MoeModel).

Attention keys: head counts, key/value length (= head_dim), `rope.dimension_count` (the rotated
dims); q/k/v biases and q/k norms are known from the tensors present.
"""

from __future__ import annotations

from typing import Any

import gguf

from ...errors import ConfigError
from ..moe_gguf import GGUFMetadata, MoeGGUFSchema
from .config import Glm4MoeConfig


class Glm4MoeGGUF(MoeGGUFSchema):
    arch = "glm4moe"
    model_arch = gguf.MODEL_ARCH.GLM4_MOE
    hf_architecture = "Glm4MoeForCausalLM"
    model_type = "glm4_moe"
    dtype_probe = "blk.0.attn_q.weight"

    def add_attention_hparams(self, w: gguf.GGUFWriter, cfg: Glm4MoeConfig) -> None:
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.rotary_dim)

    def attention_config(self, meta: GGUFMetadata, files: Any) -> dict[str, Any]:
        heads = meta.req("attention.head_count")
        head_dim = meta.opt("attention.key_length", meta.req("embedding_length") // heads if heads else 0)
        if meta.opt("attention.value_length", head_dim) != head_dim:
            raise ConfigError(f"{meta.where}: GGUF metadata {self.arch}.attention.value_length differs from key_length")
        rot = meta.opt("rope.dimension_count", head_dim)
        return {
            "num_attention_heads": heads,
            "num_key_value_heads": meta.opt("attention.head_count_kv", heads),
            "head_dim": head_dim,
            "partial_rotary_factor": rot / head_dim if head_dim else 0.0,
            "attention_bias": "blk.0.attn_q.bias" in files.tensors,
            "use_qk_norm": "blk.0.attn_q_norm.weight" in files.tensors,
        }


GGUF = Glm4MoeGGUF()
