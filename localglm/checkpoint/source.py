"""Lazy access to checkpoint tensors: the `TensorSource` protocol and its safetensors implementation.

Why lazy: a GLM checkpoint is hundreds of GB in dozens of shards, and the planner must see every
tensor's name, shape and dtype before deciding what to load where. So opening reads only the
headers; data is memory-mapped per file on first use and handed out without copying when no
conversion is asked for. FP8 checkpoints (GLM/DeepSeek block-scaled, or compressed-tensors) are
dequantized on `get`, so callers see plain weights and never the scale tensors.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import torch

from ..config import load_json
from ..errors import CheckpointError, ConfigError
from .safetensors import (
    DEFAULT_FP8_BLOCK,
    FP8_DTYPES,
    INDEX_FILE_NAME,
    SINGLE_FILE_NAME,
    HeaderEntry,
    ScaleLayout,
    dequantize_scaled,
    read_safetensors_header,
    scale_layout,
    shape_str,
)
from .mmap import FileMaps, Mapped, view

SCALE_SUFFIXES = ("_scale_inv", "_scale")  # also covers `.input_scale`, `.k_scale`, `.v_scale`


@dataclass(frozen=True)
class TensorInfo:
    """What is known about a tensor without reading it.

    `dtype` is what `get` returns by default (the dequantization target for a scaled fp8 weight);
    `stored_dtype` is what the file holds. `offsets` are absolute [begin, end) byte positions in `file`.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offsets: tuple[int, int]
    stored_dtype: torch.dtype
    scale: str | None = None  # companion scale tensor of a quantized weight (reach it with `raw`)

    @property
    def nbytes(self) -> int:
        """Bytes stored on disk for the tensor itself (scales not included)."""
        return self.offsets[1] - self.offsets[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@runtime_checkable
class TensorSource(Protocol):
    """One read interface for every checkpoint format (HF safetensors, quantized dir, GGUF).

    `get` may return a tensor that shares read-only memory with the file: never write to it in
    place; `clone()` first (asking for a different dtype already gives a fresh tensor).
    """

    def names(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def __contains__(self, name: object) -> bool: ...

    def get(
        self, name: str, dtype: torch.dtype | None = None, expected_shape: tuple[int, ...] | None = None
    ) -> torch.Tensor: ...

    def close(self) -> None: ...

    def __enter__(self) -> TensorSource: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def check_expected_shape(info: TensorInfo, expected_shape: Sequence[int] | None) -> None:
    """Raise the standard one-line error when a tensor's shape is not what the model needs."""
    if expected_shape is not None and tuple(expected_shape) != info.shape:
        raise CheckpointError(
            f"tensor {info.name} in {info.file} has shape {shape_str(info.shape)}, expected {shape_str(expected_shape)}"
        )


def check_float(info: TensorInfo) -> None:
    """Refuse a weight stored as integers or booleans: GLM checkpoints hold only floats (fp8 with scales
    included), and converting such a tensor to the compute dtype gave a model of garbage without a word."""
    if not info.dtype.is_floating_point:
        raise CheckpointError(f"tensor {info.name} in {info.file} is stored as {info.dtype}, not a floating-point weight")


class MappedSource(Mapped):
    """A TensorSource over memory-mapped files: the name table (`_infos`, filled by the subclass) and
    its one-line error for a missing name (`_where` names the checkpoint), written once for every format."""

    _infos: dict[str, TensorInfo]
    _where: Path | str

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        info = self._infos.get(name)
        if info is None:
            raise missing_tensor_error(name, self._infos, self._where)
        return info


_MAX_FUZZY_CANDIDATES = 2000  # difflib over all ~45k expert names of GLM-4.5 takes seconds


def _close_names(name: str, known: Iterable[str]) -> list[str]:
    """Nearest existing names, fuzzy-matched only among those sharing the longest dotted prefix (fast)."""
    pool = list(known)
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:depth]) + "."
        narrowed = [n for n in pool if n.startswith(prefix)]
        if narrowed:
            pool = narrowed
            break
    return difflib.get_close_matches(name, pool[:_MAX_FUZZY_CANDIDATES], n=3, cutoff=0.75)


def missing_tensor_error(name: str, known: Iterable[str], where: Path | str) -> CheckpointError:
    """The standard error for a name the checkpoint lacks, with the closest existing names as a hint."""
    close = _close_names(name, known)
    hint = f" (close names: {', '.join(close)})" if close else ""
    return CheckpointError(f"tensor {name} not found in {where}{hint}")


# --------------------------------------------------------------------------------------------
# Quantization config
# --------------------------------------------------------------------------------------------


