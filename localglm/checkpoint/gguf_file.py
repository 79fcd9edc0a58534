"""Read GGUF files (llama.cpp's format): metadata, tensor table, raw bytes, dequantized tensors.

Generic: nothing here knows which model a file holds. A checkpoint is one `.gguf` file or a split
set `NAME-00001-of-0000N.gguf` (as `gguf-split` and the converter's `--split-max-size` write
them); `GGUFModelFiles` opens every part and presents one tensor table.

Why a parser of our own rather than `gguf.GGUFReader`: every read is bounds-checked, so a
truncated or corrupt download fails at open with one line naming the file and the field or
tensor, instead of a numpy error deep inside a read. Headers are parsed once; tensor data is
memory-mapped read-only and dequantized per tensor (or per slice of the outermost dimension, so
one expert of a stacked `[E, out, in]` tensor costs one expert). Dequantization of the quantized
types goes through `gguf.quants.dequantize` (numpy).
"""

from __future__ import annotations

import functools
import math
import mmap
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from ..errors import CheckpointError

from .mmap import FileMaps, Mapped, view

if TYPE_CHECKING:
    import torch  # imported where tensors are read: metadata alone (inspect, plan) needs none

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_NAME = "{stem}-{no:05d}-of-{count:05d}.gguf"

# Stored types returned without dequantization, and the torch dtype they are (`PLAIN_TYPES`, made on first use).
_PLAIN_NAMES = {GGMLQuantizationType.F32: "float32", GGMLQuantizationType.F16: "float16", GGMLQuantizationType.BF16: "bfloat16"}


@functools.cache
def plain_types() -> dict[GGMLQuantizationType, torch.dtype]:
    """{ggml type: torch dtype} of the stored types read without dequantization."""
    import torch

    return {t: getattr(torch, n) for t, n in _PLAIN_NAMES.items()}


def __getattr__(name: str) -> Any:
    """PLAIN_TYPES, as the module always offered it, built on first use (it needs torch)."""
    if name != "PLAIN_TYPES":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return plain_types()


# Types `gguf.quants.dequantize` handles (checked against gguf 0.19).
DEQUANT_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    getattr(GGMLQuantizationType, n)
    for n in (
        "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
        "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
        "TQ1_0", "TQ2_0", "MXFP4",
    )
    if hasattr(GGMLQuantizationType, n)
)  # fmt: skip
SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_PLAIN_NAMES) | DEQUANT_TYPES

# GGUF metadata value types (gguf spec).
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 8
_MAX_NESTING = 8


def type_name(t: int | GGMLQuantizationType) -> str:
    try:
        return GGMLQuantizationType(t).name
    except ValueError:
        return f"unknown type {int(t)}"


