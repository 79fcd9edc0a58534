"""The safetensors file format without the safetensors reader, the sharded writer, and FP8 block math.

Why our own header parser: listing hundreds of GB of shards must touch only the few kilobytes of
JSON at the head of each file, and every defect (short file, bad JSON, offsets past the end)
must become one `CheckpointError` line naming the file and the tensor, not a Rust panic.
Writing goes through `safetensors.torch.save_file`, so the files we make are the reference format.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"
SHARD_NAME_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# The safetensors library refuses headers above 100 MB; so do we, before allocating.
MAX_HEADER_BYTES = 100_000_000
FP8_E4M3_MAX = 448.0
DEFAULT_FP8_BLOCK = (128, 128)


def _optional_dtypes() -> dict[str, torch.dtype]:
    """Dtypes that only newer torch builds have; absent ones stay unsupported instead of failing import."""
    found: dict[str, torch.dtype] = {}
    for code, attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu")):
        dtype = getattr(torch, attr, None)
        if isinstance(dtype, torch.dtype):
            found[code] = dtype
    return found


# safetensors dtype code -> torch dtype. Immutable after import (a plain dict read by lookups only).
SAFETENSORS_DTYPES: Mapping[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    **_optional_dtypes(),
}
FP8_DTYPES: frozenset[torch.dtype] = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})


def shape_str(shape: Sequence[int]) -> str:
    """Render a shape as `(a, b)` (also for 1-d and 0-d) so messages read the same everywhere."""
    return "(" + ", ".join(str(d) for d in shape) + ")"


# --------------------------------------------------------------------------------------------
# Header parsing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the header describes it; offsets are absolute byte positions in the file."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """Everything a reader needs about one file, obtained without reading tensor data."""

    path: Path
    file_size: int
    data_start: int
    entries: Mapping[str, HeaderEntry]
    metadata: Mapping[str, str] = field(default_factory=dict)


def _header_fail(path: Path, problem: str, context: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}{context}")


def _parse_entry(path: Path, name: str, raw: object, data_start: int) -> HeaderEntry:
    """Validate one header record; errors name the file and this tensor."""

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"tensor {name} in {path}: {problem}")

    if not isinstance(raw, dict):
        raise bad("header entry is not a JSON object")
    code = raw.get("dtype")
    dtype = SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        supported = ", ".join(SAFETENSORS_DTYPES)
        raise bad(f"unsupported dtype {code!r} (supported: {supported})")
    shape = raw.get("shape")
    # `type(x) is int` also rejects bools; this loop runs once per tensor (~100k for GLM-4.5), so keep it lean.
    if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape):
        raise bad(f"malformed shape {shape!r}")
    offsets = raw.get("data_offsets")
    if type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int or type(offsets[1]) is not int:
        raise bad(f"malformed data_offsets {offsets!r}")
    if not 0 <= offsets[0] <= offsets[1]:
        raise bad(f"malformed data_offsets {offsets!r}")
    expected = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise bad(
            f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but {code} {shape_str(shape)} needs {expected}"
        )
    return HeaderEntry(name, path, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_no_overlap(path: Path, entries: Mapping[str, HeaderEntry]) -> None:
    """Refuse tensors whose data ranges overlap, as the safetensors library does: writing one through a
    shared mapping (or quantizing it) would silently change the other."""
    spans = sorted((e.begin, e.end, e.name) for e in entries.values() if e.end > e.begin)
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"tensor {other} in {path}: its data_offsets overlap those of tensor {name} (a corrupt or crafted header)")


def read_safetensors_header(path: Path, context: str = "") -> SafetensorsHeader:
    """Parse and validate the header of one safetensors file, reading only the header bytes.

    `context` is appended to file-level errors (e.g. " (per the index it holds tensor X)") so a
    message can name a tensor even when the header itself is unreadable. A tensor whose data range
    runs past the end of the file (a truncated download) is reported here, at open, not at first use.
    """
    try:
        file_size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _header_fail(path, f"header unreadable: file is {file_size} bytes, shorter than the 8-byte length prefix", context)
            header_len = int.from_bytes(prefix, "little")
            if header_len > file_size - 8:
                raise _header_fail(path, f"header length {header_len} is beyond the file size {file_size}", context)
            if header_len > MAX_HEADER_BYTES:
                raise _header_fail(path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit", context)
            raw_header = f.read(header_len)
    except OSError as exc:
        raise _header_fail(path, f"cannot read file ({exc.strerror or exc})", context) from exc
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _header_fail(path, f"header unreadable: not valid JSON ({exc})", context) from exc
    except RecursionError:
        raise _header_fail(path, "header unreadable: JSON nested too deeply", context) from None
    if not isinstance(header, dict):
        raise _header_fail(path, "header unreadable: JSON is not an object", context)

    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _header_fail(path, "header __metadata__ is not a JSON object", context)
    entries = {name: _parse_entry(path, name, raw, data_start) for name, raw in header.items()}

    past_end = [e for e in entries.values() if e.end > file_size]
    if past_end:
        first = min(past_end, key=lambda e: (e.begin, e.name))
        raise CheckpointError(
            f"tensor {first.name} in {path}: data ends at byte {first.end} but the file has {file_size} bytes "
            f"(truncated file; {len(past_end)} tensor(s) affected)"
        )
    _check_no_overlap(path, entries)
    return SafetensorsHeader(path, file_size, data_start, entries, {str(k): str(v) for k, v in metadata.items()})


# --------------------------------------------------------------------------------------------
# FP8 block scales
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleLayout:
    """How a scale tensor maps onto its weight: the scale reshaped to the weight's rank, and per-dim blocks."""

    scale_shape: tuple[int, ...]
    blocks: tuple[int, ...]


