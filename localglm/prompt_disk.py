"""Saved prompts on disk: a restarted server still has its conversations' KV caches.

An agent's system prompt and tool list are 10-30k tokens, and a prefill of that at GLM widths on a
CPU takes minutes. `PromptCache` (prompt_cache.py) keeps diverging conversations in RAM, but a
restart lost them all, and a conversation larger than the RAM budget was never kept. `PromptDisk`
is a second tier under it (`serve --cache-dir DIR`):

- what RAM lets go (least recently used beyond `--cache-ram`, or one cache larger than all of it)
  is written here on a background thread, so the request that pushed it out does not wait;
- when the server stops, the live cache and every prompt in RAM are written here;
- a prompt sharing a longer prefix with a saved file than with anything in RAM loads that file.

Files are safetensors (the main cache's rows, the token ids, the MTP block's state beside them)
under `DIR/<setup digest>/`: the setup is the model's files, config, dtype, device, processor, load
options and the code's version (`Model.setup`), since rows from any other setup are not what a
prefill here would compute. Each file is written whole to a temporary name, flushed to the disk, then
renamed; a file that cannot be read is skipped with one warning, and a temporary file a killed process
left behind is deleted once no write could still be filling it. The oldest files beyond `--cache-disk`
are deleted: they are the cache's own, in its own directory.

Several processes may share one directory (two servers of one model, or one restarted while the old
one still writes): each looks at the directory again before choosing a file and before keeping to the
budget, so it uses and counts what the others wrote, and a file another one deleted is simply gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint.safetensors import fsync_path
from .errors import LocalGLMError
from .layers.kv_cache import CacheSnapshot, longest_match, starts_with
from .speculative import DraftState

log = logging.getLogger("localglm")
FORMAT = "localglm-prompt/1"
SUFFIX = ".prompt.safetensors"
SETUP_FILE = "setup.txt"  # the setup a directory's files belong to, for people reading the cache
TMP_SUFFIX = ".tmp"
STALE_TMP_S = 3600.0  # a temporary file untouched this long is no write in progress: a killed writer's


@dataclass(frozen=True, eq=False)
class DiskPrompt:
    """One saved prompt's file and what choosing it needs (the rows stay on disk until loaded)."""

    path: Path
    tokens: tuple[int, ...]
    nbytes: int


def setup_dir(root: Path, setup: str) -> Path:
    """The directory under `root` for one model setup's files."""
    return Path(root).expanduser() / hashlib.sha1(setup.encode()).hexdigest()[:16]


