"""Random glm_moe_dsa checkpoints (GLM-5-shaped, scaled down) for tests, benchmarks and `make-tiny`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ...tiny import RandomWeights, moe_tensors
from ..glm4_moe_lite.tiny import Glm4MoeLiteTiny
from ..glm4_moe_lite.tiny import TinySpec as MlaSpec

if TYPE_CHECKING:
    import torch


@dataclass
class TinySpec(MlaSpec):
    """Shapes and switches of a random glm_moe_dsa checkpoint (defaults: a few-MB test model with the
    indexer's top-k below the test prompts' length, so the sparse selection matters)."""

    model_type: ClassVar[str] = "glm_moe_dsa"

    index_n_heads: int = 4
    index_head_dim: int = 16
    index_topk: int = 8
    indexer_pattern: str = ""  # "FSSF..." per layer (F: runs the indexer); "" = every layer full
    first_k_dense_replace: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        from ...errors import LocalGLMError

        if self.indexer_pattern and (len(self.indexer_pattern) != self.num_hidden_layers or set(self.indexer_pattern) - {"F", "S"} or self.indexer_pattern[0] != "F"):
            raise LocalGLMError(f"make-tiny: indexer_pattern {self.indexer_pattern!r} must be F/S letters, one per layer, starting with F")
        if not self.q_lora_rank:
            raise LocalGLMError("make-tiny: glm_moe_dsa needs q_lora_rank > 0 (the indexer reads the query latent)")

    def indexer_types(self) -> list[str]:
        return ["full" if c == "F" else "shared" for c in self.indexer_pattern] or ["full"] * self.num_hidden_layers


class GlmMoeDsaTiny(Glm4MoeLiteTiny):
    spec = TinySpec
    hf_architecture = "GlmMoeDsaForCausalLM"

    def config_json(self, spec: TinySpec, special: dict[str, int]) -> dict[str, Any]:
        cfg = super().config_json(spec, special)
        cfg.update(
            index_n_heads=spec.index_n_heads, index_head_dim=spec.index_head_dim, index_topk=spec.index_topk,
            indexer_types=spec.indexer_types(),
        )  # fmt: skip
        return dict(sorted(cfg.items()))

    def tensors(self, spec: TinySpec) -> Iterator[tuple[str, torch.Tensor]]:
        mla = self.attention_tensors(spec)
        h, d = spec.hidden_size, spec.index_head_dim
        full = [t == "full" for t in spec.indexer_types()] + [True] * spec.num_nextn_predict_layers  # the MTP block indexes too

        def attention(r: RandomWeights, p: str) -> Iterator[tuple[str, torch.Tensor]]:
            yield from mla(r, p)
            if full[int(p.rsplit(".", 1)[1])]:
                a = f"{p}.self_attn.indexer"
                yield f"{a}.wq_b.weight", r.lin(spec.index_n_heads * d, spec.q_lora_rank)
                yield f"{a}.wk.weight", r.lin(d, h)
                yield f"{a}.k_norm.weight", r.vec(d, 1.0)
                yield f"{a}.k_norm.bias", r.vec(d)
                yield f"{a}.weights_proj.weight", r.lin(spec.index_n_heads, h).float()

        return moe_tensors(spec, attention)

    def estimate_params(self, spec: TinySpec) -> int:
        d = spec.index_head_dim
        per_indexer = spec.index_n_heads * d * spec.q_lora_rank + d * spec.hidden_size + spec.index_n_heads * spec.hidden_size
        return super().estimate_params(spec) + spec.num_hidden_layers * per_indexer


TINY = GlmMoeDsaTiny()