def scale_layout(weight_shape: Sequence[int], scale_shape: Sequence[int], block: Sequence[int]) -> ScaleLayout | None:
    """Match a scale shape to a weight shape; None if it fits no layout we know.

    One rule covers every layout GLM/DeepSeek FP8 and compressed-tensors use: a scale dim equal to
    the weight dim is per-element (block 1), a scale dim of 1 broadcasts, and otherwise it must be
    ceil(weight_dim / block) for the configured block of the last two dims. A scalar or [1] scale is
    per-tensor; a scale missing the last dim ([out] for [out, in]) is per-channel.
    """
    weight_shape, shape = tuple(weight_shape), tuple(scale_shape)
    if math.prod(shape) == 1:
        shape = (1,) * len(weight_shape)
    elif len(shape) == len(weight_shape) - 1 and shape == weight_shape[:-1]:
        shape = (*shape, 1)
    if len(shape) != len(weight_shape):
        return None
    tail = tuple(block)[-len(weight_shape):] if weight_shape else ()
    configured = (1,) * (len(weight_shape) - len(tail)) + tail
    blocks: list[int] = []
    for w_dim, s_dim, b_dim in zip(weight_shape, shape, configured):
        if s_dim == w_dim:
            blocks.append(1)
        elif s_dim == 1:
            blocks.append(w_dim)
        elif b_dim > 0 and s_dim == -(-w_dim // b_dim):
            blocks.append(b_dim)
        else:
            return None
    return ScaleLayout(shape, tuple(blocks))


def expand_scale(scale: torch.Tensor, weight_shape: Sequence[int], layout: ScaleLayout) -> torch.Tensor:
    """Repeat each scale over its block and trim the overhang, giving a tensor broadcastable to the weight."""
    expanded = scale.reshape(layout.scale_shape)
    for dim, (w_dim, b_dim) in enumerate(zip(weight_shape, layout.blocks)):
        if b_dim > 1 and expanded.shape[dim] > 1:
            expanded = expanded.repeat_interleave(b_dim, dim=dim).narrow(dim, 0, w_dim)
    return expanded


def dequantize_scaled(
    weight: torch.Tensor, scale: torch.Tensor, layout: ScaleLayout, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """fp8 (or any) weight times its expanded float32 scale, computed in float32, then cast."""
    out = weight.to(torch.float32)
    out.mul_(expand_scale(scale.to(torch.float32), out.shape, layout))
    return out if dtype == torch.float32 else out.to(dtype)


def quantize_fp8_blockwise(
    w: torch.Tensor, block: tuple[int, int] = DEFAULT_FP8_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize like the GLM/DeepSeek FP8 releases: returns (float8_e4m3fn weight, float32 scale_inv).

    scale_inv[i, j] = amax(|block i,j|) / 448 (1.0 for an all-zero block), and the weight is recovered
    as fp8.float() * scale_inv expanded over its block; edge blocks may be partial. Leading dims
    (stacked experts) are kept: scale_inv has shape [..., ceil(out/b0), ceil(in/b1)].
    """
    if w.ndim < 2:
        raise ValueError(f"quantize_fp8_blockwise needs a tensor with >= 2 dims, got shape {shape_str(w.shape)}")
    b0, b1 = block
    wf = w.detach().to(device="cpu", dtype=torch.float32)
    rows, cols = wf.shape[-2:]
    s0, s1 = -(-rows // b0), -(-cols // b1)
    padded = torch.nn.functional.pad(wf.abs(), (0, s1 * b1 - cols, 0, s0 * b0 - rows))
    amax = padded.reshape(*wf.shape[:-2], s0, b0, s1, b1).amax(dim=(-3, -1))
    scale_inv = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    layout = ScaleLayout(tuple(scale_inv.shape), (1,) * (wf.ndim - 2) + (b0, b1))
    q = (wf / expand_scale(scale_inv, wf.shape, layout)).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return q.to(torch.float8_e4m3fn), scale_inv


# --------------------------------------------------------------------------------------------
# Sharded writer
# --------------------------------------------------------------------------------------------


def _iter_items(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    return iter(tensors.items()) if isinstance(tensors, Mapping) else iter(tensors)


def fsync_path(path: Path) -> None:
    """Flush a finished file (or directory entry) to disk so a rename never publishes empty data."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # platforms that cannot open directories: the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class _ShardWriter:
    """Accumulates tensors into shard-sized groups and writes each group to a hidden temp file."""

    out_dir: Path
    max_shard_bytes: int | None
    metadata: dict[str, str]
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    pending: dict[str, torch.Tensor] = field(default_factory=dict)
    pending_bytes: int = 0
    shards: list[tuple[Path, list[str]]] = field(default_factory=list)  # (temp path, tensor names)
    seen: set[str] = field(default_factory=set)
    total_size: int = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}")
        if name in self.seen:
            raise ValueError(f"tensor {name} given twice")
        self.seen.add(name)
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        self.total_size += size
        limit = self.max_shard_bytes
        # Hugging Face's rule: a tensor bigger than a shard gets a shard of its own; otherwise start
        # a new shard when this tensor would overflow the current one.
        if limit is not None and size > limit:
            self._write({name: tensor})
            return
        if limit is not None and self.pending and self.pending_bytes + size > limit:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += size

    def flush(self) -> None:
        if self.pending or not self.shards:
            self._write(self.pending)
        self.pending, self.pending_bytes = {}, 0

    def _write(self, group: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file  # the reference writer; imported here to keep reading light

        temp = self.out_dir / f".localglm-{self.token}-{len(self.shards):05d}.tmp"
        self.shards.append((temp, list(group)))
        save_file(group, str(temp), metadata=self.metadata)
        fsync_path(temp)

    def temp_paths(self) -> list[Path]:
        return [temp for temp, _ in self.shards]


def _stale_checkpoint_files(out_dir: Path, keep: set[Path]) -> list[Path]:
    """Weight files from an earlier save that would shadow or mix with the new one."""
    candidates = [out_dir / SINGLE_FILE_NAME, out_dir / INDEX_FILE_NAME]
    candidates += [p for p in out_dir.iterdir() if SHARD_NAME_RE.match(p.name)]
    return [p for p in candidates if p not in keep and p.exists()]


def save_safetensors_sharded(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike[str],
    max_shard_bytes: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write a Hugging Face style checkpoint; returns the weight files written (plus the index, last).

    One `model.safetensors` when everything fits in one shard (always when `max_shard_bytes` is None),
    else `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`. Tensors may come from a
    generator: each shard is written as soon as it is full, so at most one shard is held in memory.
    Every file is written under a hidden temp name and renamed into place only after all of them are
    complete (index first, so a crash mid-rename leaves an index naming a missing shard, which no
    loader accepts, rather than a loadable partial set). Earlier model*.safetensors files in `out_dir`
    are removed, as Hugging Face does, so they cannot shadow the new checkpoint.
    """
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    header_meta = {"format": "pt", **(metadata or {})}
    bad_meta = [k for k, v in header_meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad_meta:
        raise ValueError(f"safetensors metadata must map str to str; bad keys: {bad_meta}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, max_shard_bytes, header_meta)
    index_temp = out / f".localglm-{writer.token}-index.tmp"
    try:
        for name, tensor in _iter_items(tensors):
            writer.add(name, tensor)
        writer.flush()
        count = len(writer.shards)
        if count == 1:
            finals = [out / SINGLE_FILE_NAME]
        else:
            finals = [out / f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        renames = list(zip(writer.temp_paths(), finals))
        if count > 1:
            weight_map = {name: final.name for (_, names), final in zip(writer.shards, finals) for name in names}
            index = {"metadata": {"total_size": writer.total_size}, "weight_map": weight_map}
            index_temp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            fsync_path(index_temp)
            renames.insert(0, (index_temp, out / INDEX_FILE_NAME))
        for stale in _stale_checkpoint_files(out, {final for _, final in renames}):
            stale.unlink()
        for temp, final in renames:
            os.replace(temp, final)
        fsync_path(out)
        return finals + ([out / INDEX_FILE_NAME] if count > 1 else [])
    finally:
        for temp in [*writer.temp_paths(), index_temp]:
            temp.unlink(missing_ok=True)