class PromptDisk:
    """One setup's saved prompts on disk, oldest first, within `budget` bytes."""

    def __init__(self, root: Path, budget: int, setup: str) -> None:
        self.dir = setup_dir(root, setup)
        self.budget = budget
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            info = self.dir / SETUP_FILE
            if not info.exists():
                info.write_text(setup + "\n", encoding="utf-8")
        except OSError as exc:
            raise LocalGLMError(f"--cache-dir {root}: cannot write there ({exc.strerror or exc})") from None
        self._lock = threading.Lock()  # entries: the engine thread reads, the writer thread changes
        self.entries: list[DiskPrompt] = []
        self._skipped: set[tuple[Path, int]] = set()  # (file, mtime_ns) not used again: unreadable, or forgotten
        self._listed: int | None = None  # the directory's mtime_ns when last listed (refresh)
        self._remove_stale_temporaries()
        self.refresh()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self.loads = 0  # prompts brought back from disk
        self.writes = 0
        self.failed = 0  # files that could not be written or read
        self.refused = 0  # prompts larger than the whole budget, not written

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self.entries)

    def describe(self) -> str:
        """What is kept, for the line a command prints when it ends: "N saved prompts (X) in DIR"."""
        from .model_info import human_bytes

        with self._lock:
            n, size = len(self.entries), sum(e.nbytes for e in self.entries)
        return f"{n} saved prompts ({human_bytes(size)}) in {self.dir}"

    # ---- finding ------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Bring `entries` in line with the directory: files another process wrote join them (by age),
        files deleted there leave them. A file localglm cannot read is skipped with one warning. Nothing is
        listed while the directory's own mtime says no file came or went since the last look (a request's
        lookup stays one stat however many files there are), unless that mtime is too recent to trust on
        file systems that count it in whole seconds."""
        try:
            stamp = self.dir.stat().st_mtime_ns
        except OSError:
            stamp = None
        if stamp is not None and stamp == self._listed:
            return
        self._listed = stamp if stamp is not None and time.time_ns() - stamp > 2_000_000_000 else None
        found: list[tuple[int, Path]] = []
        for path in self.dir.glob("*" + SUFFIX):
            try:
                found.append((path.stat().st_mtime_ns, path))
            except OSError:  # deleted between the listing and now
                continue
        with self._lock:
            known = {e.path: e for e in self.entries}
        new: dict[Path, DiskPrompt] = {}
        for mtime, path in found:
            if path in known or (path, mtime) in self._skipped:
                continue
            entry = _read_header(path)
            if entry is None:
                self._skipped.add((path, mtime))
                log.warning("%s: not a saved prompt localglm can read; skipped", path)
            else:
                new[path] = entry
        on_disk = {path for _, path in found}
        order = {path: i for i, (_, path) in enumerate(sorted(found, key=lambda pair: pair[0]))}
        with self._lock:
            kept = [e for e in self.entries if e.path in on_disk or e.path.exists()]  # or written since the listing
            if new:  # merged by age: the directory's order (mtime) places what the others wrote
                have = {e.path for e in kept}  # the writer thread may have added one meanwhile
                kept = sorted([*kept, *(e for p, e in new.items() if p not in have)], key=lambda e: order.get(e.path, len(order)))
            self.entries = kept

    def _remove_stale_temporaries(self) -> None:
        """Delete temporary files a killed writer left (untouched for STALE_TMP_S: a write in progress,
        this process's or another's, keeps changing its file)."""
        now = time.time()
        for path in self.dir.glob("." + "*" + TMP_SUFFIX):
            try:
                if now - path.stat().st_mtime > STALE_TMP_S:
                    path.unlink()
                    log.info("%s: removed, a saved prompt's write that never finished", path)
            except OSError:
                continue

    def longest_prefix(self, tokens: Sequence[int]) -> tuple[DiskPrompt | None, int]:
        """The file sharing the longest prefix with `tokens`, and that length (0: none)."""
        self.refresh()
        with self._lock:
            entries = list(self.entries)
        return longest_match(entries, tokens)

    def covers(self, tokens: Sequence[int]) -> bool:
        with self._lock:
            return any(starts_with(e.tokens, tokens) for e in self.entries)

    # ---- reading ------------------------------------------------------------------------------
    def load(self, entry: DiskPrompt) -> tuple[CacheSnapshot, DraftState | None] | None:
        """The file's rows and MTP state (`speculative.DraftState` or None); None, with a warning, where it
        cannot be read (it is then forgotten)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(entry.path)
            snap, draft = _unpack(tensors, _metadata(entry.path))
        except FileNotFoundError:  # another process sharing the directory deleted it (its budget)
            log.info("%s: saved prompt deleted by another process; its prompt is prefilled", entry.path)
            with self._lock:
                self.entries = [e for e in self.entries if e is not entry]
            return None
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            self.forget(entry, f"it could not be read: {exc}")
            return None
        with self._lock:  # now the most recently used
            if entry in self.entries:
                self.entries.remove(entry)
                self.entries.append(entry)
        try:
            os.utime(entry.path)  # the order survives a restart
        except OSError:
            pass
        self.loads += 1
        return snap, draft

    def forget(self, entry: DiskPrompt, why: str) -> None:
        """Stop using a file (left on disk), with one warning saying why: its prompt is prefilled instead."""
        self.failed += 1
        log.warning("%s: saved prompt not used (%s); it is prefilled instead", entry.path, why)
        try:
            self._skipped.add((entry.path, entry.path.stat().st_mtime_ns))  # not read again, unless rewritten
        except OSError:
            pass
        with self._lock:
            self.entries = [e for e in self.entries if e is not entry]

    # ---- writing ------------------------------------------------------------------------------
    def save(self, kv: CacheSnapshot, draft_state: DraftState | None = None) -> None:
        """Write a prompt on the writer thread (the caller goes on); nothing where a file holds it already, or where
        it alone is larger than the whole budget (it would be deleted as soon as written; one warning)."""
        if self.covers(kv.tokens):
            return
        size = kv.nbytes + (draft_state.nbytes if draft_state is not None else 0)
        if size > self.budget:
            if not self.refused:
                from .model_info import human_bytes

                log.warning("a conversation's KV cache of %s is larger than --cache-disk's %s, so it is not written to %s",
                            human_bytes(size), human_bytes(self.budget), self.dir)  # fmt: skip
            self.refused += 1
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="localglm-prompt-disk")
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._executor.submit(self._write, kv, draft_state))

    def flush(self) -> None:
        """Wait for every write asked for so far."""
        for f in list(self._pending):
            f.result()
        self._pending.clear()

    def _write(self, kv: CacheSnapshot, draft_state: DraftState | None) -> None:
        from safetensors.torch import save_file

        tensors, meta = _pack(kv, draft_state)
        name = hashlib.sha1(json.dumps(kv.tokens).encode()).hexdigest()[:24] + SUFFIX
        path = self.dir / name
        tmp = None
        try:
            with tempfile.NamedTemporaryFile(dir=self.dir, prefix=".", suffix=TMP_SUFFIX, delete=False) as f:
                tmp = Path(f.name)
            save_file(tensors, str(tmp), metadata=meta)
            fsync_path(tmp)  # before the rename: a crash then leaves the old name or the whole file, never a torn one
            os.replace(tmp, path)
        except OSError as exc:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            self.failed += 1
            log.warning("%s: a saved prompt could not be written (%s)", self.dir, exc.strerror or exc)
            return
        entry = DiskPrompt(path, tuple(kv.tokens), path.stat().st_size)
        self.refresh()  # the budget counts what other processes sharing the directory wrote
        with self._lock:
            # a file this one extends holds nothing it does not: it goes, as in RAM (PromptCache.put)
            gone = [e for e in self.entries if e.path == path or starts_with(entry.tokens, e.tokens)]
            self.entries = [e for e in self.entries if e not in gone] + [entry]
            while len(self.entries) > 1 and sum(e.nbytes for e in self.entries) > self.budget:
                gone.append(self.entries.pop(0))
            if entry.nbytes > self.budget:  # alone larger than the whole budget
                self.entries.remove(entry)
                gone.append(entry)
        for e in gone:
            if e is entry or e.path != path:  # not the file just written under an old entry's name
                e.path.unlink(missing_ok=True)
        self.writes += 1