def _block_pair(value: object, where: str, field_name: str) -> tuple[int, int]:
    """Accept [b0, b1] or the older compressed-tensors "b0xb1" string."""
    items = value.split("x") if isinstance(value, str) else value
    try:
        pair = tuple(int(v) for v in items) if isinstance(items, (list, tuple)) else ()
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or min(pair) <= 0:
        raise ConfigError(f"{where}: {field_name} must be two positive integers, got {value!r}")
    return pair[0], pair[1]


def _compressed_tensors_block(config: Mapping[str, Any], where: str) -> tuple[int, int]:
    """Block size from the first weight config group that has one; 8-bit float weights only."""
    groups = config.get("config_groups") or {}
    if not isinstance(groups, Mapping):
        raise ConfigError(f"{where}: quantization_config.config_groups must be an object")
    block: tuple[int, int] | None = None
    for group_name, group in groups.items():
        weights = group.get("weights") if isinstance(group, Mapping) else None
        weights = weights if isinstance(weights, Mapping) else {}
        if weights.get("type", "float") != "float" or weights.get("num_bits", 8) != 8:
            raise ConfigError(
                f"{where}: compressed-tensors group {group_name} stores {weights.get('num_bits')}-bit "
                f"{weights.get('type')} weights; only 8-bit float (fp8) is supported"
            )
        if block is None and weights.get("block_structure"):
            block = _block_pair(weights["block_structure"], where, f"{group_name}.weights.block_structure")
        elif block is None and weights.get("strategy") == "group" and weights.get("group_size"):
            block = (1, int(weights["group_size"]))
    return block or DEFAULT_FP8_BLOCK


@dataclass(frozen=True)
class QuantizationScheme:
    """The parts of `quantization_config` the reader needs: which scale naming wins, and the block."""

    method: str | None = None  # "fp8", "compressed-tensors", or None when the config says nothing
    block: tuple[int, int] = DEFAULT_FP8_BLOCK

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, where: str) -> QuantizationScheme:
        if not config:
            return cls()
        if not isinstance(config, Mapping):
            raise ConfigError(f"{where}: quantization_config must be a JSON object")
        method = config.get("quant_method")
        if method == "fp8":
            if config.get("fmt", "e4m3") not in ("e4m3", "float8_e4m3fn"):
                raise ConfigError(f"{where}: quantization_config.fmt {config.get('fmt')!r} is not supported (e4m3 is)")
            raw_block = config.get("weight_block_size")
            block = _block_pair(raw_block, where, "weight_block_size") if raw_block else DEFAULT_FP8_BLOCK
            return cls("fp8", block)
        if method == "compressed-tensors":
            return cls("compressed-tensors", _compressed_tensors_block(config, where))
        raise ConfigError(
            f"{where}: quantization_config.quant_method {method!r} is not supported (fp8 and compressed-tensors are)"
        )

    def scale_suffixes(self) -> tuple[str, ...]:
        """Companion-scale names to try, the method's own convention first."""
        return tuple(reversed(SCALE_SUFFIXES)) if self.method == "compressed-tensors" else SCALE_SUFFIXES


def _read_quantization_config(config_path: Path) -> Mapping[str, Any] | None:
    """config.json's quantization_config (or legacy compression_config), if the file exists."""
    if not config_path.is_file():
        return None
    config = load_json(config_path)
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: top level is not a JSON object")
    return config.get("quantization_config") or config.get("compression_config")


# --------------------------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Which files make up a checkpoint; `weight_map` only when an index names them."""

    where: Path  # what error messages call the checkpoint: the index, the single file, or the directory
    files: tuple[Path, ...]
    weight_map: Mapping[str, Path] | None
    holders: Mapping[Path, Sequence[str]] | None = None  # the index's tensors per file, for error messages

    def holder_text(self, file: Path) -> str:
        """'tensor X and N more', naming what the index says `file` holds ('' without an index)."""
        names = (self.holders or {}).get(file) or ()
        if not names:
            return ""
        return f"tensor {names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")

    def header_context(self, file: Path) -> str:
        """Suffix for file-level header errors, so they name a tensor even when the header is garbage."""
        holders = self.holder_text(file)
        return f" (per {self.where.name} it holds {holders})" if holders else ""


def inside_name(name: str) -> bool:
    """Whether a file name from a checkpoint's own metadata (an index, a manifest) stays inside its
    directory: relative, with no `..` part. Checked lexically, not by resolving, because the Hugging Face
    cache keeps shards as symlinks into a blob store outside the snapshot directory."""
    p = PurePosixPath(name.replace("\\", "/"))
    return bool(p.parts) and not p.is_absolute() and ".." not in p.parts and ":" not in p.parts[0]


