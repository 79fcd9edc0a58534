"""Read-only file mappings for checkpoint readers (safetensors shards, GGUF parts).

A reader maps each file once, on first use, and hands out tensors that view the mapping without
copying. The mappings are never `mmap.close()`d: tensors already handed out keep pointing into
them, and a mapping lives as long as they do. Truncating a file while tensors from it are alive
makes the OS kill the process (SIGBUS) on access, which Python cannot catch: checkpoints must not
be rewritten in place while open.
"""

from __future__ import annotations

import mmap
import threading
import warnings
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch  # imported by `view`: reading a GGUF's metadata (inspect, plan) needs none


class FileMaps:
    """One read-only mapping per file, shared by every tensor from that file; thread-safe."""

    def __init__(self, owner: str) -> None:
        self._owner = owner  # names the reader in the error for use after close()
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._closed = False

    def get(self, file: Path) -> mmap.mmap:
        """The file's mapping, created on first use.

        OSError or ValueError when the file cannot be mapped (deleted, or empty); RuntimeError after `close`.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._owner} used after close()")
            mapped = self._maps.get(file)
            if mapped is None:
                with file.open("rb") as f:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps[file] = mapped
            return mapped

    def release_pages(self) -> None:
        """Drop this process's hold on mapped pages read so far; they stay in the OS page cache.

        Every touched page of a file mapping counts in RSS until released. The mappings are
        read-only and file-backed, so a tensor still viewing them simply faults its pages back in.
        """
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        with self._lock:
            for mapped in self._maps.values():
                mapped.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Drop the mappings (never `mmap.close()`: live tensors still point into them); `get` fails after this."""
        with self._lock:
            self._closed = True
            self._maps.clear()


class Mapped:
    """The lifetime every checkpoint reader shares: `release_pages`, `close` and `with`, delegated to
    `_mapped` (its FileMaps, or the reader it wraps)."""

    _mapped: Any  # has release_pages() and close()

    def release_pages(self) -> None:
        """Drop this process's hold on mapped pages read so far; they stay in the OS page cache.

        Loading copies weights out of the mapping, and every touched page of a file mapping counts in
        RSS until released, so without this a load peaks at twice the model size. The mappings are
        read-only and file-backed, so a tensor still viewing them simply faults its pages back in.
        """
        self._mapped.release_pages()

    def close(self) -> None:
        """Drop the mappings. Tensors already returned keep their file mapped until they are freed."""
        self._mapped.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def view(mapped: mmap.mmap, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    """`count` items of `dtype` at byte `offset` of a read-only mapping, as a 1-d tensor viewing it (no copy).

    The view is read-only by design; torch's warning that the buffer is not writable is silenced.
    """
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return torch.frombuffer(mapped, dtype=dtype, count=count, offset=offset)