def _pack(kv: CacheSnapshot, draft_state: DraftState | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A prompt as safetensors' tensors and metadata."""
    tensors = {"tokens": torch.tensor(kv.tokens, dtype=torch.int64)}
    tensors.update({f"kv.{i}": p.contiguous() for i, p in enumerate(kv.parts)})
    meta: dict[str, Any] = {"format": FORMAT, "kv_parts": len(kv.parts), "draft": None}
    if draft_state is not None:
        d = draft_state
        meta["draft"] = {
            "start": d.start, "end": d.end, "first_token": d.first_token, "chunks": len(d.chunks),
            "kv_parts": len(d.kv.parts) if d.kv is not None else None,
        }  # fmt: skip
        tensors.update({f"draft.chunk.{i}": c.contiguous() for i, c in enumerate(d.chunks)})
        if d.kv is not None:
            tensors["draft.tokens"] = torch.tensor(d.kv.tokens, dtype=torch.int64)
            tensors.update({f"draft.kv.{i}": p.contiguous() for i, p in enumerate(d.kv.parts)})
    return tensors, {"localglm": json.dumps(meta)}


def _unpack(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[CacheSnapshot, DraftState | None]:
    """The file's rows and MTP state; ValueError where its metadata or rows are not what `_pack` writes: a
    damaged file is then skipped with a warning (`load`), never every later request's 500 or 422."""
    try:
        snap = _unpack_parts(tensors, meta)
    except (TypeError, AttributeError, IndexError) as exc:  # metadata of the wrong shape ("draft": [1])
        raise ValueError(f"damaged metadata ({type(exc).__name__}: {exc})") from None
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not _all_finite(t)]
    if bad:
        raise ValueError(f"{bad[0]} holds NaN or infinity")
    return snap


FINITE_CHECK_ELEMENTS = 1 << 24  # values checked a pass: torch.isfinite's bool result of a whole cache file was its size again


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value of `t` is finite, checked a slice at a time (a GLM-5.2 long-context file holds ~12 GB of rows)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(FINITE_CHECK_ELEMENTS))


def _unpack_parts(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[CacheSnapshot, DraftState | None]:
    kv = CacheSnapshot(tuple(tensors["tokens"].tolist()), [tensors[f"kv.{i}"] for i in range(int(meta["kv_parts"]))])
    d = meta.get("draft")
    if not d:
        return kv, None
    draft_kv = None
    if d["kv_parts"] is not None:
        draft_kv = CacheSnapshot(tuple(tensors["draft.tokens"].tolist()), [tensors[f"draft.kv.{i}"] for i in range(int(d["kv_parts"]))])
    chunks = [tensors[f"draft.chunk.{i}"] for i in range(int(d["chunks"]))]
    first = d["first_token"]
    if first is not None and not isinstance(first, int):
        raise TypeError(f"first_token {first!r}")
    return kv, DraftState(draft_kv, chunks, int(d["start"]), int(d["end"]), first)


def _metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("localglm", "{}"))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    return meta


def _read_header(path: Path) -> DiskPrompt | None:
    """The file's entry (its token ids read, its rows not), or None where it is not one of ours."""
    from safetensors import SafetensorError, safe_open

    try:
        _metadata(path)
        with safe_open(str(path), framework="pt") as f:
            tokens = tuple(f.get_tensor("tokens").tolist())
        return DiskPrompt(path, tokens, path.stat().st_size)
    except (OSError, SafetensorError, ValueError, KeyError, json.JSONDecodeError):
        return None

