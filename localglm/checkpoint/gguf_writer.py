"""Write GGUF files one tensor chunk at a time (generic: no model knowledge here).

`gguf.GGUFWriter` packs the header, the metadata and the tensor table; this module plans every
tensor up front (name, shape, ggml type: the byte sizes follow), then streams each tensor's data
from a producer of float row-chunks, converting or quantizing chunk by chunk, so the largest
thing ever in memory is one chunk, never a whole tensor or model. A stacked expert tensor
`[E, out, in]` is just E chunks of `[out, in]` in a row: GGUF blocks never cross a row.

The file (or the split set `OUT-0000i-of-0000N.gguf`) is written under temporary names in the
output folder and renamed at the end, so an interrupted export never leaves a file that looks
complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf import quants as gguf_quants

from .gguf_file import SPLIT_NAME, tensor_nbytes

F32, F16, BF16 = GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16
# Types this writer can produce (the gguf package quantizes these in numpy).
WRITABLE_TYPES = frozenset(
    {F32, F16, BF16, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
     GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1}
)  # fmt: skip

# (done_bytes, total_bytes, tensor_name) -> None
WriteProgress = Callable[[int, int, str], None]
Chunks = Callable[[], Iterable["torch.Tensor | np.ndarray"]]


def fits_type(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> bool:
    """Whether rows of this shape split into whole blocks of `ggml_type`."""
    return bool(shape) and shape[-1] % GGML_QUANT_SIZES[ggml_type][0] == 0


def encode(chunk: torch.Tensor | np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """Float rows -> the bytes GGUF stores for `ggml_type` (numpy array, C order)."""
    if isinstance(chunk, torch.Tensor):
        if ggml_type == BF16:  # torch rounds to nearest even, as gguf's numpy bf16 does
            return chunk.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        chunk = chunk.detach().float().contiguous().numpy()
    arr = np.ascontiguousarray(chunk, dtype=np.float32)
    if ggml_type == F32:
        return arr
    if ggml_type == F16:
        return arr.astype(np.float16)
    return gguf_quants.quantize(arr, ggml_type)


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # torch order
    ggml_type: GGMLQuantizationType
    chunks: Chunks  # float row-chunks whose concatenation (flattened) is the tensor, in order

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.ggml_type)


class GGUFStreamWriter:
    """Plan tensors and metadata, then `write()` them to `path` (or split parts) atomically.

    Metadata goes through `self.meta`, a `gguf.GGUFWriter` (its `add_*` methods). Tensors are
    added with `add_tensor`; `write` streams them in the order added.
    """

    def __init__(self, path: str | Path, arch: str, *, split_max_size: int = 0, split_max_tensors: int = 0) -> None:
        self.path = Path(path)
        self._tmp_stem = f".{self.path.stem}.tmp-{os.getpid()}"
        self.meta = GGUFWriter(
            self.path.with_name(self._tmp_stem + ".gguf"), arch,
            split_max_size=split_max_size, split_max_tensors=split_max_tensors,
        )  # fmt: skip
        self._planned: list[PlannedTensor] = []

    def add_tensor(self, name: str, shape: tuple[int, ...], ggml_type: GGMLQuantizationType, chunks: Chunks) -> None:
        if ggml_type not in WRITABLE_TYPES:
            raise ValueError(f"{name}: cannot write {ggml_type.name}")
        if not fits_type(shape, ggml_type) and ggml_type not in (F32, F16, BF16):
            raise ValueError(f"{name}: rows of {shape[-1]} do not fit {ggml_type.name} blocks")
        planned = PlannedTensor(name, tuple(shape), ggml_type, chunks)
        self._planned.append(planned)
        # gguf wants numpy-order shapes of the *stored* array; give it the element shape and raw type
        self.meta.add_tensor_info(name, planned.shape, np.dtype(np.float32), planned.nbytes, raw_dtype=ggml_type)

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self._planned)

    def parameter_counts(self) -> tuple[int, int, int, int]:
        """(total, shared, expert, expert_count) as `gguf.size_label` wants them."""
        return self.meta.get_total_parameter_count()

    def final_paths(self) -> list[Path]:
        n = len(self.meta.tensors)
        if n == 1:
            return [self.path]
        return [self.path.with_name(SPLIT_NAME.format(stem=self.path.stem, no=i + 1, count=n)) for i in range(n)]

    def write(self, progress: WriteProgress | None = None) -> list[Path]:
        """Write every part under a temporary name, then rename; returns the final paths."""
        assert self.meta.path is not None
        tmp_paths = self.meta.format_shard_names(self.meta.path)
        finals = self.final_paths()
        total, done = self.total_bytes, 0
        try:
            self.meta.write_header_to_file()
            self.meta.write_kv_data_to_file()
            self.meta.write_ti_data_to_file()
            assert self.meta.fout is not None
            outs = self.meta.fout
            # tensor table per part, in order: the planned tensors fill the parts front to back
            part_of = {name: i for i, part in enumerate(self.meta.tensors) for name in part}
            for fout in outs:
                _pad(fout, fout.tell(), self.meta.data_alignment)
            for planned in self._planned:
                fout = outs[part_of[planned.name]]
                written = 0
                for piece in _encoded(planned):
                    piece.tofile(fout)
                    written += piece.nbytes
                    done += piece.nbytes
                    if progress:
                        progress(done, total, planned.name)
                if written != planned.nbytes:
                    raise RuntimeError(f"{planned.name}: produced {written} bytes, planned {planned.nbytes}")
                _pad(fout, written, self.meta.data_alignment)
            self.meta.close()
            for tmp, final in zip(tmp_paths, finals, strict=True):
                os.replace(tmp, final)
        except BaseException:
            try:
                self.meta.close()
            except OSError:
                pass  # flushing onto the full disk fails again; the parts are removed below either way
            for tmp in tmp_paths:
                Path(tmp).unlink(missing_ok=True)
            raise
        return finals


def _encoded(planned: PlannedTensor) -> Iterator[np.ndarray]:
    row = planned.shape[-1] if planned.shape else 1
    for chunk in planned.chunks():
        if chunk.shape[-1] != row:
            raise RuntimeError(f"{planned.name}: chunk rows of {chunk.shape[-1]}, expected {row}")
        yield encode(chunk, planned.ggml_type)


def _pad(fout: Any, n: int, align: int) -> None:
    pad = -n % align
    if pad:
        fout.write(b"\0" * pad)
