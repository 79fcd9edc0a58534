"""Random glm4_moe_lite checkpoints (GLM-4.7-Flash-shaped, scaled down) for tests, benchmarks and `make-tiny`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ...tiny import AttentionTensors, RandomWeights, TinySpecBase, base_config_json, moe_param_estimate, moe_tensors

if TYPE_CHECKING:
    import torch


@dataclass
class TinySpec(TinySpecBase):
    """Shapes and switches of a random glm4_moe_lite checkpoint (defaults: a few-MB test model)."""

    model_type: ClassVar[str] = "glm4_moe_lite"

    num_attention_heads: int = 4
    q_lora_rank: int = 32  # 0 writes q_lora_rank null (one q_proj)
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    rope_interleave: bool = True
    attention_bias: bool = False
    chat_style: str = "glm47"


class Glm4MoeLiteTiny:
    spec = TinySpec
    hf_architecture = "Glm4MoeLiteForCausalLM"

    def config_json(self, spec: TinySpec, special: dict[str, int]) -> dict[str, Any]:
        cfg = base_config_json(spec, special, self.hf_architecture)
        cfg.update(
            attention_bias=spec.attention_bias,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_attention_heads,
            q_lora_rank=spec.q_lora_rank or None,
            kv_lora_rank=spec.kv_lora_rank,
            qk_nope_head_dim=spec.qk_nope_head_dim,
            qk_rope_head_dim=spec.qk_rope_head_dim,
            v_head_dim=spec.v_head_dim,
            rope_interleave=spec.rope_interleave,
            partial_rotary_factor=1.0,
            topk_method="noaux_tc",
            # transformers' Glm4MoeLite reads the dense/MoE layout from this list only (first_k_dense_replace is llama.cpp's)
            mlp_layer_types=["dense" if i < spec.first_k_dense_replace else "sparse" for i in range(spec.num_hidden_layers)],
        )
        return dict(sorted(cfg.items()))

    def tensors(self, spec: TinySpec) -> Iterator[tuple[str, torch.Tensor]]:
        return moe_tensors(spec, self.attention_tensors(spec))

    def attention_tensors(self, spec: TinySpec) -> AttentionTensors:
        """The MLA tensors of one layer (`model.layers.i` prefix in, hub names out)."""
        h, heads = spec.hidden_size, spec.num_attention_heads
        q_out = heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim)

        def attention(r: RandomWeights, p: str) -> Iterator[tuple[str, torch.Tensor]]:
            a = f"{p}.self_attn"
            if spec.q_lora_rank:
                yield f"{a}.q_a_proj.weight", r.lin(spec.q_lora_rank, h)
                if spec.attention_bias:
                    yield f"{a}.q_a_proj.bias", r.vec(spec.q_lora_rank)
                yield f"{a}.q_a_layernorm.weight", r.vec(spec.q_lora_rank, 1.0)
                yield f"{a}.q_b_proj.weight", r.lin(q_out, spec.q_lora_rank)
            else:
                yield f"{a}.q_proj.weight", r.lin(q_out, h)
            kv_a = spec.kv_lora_rank + spec.qk_rope_head_dim
            yield f"{a}.kv_a_proj_with_mqa.weight", r.lin(kv_a, h)
            if spec.attention_bias:
                yield f"{a}.kv_a_proj_with_mqa.bias", r.vec(kv_a)
            yield f"{a}.kv_a_layernorm.weight", r.vec(spec.kv_lora_rank, 1.0)
            yield f"{a}.kv_b_proj.weight", r.lin(heads * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank)
            yield f"{a}.o_proj.weight", r.lin(h, heads * spec.v_head_dim)
            if spec.attention_bias:
                yield f"{a}.o_proj.bias", r.vec(h)

        return attention

    def estimate_params(self, spec: TinySpec) -> int:
        h, heads = spec.hidden_size, spec.num_attention_heads
        q_in = spec.q_lora_rank or h
        attn = (h * spec.q_lora_rank if spec.q_lora_rank else 0) + q_in * heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim)
        attn += h * (spec.kv_lora_rank + spec.qk_rope_head_dim) + spec.kv_lora_rank * heads * (spec.qk_nope_head_dim + spec.v_head_dim)
        return moe_param_estimate(spec, attn + heads * spec.v_head_dim * h)


TINY = Glm4MoeLiteTiny()
