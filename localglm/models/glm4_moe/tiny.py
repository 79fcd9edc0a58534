"""Random glm4_moe checkpoints (GLM-4.5-shaped, scaled down) for tests, benchmarks and `make-tiny`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ...tiny import RandomWeights, TinySpecBase, base_config_json, moe_param_estimate, moe_tensors

if TYPE_CHECKING:
    import torch


@dataclass
class TinySpec(TinySpecBase):
    """Shapes and switches of a random glm4_moe checkpoint (defaults: a few-MB test model)."""

    model_type: ClassVar[str] = "glm4_moe"

    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    partial_rotary_factor: float = 0.5
    attention_bias: bool = True
    use_qk_norm: bool = True

    def rope_keys(self) -> dict[str, float]:
        return {"rope_theta": self.rope_theta, "partial_rotary_factor": self.partial_rotary_factor}


class Glm4MoeTiny:
    spec = TinySpec

    def config_json(self, spec: TinySpec, special: dict[str, int]) -> dict[str, Any]:
        cfg = base_config_json(spec, special, "Glm4MoeForCausalLM")
        cfg.update(
            attention_bias=spec.attention_bias,
            head_dim=spec.head_dim,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            use_qk_norm=spec.use_qk_norm,
        )
        return dict(sorted(cfg.items()))

    def tensors(self, spec: TinySpec) -> Iterator[tuple[str, torch.Tensor]]:
        h, hd = spec.hidden_size, spec.head_dim
        q, kv = spec.num_attention_heads * hd, spec.num_key_value_heads * hd

        def attention(r: RandomWeights, p: str) -> Iterator[tuple[str, torch.Tensor]]:
            a = f"{p}.self_attn"
            for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                yield f"{a}.{name}.weight", r.lin(rows, h)
                if spec.attention_bias:
                    yield f"{a}.{name}.bias", r.vec(rows)
            yield f"{a}.o_proj.weight", r.lin(h, q)
            if spec.use_qk_norm:
                yield f"{a}.q_norm.weight", r.vec(hd, 1.0)
                yield f"{a}.k_norm.weight", r.vec(hd, 1.0)

        return moe_tensors(spec, attention)

    def estimate_params(self, spec: TinySpec) -> int:
        return moe_param_estimate(spec, spec.hidden_size * spec.head_dim * (2 * spec.num_attention_heads + 2 * spec.num_key_value_heads))


TINY = Glm4MoeTiny()
