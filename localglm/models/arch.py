"""What an architecture is to the rest of localglm: the `Arch` entry of the registry and the
protocols of its pieces.

The loader, engine, quantizer, planner, prefetcher, GGUF reader/writer, `inspect` and `make-tiny`
code against these and name no architecture. An architecture is one folder under
localglm/models/ that builds one `Arch`; `Arch` checks at construction (at import) that every piece
is there and has the methods the rest of the code calls, so a half-written architecture fails at
import with one line naming the piece, not later in the middle of a load.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..config import ModelConfig

if TYPE_CHECKING:
    import torch  # annotations only: the registry imports without torch (`localglm --help` starts fast)

    from ..layers.experts import ExpertBackend
    from ..layers.kv_cache import HostRows, TokenCache
    from ..model_info import ParamCounts
    from .param_counts import HostableKV

# get(name, shape) -> tensor (or QuantTensor) in the model dtype on the model device
TensorGetter = Callable[[str, tuple[int, ...]], Any]


@dataclass(frozen=True)
class WeightReader:
    """How a model reads its always-used weights: `get` in the compute dtype (a QuantTensor where the
    recipe or the file quantizes it), `get_fp32` for what stays fp32 (routers), `has` for optional names."""

    get: TensorGetter
    get_fp32: TensorGetter
    has: Callable[[str], bool]


@runtime_checkable
class DecoderModel(Protocol):
    """The forward pass the engine drives. The KV cache is the model's own layout, passed in."""

    cfg: ModelConfig
    device: torch.device
    dtype: torch.dtype
    experts: ExpertBackend

    def new_cache(self, max_tokens: int, batch: int = 1) -> TokenCache: ...

    def hidden_states(self, input_ids: torch.Tensor, cache: TokenCache | None = None, start: int = 0) -> torch.Tensor: ...

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def next_token_logits(self, token: int, cache: TokenCache, start: int) -> torch.Tensor: ...


@runtime_checkable
class TensorSchema(Protocol):
    """Hub tensor names and their quantization classes."""

    def classify(self, name: str) -> tuple[str | None, int | None]:
        """A hub tensor name -> (recipe class or None = never quantized, layer or None)."""
        ...

    def hub_names(self, n_blocks: int, n_layers: int, n_experts: int) -> Iterator[str]:
        """Every hub tensor name a checkpoint of `n_blocks` blocks (those from `n_layers` on: MTP)
        and `n_experts` routed experts may hold, a superset of what one holds."""
        ...

    def classifier(self, n_layers: int) -> Callable[[str], tuple[str | None, int | None]]:
        """`classify` for a model of `n_layers` main layers: blocks from there on are MTP blocks
        (their tensors get the recipe's "mtp" class), which `classify` alone cannot tell."""
        ...


@runtime_checkable
class SizeFormulas(Protocol):
    """Sizes from config.json alone: what `inspect` and `plan` print and plan with."""

    def count_params(self, cfg: ModelConfig) -> ParamCounts: ...

    def kv_bytes_per_token(self, cfg: ModelConfig, bytes_per_value: int = 2) -> int: ...

    def hostable_kv(self, cfg: ModelConfig, bytes_per_value: int = 2) -> HostableKV | None:
        """The part of the KV cache that can live in host RAM with only selected rows gathered to the
        GPU per token (param_counts.HostableKV); None where attention reads every row."""
        ...

    def describe_attention(self, cfg: ModelConfig) -> str: ...


@runtime_checkable
class GGUFSchema(Protocol):
    """The architecture as llama.cpp writes it: GGUF arch name, tensor names and metadata keys."""

    arch: str  # general.architecture

    def gguf_name(self, hub: str, n_blocks: int) -> tuple[str, int | None]: ...

    def hf_config(self, files: Any) -> dict[str, Any]: ...

    def add_hparams(self, writer: Any, cfg: ModelConfig, n_blocks: int, n_mtp: int, ftype: Any) -> None: ...

    def split(self, hub: str, cfg: ModelConfig, n_blocks: int) -> Any:
        """The GGUF tensors a hub tensor becomes (moe_gguf.SplitPart list), None when it maps to one."""
        ...

    def joined(self, hub: str, files: Any, n_blocks: int) -> Any:
        """How a hub tensor is rebuilt from several GGUF tensors (moe_gguf.JoinedTensor), None when it maps to one."""
        ...


