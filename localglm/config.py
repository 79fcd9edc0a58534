"""Model configuration parsed from a Hugging Face `config.json`: what every GLM architecture shares.

`ModelConfig` holds the fields of the GLM MoE family that the generic code (loader, engine,
planner, prefetcher, quantizer) reads: vocabulary, widths, the MoE layout, RoPE base, special ids.
Each architecture (localglm/models/<arch>/config.py) subclasses it with its attention fields.
`ModelConfig.from_dict` / `from_file` on the base class pick the architecture from `model_type`
through the registry; anything we cannot run is refused here, with one line that names the field,
so later code never meets a half-understood config.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, LocalGLMError

# The largest width, count or length a config may give: no GLM comes near it, and torch sizes past it
# overflow the int32 indexing of some kernels long before any memory could hold them.
MAX_SIZE = 2**31 - 1
# Layers a config may give: GLM has 47-93; per-layer tables (GLM-5.2's indexer_types) are built from the count,
# and 2**31 - 1 of them took minutes and gigabytes before any error.
MAX_LAYERS = 4096
# routed_scaling_factor: GLM uses 1.0-2.5; past this the routed experts' output swamps the residual stream.
MAX_ROUTED_SCALE = 1000.0


def load_json(path: Path, error: type[LocalGLMError] = ConfigError, bad: str = "not valid JSON") -> Any:
    """Parse a JSON file; an unreadable, non-UTF-8, malformed or absurdly nested one is one line naming it
    (`bad` says what it is not, e.g. "malformed index JSON").

    Why one place: every metadata file (config, index, manifest, generation config) can be garbage, and
    json's RecursionError on a 100k-deep array is not a JSONDecodeError."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {bad} (not UTF-8 text: {exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: {bad} ({exc})") from None
    except RecursionError:
        raise error(f"{path}: {bad} (nested too deeply)") from None


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The fields every GLM mixture-of-experts architecture shares (subclassed per architecture)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    partial_rotary_factor: float = 0.5
    max_position_embeddings: int = 131072
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    model_type: str = ""
    quantization_config: dict[str, Any] | None = field(default=None, compare=False)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    def mtp_block_config(self) -> ModelConfig:
        """The config of the MTP block seen as a one-layer model of this architecture (layer 0 = the
        block at `num_hidden_layers`): always a MoE layer. Architectures with per-layer fields extend it."""
        return replace(self, num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    # ---- parsing --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Validate and normalise a config dict; `source` names the file in error messages.

        On `ModelConfig` itself the architecture comes from `model_type` (the registry); on an
        architecture's subclass the dict is parsed as that architecture."""
        if cls is ModelConfig:
            from .models import arch_for_model_type

            return arch_for_model_type(raw.get("model_type"), source).config.from_dict(raw, source)
        if raw.get("model_type") != cls.model_type_name():
            raise ConfigError(f"{source}: model_type {raw.get('model_type')!r} is not {cls.model_type_name()!r}")
        reader = ConfigReader(raw, source)
        out = cls(**common_fields(reader, cls), **cls.own_fields(reader))
        out.check(source)
        return out

    @classmethod
    def model_type_name(cls) -> str:
        """The `model_type` this class parses (the dataclass default of its `model_type` field)."""
        return cls.__dataclass_fields__["model_type"].default

    @classmethod
    def own_fields(cls, reader: ConfigReader) -> dict[str, Any]:
        """The architecture's own fields (attention shape, ...), read from config.json."""
        raise NotImplementedError(f"{cls.__name__} must read its own config fields")

    def check(self, source: str) -> None:
        """Cross-field checks; architectures extend this with their own."""
        for key, ids in (("eos_token_id", self.eos_token_ids), ("pad_token_id", (self.pad_token_id,)), ("bos_token_id", (self.bos_token_id,))):
            bad = [i for i in ids if i is not None and not 0 <= i < self.vocab_size]
            if bad:
                raise ConfigError(f"{source}: field {key!r} holds {bad[0]}, outside the vocabulary (0..{self.vocab_size - 1})")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"{source}: n_routed_experts {self.n_routed_experts} not divisible by n_group {self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"{source}: topk_group {self.topk_group} must be between 1 and n_group {self.n_group}")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ConfigError(f"{source}: n_group {self.n_group} leaves fewer than 2 experts per group")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ConfigError(f"{source}: num_experts_per_tok {self.num_experts_per_tok} out of range")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(f"{source}: first_k_dense_replace {self.first_k_dense_replace} out of range")
        if self.max_position_embeddings < 2:  # any context is at least 2 tokens (model_info.check_ctx)
            raise ConfigError(f"{source}: field 'max_position_embeddings' is {self.max_position_embeddings}: a model's context is at least 2 tokens")

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` from a file or from a model directory."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ConfigError(f"{p}: not found (a model directory needs config.json)")
        raw = load_json(p)
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a JSON object")
        return cls.from_dict(raw, str(p))


def common_fields(cfg: ConfigReader, cls: type[ModelConfig]) -> dict[str, Any]:
    """The shared fields of `ModelConfig` from config.json (both RoPE spellings; the defaults are
    the architecture class's, e.g. its partial rotary factor)."""
    raw, source = cfg.raw, cfg.source
    rope_theta, partial = read_rope(raw, source, cls.__dataclass_fields__["partial_rotary_factor"].default)
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (GLM uses 'silu')")
    layers = layer_count(cfg)
    return dict(
        vocab_size=cfg.positive_int("vocab_size"),
        hidden_size=cfg.positive_int("hidden_size"),
        intermediate_size=cfg.positive_int("intermediate_size"),
        num_hidden_layers=layers,
        moe_intermediate_size=cfg.positive_int("moe_intermediate_size"),
        n_routed_experts=cfg.positive_int("n_routed_experts"),
        num_experts_per_tok=cfg.positive_int("num_experts_per_tok"),
        n_shared_experts=cfg.count("n_shared_experts", 1),
        first_k_dense_replace=leading_dense_layers(cfg, layers, cls.__dataclass_fields__["first_k_dense_replace"].default),
        routed_scaling_factor=cfg.float("routed_scaling_factor", 1.0, above=0.0, at_most=MAX_ROUTED_SCALE),
        n_group=cfg.positive_int("n_group", 1),
        topk_group=cfg.positive_int("topk_group", 1),
        norm_topk_prob=cfg.bool("norm_topk_prob", True),
        rms_norm_eps=cfg.float("rms_norm_eps", 1e-5, above=0.0, below=1.0),
        rope_theta=rope_theta,
        partial_rotary_factor=partial,
        max_position_embeddings=cfg.positive_int("max_position_embeddings", 131072),
        num_nextn_predict_layers=cfg.count("num_nextn_predict_layers", 0),
        tie_word_embeddings=cfg.bool("tie_word_embeddings", False),
        eos_token_ids=_id_list(raw.get("eos_token_id"), source, "eos_token_id"),
        pad_token_id=cfg.count("pad_token_id", None),
        bos_token_id=cfg.count("bos_token_id", None),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        model_type=str(raw.get("model_type")),
        quantization_config=raw.get("quantization_config"),
    )


def leading_dense_layers(cfg: ConfigReader, layers: int, default: int = 1) -> int:
    """How many leading layers use a dense MLP: `mlp_layer_types` (transformers' per-layer list,
    "dense"/"sparse"), else `first_k_dense_replace`, else the architecture's default. Only dense layers
    first and MoE layers after them is a layout we (and llama.cpp's `leading_dense_block_count`) can run."""
    types = cfg.raw.get("mlp_layer_types")
    if types is None:
        return cfg.count("first_k_dense_replace", default)
    if not isinstance(types, list) or len(types) != layers or any(t not in ("dense", "sparse") for t in types):
        raise ConfigError(f"{cfg.source}: field 'mlp_layer_types' must list 'dense' or 'sparse' for each of the {layers} layers")
    k = types.index("sparse") if "sparse" in types else layers
    if "dense" in types[k:]:
        raise NotImplementedError(f"{cfg.source}: mlp_layer_types puts a dense layer after a MoE layer; only leading dense layers are supported")
    return k


def layer_count(cfg: ConfigReader) -> int:
    """num_hidden_layers, 1 to MAX_LAYERS."""
    layers = cfg.positive_int("num_hidden_layers")
    if layers > MAX_LAYERS:
        raise ConfigError(f"{cfg.source}: field 'num_hidden_layers' is {layers}, more than any model has (at most {MAX_LAYERS})")
    return layers


class ConfigReader:
    """Typed field access with errors that name the file and the field."""

    _MISSING = object()

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def _get(self, key: str, default: Any) -> Any:
        value = self.raw.get(key, self._MISSING)
        if value is self._MISSING or value is None:
            if default is self._MISSING:
                raise ConfigError(f"{self.source}: missing required field {key!r}")
            return default
        return value

    def int(self, key: str, default: Any = _MISSING) -> Any:
        v = self._get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{self.source}: field {key!r} must be an integer, got {v!r}")
        return v

    def positive_int(self, key: str, default: Any = _MISSING) -> Any:
        """A width, count or length: 1 to MAX_SIZE."""
        v = self.int(key, default)
        if v is not None and not 0 < v <= MAX_SIZE:
            raise ConfigError(f"{self.source}: field {key!r} must be positive (at most {MAX_SIZE}), got {v!r}")
        return v

    def count(self, key: str, default: Any = _MISSING) -> Any:
        """A count that may be zero (shared experts, dense layers, MTP layers) or a token id: 0 to MAX_SIZE."""
        v = self.int(key, default)
        if v is not None and not 0 <= v <= MAX_SIZE:
            raise ConfigError(f"{self.source}: field {key!r} must be 0 or more (at most {MAX_SIZE}), got {v!r}")
        return v

    def float(
        self, key: str, default: Any = _MISSING, *, above: float = -math.inf, below: float = math.inf, at_most: float = math.inf
    ) -> float:
        """A finite number, optionally in (above, below) and at most `at_most` (NaN and infinities are refused)."""
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{self.source}: field {key!r} must be a number, got {v!r}")
        if not (math.isfinite(v) and above < v < below and v <= at_most):
            bounds = [f"above {above:g}"] * (above > -math.inf) + [f"below {below:g}"] * (below < math.inf) + [f"at most {at_most:g}"] * (at_most < math.inf)
            raise ConfigError(f"{self.source}: field {key!r} must be a finite number{' ' + ' and '.join(bounds) if bounds else ''}, got {v!r}")
        return float(v)

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{self.source}: field {key!r} must be true or false, got {v!r}")
        return v


def rope_parameters(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """`rope_parameters` (transformers 5) or the legacy `rope_scaling` dict, {} when neither is set."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: field 'rope_parameters' must be an object")
    return params


def read_rope(raw: dict[str, Any], source: str, default_partial: float = 0.5) -> tuple[float, float]:
    """RoPE base and partial factor from `rope_parameters` (transformers 5) or legacy keys."""
    params = rope_parameters(raw, source)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise NotImplementedError(f"{source}: rope_type {rope_type!r} (only 'default' RoPE is implemented)")
    theta = params.get("rope_theta", raw.get("rope_theta", 1_000_000.0))
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", default_partial))
    for key, v, top in (("rope_theta", theta, math.inf), ("partial_rotary_factor", partial, 1.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 < v <= top):
            limit = "" if top == math.inf else f" at most {top:g}"
            raise ConfigError(f"{source}: field {key!r} must be a finite positive number{limit}, got {v!r}")
    return float(theta), float(partial)


def _id_list(value: Any, source: str, key: str) -> tuple[int, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= MAX_SIZE for i in items):
        raise ConfigError(f"{source}: field {key!r} must be a token id (0 or more) or a list of them, got {value!r}")
    return tuple(items)