def _read_index(index: Path) -> _Layout:
    data = load_json(index, CheckpointError, "malformed index JSON")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: malformed index: 'weight_map' must map tensor names to shard file names")
    if not weight_map:
        raise CheckpointError(f"{index}: malformed index: 'weight_map' lists no tensors")
    outside = sorted(shard for shard in set(weight_map.values()) if not inside_name(shard))
    if outside:
        raise CheckpointError(f"{index}: shard path {outside[0]!r} leaves the model directory; refusing to read it")
    shard_paths = {shard: index.parent / shard for shard in set(weight_map.values())}
    resolved = {name: shard_paths[shard] for name, shard in weight_map.items()}
    holders: dict[Path, list[str]] = {}
    for name, file in resolved.items():
        holders.setdefault(file, []).append(name)
    layout = _Layout(index, tuple(holders), resolved, holders)
    for file in layout.files:
        if not file.is_file():
            what = "is not a file" if file.exists() else "is missing"
            raise CheckpointError(f"{index}: shard {file} {what} (it should hold {layout.holder_text(file)})")
    return layout


def _find_layout(path: Path) -> _Layout:
    """Resolve a user path to files, preferring model.safetensors, then the index, as Hugging Face does."""
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint path does not exist")
    if path.is_file():
        return _read_index(path) if path.suffix == ".json" else _Layout(path, (path,), None)
    if (path / SINGLE_FILE_NAME).is_file():
        return _Layout(path / SINGLE_FILE_NAME, (path / SINGLE_FILE_NAME,), None)
    if (path / INDEX_FILE_NAME).is_file():
        return _read_index(path / INDEX_FILE_NAME)
    files = tuple(sorted(p for p in path.glob("*.safetensors") if p.is_file()))
    if not files:
        raise CheckpointError(f"{path}: no {SINGLE_FILE_NAME}, {INDEX_FILE_NAME} or *.safetensors files")
    return _Layout(path, files, None)


def _collect_entries(layout: _Layout) -> dict[str, HeaderEntry]:
    """All stored tensors by name: the index's view when there is one, else the union of the files."""
    headers = {file: read_safetensors_header(file, layout.header_context(file)) for file in layout.files}
    if layout.weight_map is not None:
        entries: dict[str, HeaderEntry] = {}
        for name, file in layout.weight_map.items():
            entry = headers[file].entries.get(name)
            if entry is None:
                raise CheckpointError(f"tensor {name} in {file}: listed in {layout.where.name} but not in the file's header")
            entries[name] = entry
        return entries
    entries = {}
    for header in headers.values():
        for name, entry in header.entries.items():
            if name in entries:
                raise CheckpointError(f"tensor {name} appears in both {entries[name].file} and {entry.file}")
            entries[name] = entry
    return entries


# --------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scaled:
    """A quantized weight's companion scale and how it spreads over the weight."""

    scale: HeaderEntry
    layout: ScaleLayout


