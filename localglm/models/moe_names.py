"""Hub tensor names of the GLM MoE decoder and their quantization classes, shared by every
architecture of the family (they differ only in their attention's names).

An architecture's schema is `MoeTensorSchema(attention=..., attention_extra=...)`: the names of its
attention projections (quantized as the recipe's "attn" class) and of its other attention tensors
(norms, biases: never quantized).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")
_SHARED = re.compile(r"mlp\.shared_experts\.(gate|up|down)_proj\.weight")
_DENSE = re.compile(r"mlp\.(gate|up|down)_proj\.weight")
MTP_TENSORS = ("eh_proj", "enorm", "hnorm", "shared_head.norm", "shared_head.head", "embed_tokens")
_MTP_OWN_WEIGHTS = {f"{t}.weight" for t in ("eh_proj", "shared_head.head", "embed_tokens")}
# Classes an MTP block keeps as their own: precision-critical and tiny (computed in fp32 / kept in float).
_MTP_KEEPS = ("router", "indexer")


@dataclass(frozen=True)
class MoeTensorSchema:
    """Names and classes: `attention` are the projection names under `self_attn` (quantized as "attn"),
    `attention_extra` every other tensor name under `self_attn` a checkpoint may hold, and
    `attention_classes` the recipe class of those that are weights of their own class (GLM-5's indexer)."""

    attention: tuple[str, ...]
    attention_extra: tuple[str, ...] = ()
    attention_classes: tuple[tuple[str, str | None], ...] = ()  # other weights under self_attn -> recipe class (None: never)

    def classify(self, name: str) -> tuple[str | None, int | None]:
        """A hub tensor name -> (recipe class or None = never quantized, layer or None)."""
        if name == "model.embed_tokens.weight":
            return "embed", None
        if name == "lm_head.weight":
            return "lm_head", None
        m = _LAYER.fullmatch(name)
        if not m or not name.endswith(".weight"):
            return None, None
        layer, rest = int(m.group(1)), m.group(2)
        if rest.startswith("self_attn."):
            sub = rest[len("self_attn.") : -len(".weight")]
            if sub in self.attention:
                return "attn", layer
            for name, cls in self.attention_classes:
                if sub == name:
                    return cls, layer
        if _EXPERT.fullmatch(rest):
            return "experts", layer
        if _SHARED.fullmatch(rest):
            return "shared", layer
        if _DENSE.fullmatch(rest):
            return "dense", layer
        if rest == "mlp.gate.weight":
            return "router", layer
        return None, layer

    def classifier(self, n_layers: int) -> Callable[[str], tuple[str | None, int | None]]:
        """`classify` for a checkpoint of `n_layers` decoder layers: the blocks from `n_layers` on are
        MTP blocks, whose weights are all the recipe's "mtp" class (default 8 bits: a 4-bit draft head
        loses most of its acceptance), except the router and the indexer, which keep their own class."""

        def classify(name: str) -> tuple[str | None, int | None]:
            cls, layer = self.classify(name)
            if layer is None or layer < n_layers or cls in _MTP_KEEPS:
                return cls, layer
            if cls is not None or name.split(".", 3)[3] in _MTP_OWN_WEIGHTS:
                return "mtp", layer
            return None, layer

        return classify

    def hub_names(self, n_blocks: int, n_layers: int, n_experts: int) -> Iterator[str]:
        """Every hub tensor name a checkpoint of this shape may hold: `n_blocks` blocks, of which those
        from `n_layers` on are MTP blocks, `n_experts` routed experts (a superset of what one holds)."""
        yield "model.embed_tokens.weight"
        yield "model.norm.weight"
        yield "lm_head.weight"
        for i in range(n_blocks):
            p = f"model.layers.{i}"
            yield f"{p}.input_layernorm.weight"
            yield f"{p}.post_attention_layernorm.weight"
            for proj in self.attention:
                yield f"{p}.self_attn.{proj}.weight"
                yield f"{p}.self_attn.{proj}.bias"
            for extra in self.attention_extra:
                yield f"{p}.self_attn.{extra}"
            for proj in ("gate_proj", "up_proj", "down_proj"):
                yield f"{p}.mlp.{proj}.weight"
                yield f"{p}.mlp.shared_experts.{proj}.weight"
            yield f"{p}.mlp.gate.weight"
            yield f"{p}.mlp.gate.e_score_correction_bias"
            for e in range(n_experts):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    yield f"{p}.mlp.experts.{e}.{proj}.weight"
            if i >= n_layers:
                for extra in MTP_TENSORS:
                    yield f"{p}.{extra}.weight"