def tensor_nbytes(shape: Iterable[int], ggml_type: GGMLQuantizationType) -> int:
    """Bytes of a tensor of `shape` (outermost first) stored as `ggml_type`."""
    block, size = GGML_QUANT_SIZES[ggml_type]
    return math.prod(shape) // block * size


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file; `shape` is in torch order (outermost first, the reverse of ggml's ne)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    file: Path
    offset: int  # absolute byte position in `file`
    nbytes: int

    @property
    def type_name(self) -> str:
        return self.ggml_type.name


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every overrun names the file and what was read."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(
                f"{self.path}: truncated or corrupt GGUF ({what} at byte {self.pos} needs {n} bytes, "
                f"file has {self.size})"
            )

    def scalar(self, vtype: int, what: str) -> Any:
        fmt = _SCALAR[vtype]
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: corrupt GGUF ({what} at byte {self.pos - n} is not UTF-8)") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR:
            return self.scalar(vtype, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.u32(f"element type of {what}")
            count = self.u64(f"length of {what}")
            if etype in _NP_SCALAR:
                dt = np.dtype(_NP_SCALAR[etype])
                self.need(count * dt.itemsize, what)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
                self.pos += count * dt.itemsize
                return arr.astype(bool).tolist() if etype == 7 else arr.tolist()
            if etype == _STRING:
                self.need(count * 8, what)  # each string needs at least its length field
                return [self.string(f"{what}[{i}]") for i in range(count)]
            if etype == _ARRAY:
                if depth >= _MAX_NESTING:  # llama.cpp reads no nested arrays at all; a deep nest is an attack on the stack
                    raise CheckpointError(f"{self.path}: corrupt GGUF ({what} nests arrays more than {_MAX_NESTING} deep)")
                return [self.value(_ARRAY, f"{what}[{i}]", depth + 1) for i in range(count)]
            raise CheckpointError(f"{self.path}: corrupt GGUF ({what} has unknown element type {etype})")
        raise CheckpointError(f"{self.path}: corrupt GGUF ({what} has unknown value type {vtype})")


class GGUFFile:
    """The header of one GGUF file: version, metadata, tensor table. Opening validates everything."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with self.path.open("rb") as f:
                self.file_size = f.seek(0, 2)
                if self.file_size < 4:
                    raise CheckpointError(f"{self.path}: not a GGUF file ({self.file_size} bytes)")
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        try:
            self._parse(buf)
        finally:
            buf.close()

    def _parse(self, buf: mmap.mmap) -> None:
        if buf[:4] != GGUF_MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')")
        cur = _Cursor(buf, self.path)
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in (2, 3):
            swapped = int.from_bytes(self.version.to_bytes(4, "little"), "big")
            hint = " (a big-endian file, which is not supported)" if swapped in (2, 3) else ""
            raise CheckpointError(f"{self.path}: GGUF version {self.version} is not supported{hint}; versions 2 and 3 are")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.u32(f"type of metadata {key}")
            self.metadata[key] = cur.value(vtype, f"metadata {key}")
        raw_infos = []
        for i in range(n_tensors):
            name = cur.string(f"name of tensor #{i}")
            n_dims = cur.u32(f"dimension count of tensor {name}")
            if not 0 < n_dims <= _MAX_DIMS:
                raise CheckpointError(f"{self.path}: corrupt GGUF (tensor {name} has {n_dims} dimensions)")
            ne = [cur.u64(f"shape of tensor {name}") for _ in range(n_dims)]
            gtype = cur.u32(f"type of tensor {name}")
            offset = cur.u64(f"offset of tensor {name}")
            raw_infos.append((name, ne, gtype, offset))
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise CheckpointError(f"{self.path}: corrupt GGUF (general.alignment {align!r} is not a power of two)")
        self.alignment = align
        self.data_offset = -(-cur.pos // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, ne, gtype, offset in raw_infos:
            if name in self.tensors:  # llama.cpp refuses the file too; a dict would keep the later one silently
                raise CheckpointError(f"{self.path}: corrupt GGUF (tensor {name} appears twice in the tensor table)")
            self.tensors[name] = self._tensor(name, ne, gtype, offset)
        # Each tensor's bytes are its own (llama.cpp goes further: offsets must follow the table exactly).
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values() if t.nbytes)
        for (_, end, before), (begin, _, name) in zip(spans, spans[1:]):
            if begin < end:
                raise CheckpointError(
                    f"{self.path}: corrupt GGUF (tensor {name} starts at byte {begin}, inside tensor {before}, which ends at {end})"
                )

    def _tensor(self, name: str, ne: list[int], gtype: int, offset: int) -> GGUFTensor:
        shape = tuple(reversed(ne))
        try:
            qtype = GGMLQuantizationType(gtype)
            block, size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise CheckpointError(
                f"{self.path}: tensor {name} has {type_name(gtype)}, which this gguf package does not know"
            ) from None
        if ne[0] % block:
            raise CheckpointError(
                f"{self.path}: corrupt GGUF (tensor {name} row length {ne[0]} is not a multiple of the "
                f"{qtype.name} block of {block})"
            )
        nbytes = math.prod(ne) // block * size
        begin = self.data_offset + offset
        if offset % self.alignment:
            raise CheckpointError(f"{self.path}: corrupt GGUF (tensor {name} offset {offset} is not {self.alignment}-aligned)")
        if begin + nbytes > self.file_size:
            raise CheckpointError(
                f"{self.path}: truncated GGUF (tensor {name} needs bytes up to {begin + nbytes}, "
                f"the file has {self.file_size})"
            )
        return GGUFTensor(name, shape, qtype, self.path, begin, nbytes)


def split_part_paths(path: Path) -> list[Path] | None:
    """All part names of a split set, from any one part's name (None when the name is not a split name)."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return None
    count = int(m["count"])
    return [path.with_name(SPLIT_NAME.format(stem=m["stem"], no=i, count=count)) for i in range(1, count + 1)]


class GGUFModelFiles(Mapped):
    """One GGUF checkpoint: a single file or every part of a split set, as one tensor table.

    `metadata` is the first part's (the others carry only the split keys). Tensor data is mapped
    read-only on first use; `tensor` returns a read-only view for F32/F16/BF16 without a dtype
    change (clone before writing) and a fresh tensor otherwise.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{path}: no such GGUF file")
        first = GGUFFile(path)
        count = first.metadata.get("split.count", 1)
        parts = split_part_paths(path)
        if isinstance(count, int) and count > 1:
            if parts is None or len(parts) != count:
                raise CheckpointError(
                    f"{path}: split.count is {count}, but the file name is not NAME-0000i-of-{count:05d}.gguf, "
                    "so the other parts cannot be found"
                )
            for part in parts:
                if not part.is_file():
                    raise CheckpointError(f"{path}: split GGUF part {part.name} is missing (expected {count} parts)")
            files = [first if p == path else GGUFFile(p) for p in parts]
        else:
            files = [first]
        self.where = files[0].path
        self.files = files
        self.metadata: dict[str, Any] = files[0].metadata
        self.tensors: dict[str, GGUFTensor] = {}
        for i, f in enumerate(files):
            no = f.metadata.get("split.no", 0)
            if len(files) > 1 and no != i:
                raise CheckpointError(f"{f.path}: split.no is {no}, expected {i} for this part")
            for name, t in f.tensors.items():
                if name in self.tensors:
                    raise CheckpointError(f"{f.path}: tensor {name} also appears in {self.tensors[name].file}")
                self.tensors[name] = t
        expected = files[0].metadata.get("split.tensors.count")
        if len(files) > 1 and isinstance(expected, int) and expected != len(self.tensors):
            raise CheckpointError(
                f"{self.where}: split.tensors.count says {expected} tensors, the {len(files)} parts hold {len(self.tensors)}"
            )
        self._maps = self._mapped = FileMaps(f"{self.where}: GGUF")

    # -- raw access ---------------------------------------------------------------------------

    def _mapping(self, file: Path) -> mmap.mmap:
        try:
            return self._maps.get(file)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{file}: cannot map the file ({exc})") from None

    def _span(self, name: str, index: int | None) -> tuple[GGUFTensor, mmap.mmap, int, int]:
        t = self.tensors[name]
        begin, nbytes = t.offset, t.nbytes
        if index is not None:
            if not 0 <= index < t.shape[0]:
                raise IndexError(f"{name}: index {index} out of range for {t.shape[0]} slices")
            nbytes //= t.shape[0]
            begin += index * nbytes
        mapped = self._mapping(t.file)
        if len(mapped) < begin + nbytes:
            raise CheckpointError(f"{t.file}: file shrank since open (tensor {name} needs bytes up to {begin + nbytes})")
        return t, mapped, begin, nbytes

    def raw(self, name: str, index: int | None = None) -> np.ndarray:
        """The stored bytes of a tensor (or of slice `index` of its outermost dimension), read-only uint8."""
        _, mapped, begin, nbytes = self._span(name, index)
        return np.frombuffer(mapped, dtype=np.uint8, count=nbytes, offset=begin)

    def tensor(self, name: str, dtype: torch.dtype | None = None, index: int | None = None) -> torch.Tensor:
        """Tensor `name` (or its slice `index` along the outermost dimension), dequantized to `dtype`.

        `dtype` None means the stored dtype for F32/F16/BF16 (a zero-copy view) and float32 otherwise.
        """
        import torch

        t, mapped, begin, nbytes = self._span(name, index)
        shape = t.shape[1:] if index is not None else t.shape
        plain = plain_types().get(t.ggml_type)
        if plain is not None:
            if nbytes == 0:
                return torch.empty(shape, dtype=dtype or plain)
            out = view(mapped, plain, nbytes // plain.itemsize, begin).reshape(shape)
            return out if dtype is None or dtype == plain else out.to(dtype)
        if t.ggml_type not in DEQUANT_TYPES:
            raise CheckpointError(
                f"{t.file}: tensor {name} is stored as {t.type_name}, which localglm cannot dequantize "
                f"(supported: {', '.join(sorted(type_name(x) for x in SUPPORTED_TYPES))})"
            )
        block, size = GGML_QUANT_SIZES[t.ggml_type]
        raw = np.frombuffer(mapped, dtype=np.uint8, count=nbytes, offset=begin)
        values = gguf_quants.dequantize(raw.reshape(-1, shape[-1] // block * size), t.ggml_type)
        out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
        return out if dtype is None or dtype == torch.float32 else out.to(dtype)

    def __repr__(self) -> str:
        return f"GGUFModelFiles({str(self.where)!r}, {len(self.tensors)} tensors, {len(self.files)} files)"