class SafetensorsSource(MappedSource):
    """A Hugging Face safetensors checkpoint: one file, an indexed set of shards, or a directory of files.

    Opening parses every header (and the index) and validates it, so a truncated download or a bad
    index fails here, naming the file and tensor. Tensor data is memory-mapped read-only, one mapping
    per file, created on first `get`. Scaled fp8 weights come back dequantized; their scale tensors
    (and every other `*_scale` / `*_scale_inv` of a quantized checkpoint) are hidden from `names`.
    """

    def __init__(
        self,
        path: str | Path,
        quantization_config: Mapping[str, Any] | None = None,
        *,
        dequant_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self._layout = _find_layout(Path(path))
        root = self._layout.where if self._layout.where.is_dir() else self._layout.where.parent
        if quantization_config is None:
            config_path = root / "config.json"
            self.scheme = QuantizationScheme.from_config(_read_quantization_config(config_path), str(config_path))
        else:
            self.scheme = QuantizationScheme.from_config(quantization_config, "quantization_config")
        self.dequant_dtype = dequant_dtype
        self._entries = _collect_entries(self._layout)
        self._scaled = self._pair_scales()
        quantized = self.scheme.method is not None or bool(self._scaled)
        self._infos = {
            name: self._make_info(self._entries[name])
            for name in sorted(self._entries)
            if not (quantized and name.endswith(SCALE_SUFFIXES))
        }
        self._maps = self._mapped = FileMaps(f"{self._layout.where}: TensorSource")
        self._where = self._layout.where

    # -- opening ---------------------------------------------------------------------------

    def _pair_scales(self) -> dict[str, _Scaled]:
        """Find each fp8 tensor's scale and check its shape fits, all from headers."""
        scaled: dict[str, _Scaled] = {}
        for name, entry in self._entries.items():
            if entry.dtype not in FP8_DTYPES:
                continue
            scale = next((self._entries[name + s] for s in self.scheme.scale_suffixes() if name + s in self._entries), None)
            if scale is None:
                continue  # reported by `get`, so the rest of the checkpoint stays listable
            layout = scale_layout(entry.shape, scale.shape, self.scheme.block)
            if layout is None:
                raise CheckpointError(
                    f"tensor {scale.name} in {scale.file} has shape {shape_str(scale.shape)}, which fits neither "
                    f"per-tensor, per-channel nor {shape_str(self.scheme.block)}-block scaling of "
                    f"{name} {shape_str(entry.shape)}"
                )
            scaled[name] = _Scaled(scale, layout)
        return scaled

    def _make_info(self, entry: HeaderEntry) -> TensorInfo:
        scaled = self._scaled.get(entry.name)
        return TensorInfo(
            name=entry.name,
            shape=entry.shape,
            dtype=self.dequant_dtype if scaled else entry.dtype,
            file=entry.file,
            offsets=(entry.begin, entry.end),
            stored_dtype=entry.dtype,
            scale=scaled.scale.name if scaled else None,
        )

    # -- listing ---------------------------------------------------------------------------

    @property
    def files(self) -> list[Path]:
        """The weight files backing this checkpoint, in index (or sorted) order."""
        return list(self._layout.files)

    def raw_names(self) -> list[str]:
        """Every stored tensor, scale tensors included."""
        return sorted(self._entries)

    def info(self, name: str) -> TensorInfo:
        info = self._infos.get(name)
        if info is not None:
            return info
        if name in self._entries:
            raise CheckpointError(
                f"tensor {name} in {self._entries[name].file} is a quantization scale, applied by get() of its weight; "
                "use raw() to read it"
            )
        raise missing_tensor_error(name, self._infos, self._layout.where)

    # -- reading ---------------------------------------------------------------------------

    def get(
        self, name: str, dtype: torch.dtype | None = None, expected_shape: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """The tensor, dequantized if it is a scaled fp8 weight, as `dtype` (default: `info(name).dtype`).

        Without a dtype change the result is a read-only view of the mapped file: clone before writing.
        """
        info = self.info(name)
        check_expected_shape(info, expected_shape)
        entry = self._entries[name]
        scaled = self._scaled.get(name)
        if scaled is not None:
            return dequantize_scaled(
                self._view(entry), self._view(scaled.scale), scaled.layout, dtype or self.dequant_dtype
            )
        if entry.dtype in FP8_DTYPES:
            raise CheckpointError(
                f"tensor {name} in {entry.file} is {entry.dtype} but has no scale tensor "
                f"({' or '.join(name + s for s in self.scheme.scale_suffixes())}); use raw() for the raw bytes"
            )
        tensor = self._view(entry)
        if dtype is not None and dtype.is_floating_point:
            check_float(info)
        return tensor if dtype is None or dtype == tensor.dtype else tensor.to(dtype)

    def raw(self, name: str) -> torch.Tensor:
        """Any stored tensor (scales included) exactly as stored, as a read-only view of the file."""
        entry = self._entries.get(name)
        if entry is None:
            raise missing_tensor_error(name, self._entries, self._layout.where)
        return self._view(entry)

    def _view(self, entry: HeaderEntry) -> torch.Tensor:
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        try:
            # the file's one mapping, shared by every tensor from it (see localglm.checkpoint.mmap: never rewrite it while open)
            mapped = self._maps.get(entry.file)
        except (OSError, ValueError) as exc:  # deleted or emptied since open
            raise CheckpointError(f"tensor {entry.name} in {entry.file}: cannot map the file ({exc})") from exc
        if len(mapped) < entry.end:
            raise CheckpointError(
                f"tensor {entry.name} in {entry.file}: file shrank to {len(mapped)} bytes since open (needs {entry.end})"
            )
        if entry.begin % entry.dtype.itemsize == 0:
            flat = view(mapped, entry.dtype, entry.nbytes // entry.dtype.itemsize, entry.begin)
        else:  # misaligned data (not written by safetensors): copy into an aligned buffer
            flat = view(mapped, torch.uint8, entry.nbytes, entry.begin).clone().view(entry.dtype)
        return flat.reshape(entry.shape)

    def __repr__(self) -> str:
        return f"SafetensorsSource({str(self._layout.where)!r}, {len(self._infos)} tensors, {len(self._layout.files)} files)"
