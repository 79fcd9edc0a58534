"""glm_moe_dsa as llama.cpp writes it: GGUF architecture `glm-dsa` (convert_hf_to_gguf.py's GlmMoeDsaModel,
a DeepseekV2Model), as llama.cpp 0c1e57098 (llama-cpp-python 0.3.36) reads it.

Everything of deepseek2 (glm4_moe_lite/gguf.py: the MLA keys, kv_b split into attn_k_b / attn_v_b,
MTP as nextn), plus the indexer: tensors `blk.N.indexer.{attn_q_b,attn_k,k_norm,proj}` (proj in F32)
on "full" layers, keys `attention.indexer.{head_count,key_length,top_k}` and `attention.indexer.types`
(one bool per layer, true = full). A file without `indexer.types` is read as llama.cpp reads it: every
layer full below a 1M context (GLM-5, 5.1), GLM-5.2's default pattern at 1M.
"""

from __future__ import annotations

from typing import Any

import gguf

from ...errors import ConfigError
from ..glm4_moe_lite.gguf import Glm4MoeLiteGGUF
from ..moe_gguf import GGUFMetadata
from .config import GlmMoeDsaConfig

GLM_5_2_CONTEXT = 1_048_576


def glm52_default_types(layers: int) -> list[bool]:
    """llama.cpp's GLM_5_2_DEFAULT_INDEXER_TYPES: two full layers, then full, shared x3, repeating."""
    return [i < 2 or (i - 2) % 4 == 0 for i in range(layers)]


class GlmMoeDsaGGUF(Glm4MoeLiteGGUF):
    arch = "glm-dsa"
    model_arch = gguf.MODEL_ARCH.GLM_DSA
    hf_architecture = "GlmMoeDsaForCausalLM"
    model_type = "glm_moe_dsa"

    def add_attention_hparams(self, w: gguf.GGUFWriter, cfg: GlmMoeDsaConfig) -> None:
        super().add_attention_hparams(w, cfg)
        w.add_indexer_head_count(cfg.index_n_heads)
        w.add_indexer_key_length(cfg.index_head_dim)
        w.add_indexer_top_k(cfg.index_topk)
        w.add_array(f"{self.arch}.attention.indexer.types", [t == "full" for t in cfg.indexer_types])

    def attention_config(self, meta: GGUFMetadata, files: Any) -> dict[str, Any]:
        out = super().attention_config(meta, files)
        layers = meta.req("block_count") - meta.opt("nextn_predict_layers", 0)
        raw = meta.meta.get(f"{self.arch}.attention.indexer.types")
        if raw is None:
            types = glm52_default_types(layers) if meta.req("context_length") >= GLM_5_2_CONTEXT else [True] * layers
        else:
            types = list(raw) if isinstance(raw, list) else [raw] * layers
            if len(types) != layers:
                raise ConfigError(f"{meta.where}: GGUF metadata {self.arch}.attention.indexer.types has {len(types)} entries for {layers} layers")
        return out | {
            "index_n_heads": meta.req("attention.indexer.head_count"),
            "index_head_dim": meta.req("attention.indexer.key_length"),
            "index_topk": meta.req("attention.indexer.top_k"),
            "indexer_types": ["full" if t else "shared" for t in types],
        }


GGUF = GlmMoeDsaGGUF()