@runtime_checkable
class TinyMaker(Protocol):
    """Random checkpoints of the architecture in the real hub layout (tests, benchmarks, make-tiny)."""

    spec: type  # a dataclass of shape knobs (subclass of localglm.tiny.TinySpecBase)

    def config_json(self, spec: Any, special: dict[str, int]) -> dict[str, Any]: ...

    def tensors(self, spec: Any) -> Iterator[tuple[str, torch.Tensor]]: ...

    def estimate_params(self, spec: Any) -> int: ...


@runtime_checkable
class ModelBuilder(Protocol):
    """Reads the always-used weights and builds the forward pass around an expert backend."""

    def load_weights(self, cfg: ModelConfig, reader: WeightReader) -> Any: ...

    def build(
        self, cfg: ModelConfig, weights: Any, experts: ExpertBackend, device: torch.device, kv_host: HostRows | None = None
    ) -> DecoderModel: ...

    def routing(self, cfg: ModelConfig, weights: Any) -> Any:
        """The MoE routers (moe_decoder.MoeRouting) expert prediction applies, before the model exists."""
        ...


class LazyBuilder:
    """An architecture's ModelBuilder, imported on first use: its module imports torch and the
    layers, which the registry's other users (`--help`, `plan`, `inspect`) never need."""

    def __init__(self, module: str, name: str) -> None:
        self._where = (module, name)

    @functools.cached_property
    def _builder(self) -> ModelBuilder:
        module, name = self._where
        return getattr(importlib.import_module(module), name)()

    def load_weights(self, cfg: ModelConfig, reader: WeightReader) -> Any:
        return self._builder.load_weights(cfg, reader)

    def build(
        self, cfg: ModelConfig, weights: Any, experts: ExpertBackend, device: torch.device, kv_host: HostRows | None = None
    ) -> DecoderModel:
        return self._builder.build(cfg, weights, experts, device, kv_host)

    def routing(self, cfg: ModelConfig, weights: Any) -> Any:
        return self._builder.routing(cfg, weights)


class ArchError(TypeError):
    """An architecture entry is incomplete (a programming error, raised at import)."""


_PIECES: dict[str, type] = {
    "model": ModelBuilder,
    "schema": TensorSchema,
    "sizes": SizeFormulas,
    "gguf": GGUFSchema,
    "tiny": TinyMaker,
}


@dataclass(frozen=True)
class Arch:
    """One architecture: config class, model builder, tensor schema, size formulas, GGUF schema, tiny maker."""

    model_type: str  # config.json `model_type`
    title: str  # the models it runs, for messages ("GLM-4.5, 4.5-Air, 4.6, 4.7")
    hf_architecture: str  # config.json `architectures[0]`
    config: type[ModelConfig]
    model: ModelBuilder
    schema: TensorSchema
    sizes: SizeFormulas
    gguf: GGUFSchema
    tiny: TinyMaker

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name, None) is None:
                raise ArchError(f"architecture {self.model_type!r}: its {f.name} is missing")
        if not (isinstance(self.config, type) and issubclass(self.config, ModelConfig)):
            raise ArchError(f"architecture {self.model_type!r}: config must be a ModelConfig subclass, got {self.config!r}")
        if self.config.model_type_name() != self.model_type:
            raise ArchError(f"architecture {self.model_type!r}: its config parses model_type {self.config.model_type_name()!r}")
        for name, proto in _PIECES.items():
            piece = getattr(self, name)
            if not isinstance(piece, proto):
                missing = [m for m in _protocol_members(proto) if not hasattr(piece, m)]
                raise ArchError(f"architecture {self.model_type!r}: its {name} ({type(piece).__name__}) lacks {', '.join(missing) or 'a member'} of {proto.__name__}")


def _protocol_members(proto: type) -> list[str]:
    return sorted(getattr(proto, "__protocol_attrs__", None) or [n for n in vars(proto) if not n.startswith("_")])
