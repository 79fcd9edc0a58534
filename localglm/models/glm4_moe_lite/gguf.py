"""glm4_moe_lite as llama.cpp writes it: GGUF architecture `deepseek2` (convert_hf_to_gguf.py's
Glm4MoeLiteModel, a DeepseekV2Model), as llama.cpp 0c1e57098 (llama-cpp-python 0.3.36) reads it.

- MLA keys: `attention.q_lora_rank` (0 when q_proj is one matrix), `kv_lora_rank`, `key_length` =
  kv_lora + rope and `value_length` = kv_lora (the cached row), `key_length_mla` = nope + rope and
  `value_length_mla` = v (per head), `head_count_kv` 1, `rope.dimension_count` = rope. RoPE is
  llama.cpp's NORM (consecutive pairs): transformers' `rope_interleave`, so no weight is permuted.
- `kv_b_proj` is split into `attn_k_b` (per head, transposed: [H, kv_lora, nope]) and `attn_v_b`
  ([H, v, kv_lora]); reading, they are put back together. Legacy files with one `attn_kv_b` (no
  `*_mla` keys, key/value length = per-head dims) are read too.
- `expert_gating_func` is written (sigmoid): llama.cpp guesses it only for GLM-4.7-Flash's exact shape.
- The MTP block is `blk.{L}.*` plus `blk.{L}.nextn.*`, with `nextn_predict_layers`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import gguf

from ...errors import CheckpointError, ConfigError
from ..moe_gguf import GGUFMetadata, JoinedTensor, MoeGGUFSchema, SplitPart
from .config import Glm4MoeLiteConfig

if TYPE_CHECKING:
    import torch

_KV_B = re.compile(r"^model\.layers\.(\d+)\.self_attn\.kv_b_proj\.weight$")


class Glm4MoeLiteGGUF(MoeGGUFSchema):
    arch = "deepseek2"
    model_arch = gguf.MODEL_ARCH.DEEPSEEK2
    hf_architecture = "Glm4MoeLiteForCausalLM"
    model_type = "glm4_moe_lite"
    dtype_probe = "blk.0.attn_kv_a_mqa.weight"

    def add_attention_hparams(self, w: gguf.GGUFWriter, cfg: Glm4MoeLiteConfig) -> None:
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(1)  # MLA runs as MQA over the latent in llama.cpp
        w.add_vocab_size(cfg.vocab_size)
        w.add_q_lora_rank(cfg.q_lora_rank or 0)  # llama.cpp requires the key; 0 = one q_proj
        w.add_kv_lora_rank(cfg.kv_lora_rank)
        w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        w.add_value_length(cfg.kv_lora_rank)
        w.add_key_length_mla(cfg.qk_head_dim)
        w.add_value_length_mla(cfg.v_head_dim)
        w.add_rope_dimension_count(cfg.qk_rope_head_dim)

    def attention_config(self, meta: GGUFMetadata, files: Any) -> dict[str, Any]:
        heads = meta.req("attention.head_count")
        rope = meta.req("rope.dimension_count")
        if meta.opt("attention.key_length_mla", None) is None:  # legacy layout (attn_kv_b): per-head lengths
            per_head_k, v = meta.req("attention.key_length"), meta.req("attention.value_length")
        else:
            per_head_k, v = meta.req("attention.key_length_mla"), meta.req("attention.value_length_mla")
        if per_head_k <= rope:
            raise ConfigError(f"{meta.where}: GGUF metadata {self.arch}.attention.key_length_mla {per_head_k} is not above the rope dims {rope}")
        return {
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "q_lora_rank": meta.opt("attention.q_lora_rank", 0) or None,
            "kv_lora_rank": meta.req("attention.kv_lora_rank"),
            "qk_nope_head_dim": per_head_k - rope,
            "qk_rope_head_dim": rope,
            "v_head_dim": v,
            "rope_interleave": True,
            "partial_rotary_factor": 1.0,
            "attention_bias": "blk.0.attn_kv_a_mqa.bias" in files.tensors,
        }

    def split(self, hub: str, cfg: Glm4MoeLiteConfig, n_blocks: int) -> list[SplitPart] | None:
        m = _KV_B.match(hub)
        if m is None:
            return None
        h, nope, v, lora = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank

        def per_head(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return w.reshape(h, nope + v, lora).split([nope, v], dim=1)

        b = m[1]
        return [
            SplitPart(f"blk.{b}.attn_k_b.weight", (h, lora, nope), lambda w: per_head(w)[0].transpose(1, 2).contiguous()),
            SplitPart(f"blk.{b}.attn_v_b.weight", (h, v, lora), lambda w: per_head(w)[1].contiguous()),
        ]

    def joined(self, hub: str, files: Any, n_blocks: int) -> JoinedTensor | None:
        m = _KV_B.match(hub)
        if m is None:
            return None
        k_name, v_name = f"blk.{m[1]}.attn_k_b.weight", f"blk.{m[1]}.attn_v_b.weight"
        k_b, v_b = files.tensors.get(k_name), files.tensors.get(v_name)
        if k_b is None or v_b is None or len(k_b.shape) != 3 or len(v_b.shape) != 3:
            return None  # a legacy file's attn_kv_b maps one to one
        h, lora, nope = k_b.shape
        v = v_b.shape[1]
        if v_b.shape[0] != h or v_b.shape[2] != lora:  # else the join fails deep in torch.cat
            raise CheckpointError(
                f"{v_b.file}: tensor {v_name} has shape {list(v_b.shape)}, expected [{h}, v_head_dim, {lora}] beside {k_name} {list(k_b.shape)}"
            )

        def join(parts: list[torch.Tensor]) -> torch.Tensor:
            import torch  # not at import: the registry loads without torch

            k, vv = parts
            return torch.cat([k.transpose(1, 2), vv], dim=1).reshape(h * (nope + v), lora)

        return JoinedTensor((k_name, v_name), (h * (nope + v), lora), join)


GGUF = Glm4MoeLiteGGUF()
