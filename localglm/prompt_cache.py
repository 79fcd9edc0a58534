"""Prompts set aside in host RAM, so that conversations taking turns keep their KV caches.

The engine holds one live KV cache and reuses its longest common prefix with the next prompt. That
serves one conversation. Coding agents run several at once: a main conversation, subagents, and
small side requests (Claude Code asks for a title or a topic check beside most turns). Each of
those prompts used to overwrite the main conversation's cache, and its next turn prefilled the
whole context again: minutes at GLM widths on a CPU.

`PromptCache` keeps copies of the caches that a diverging prompt is about to overwrite (up to a
byte budget, least recently used first out). Before a prompt is prefilled, the engine
(`Model._bring_saved_prefix`) restores the saved copy that shares the longest prefix with it,
when that prefix is longer than the live cache's. llama.cpp's server does the same with
`--cache-ram` (8 GiB by default). Rows at position i depend only on tokens 0..i, so a saved
prefix is exactly what a prefill of those tokens would compute.

With a `PromptDisk` under it (`--cache-dir`, prompt_disk.py), what RAM lets go is written to disk
instead of lost, the live cache and RAM's prompts are written there when the server stops, and a
prompt whose longest saved prefix is on disk loads it from there.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LocalGLMError
from .layers.kv_cache import CacheSnapshot, longest_match, starts_with
from .model_info import human_bytes
from .prompt_disk import DiskPrompt, PromptDisk

log = logging.getLogger("localglm")
DEFAULT_BUDGET = 4 * 2**30  # the most RAM saved prompts take by default (`prompt_cache_for`)
DEFAULT_DISK_BUDGET = 32 * 2**30  # the most disk they take by default (or half the free space, the less)
MIN_TOKENS = 32  # a prompt shorter than this prefills faster than it is worth keeping
LOST_SHARE = 0.25  # the live cache is saved when a prompt would overwrite at least this share of it


@dataclass(frozen=True, eq=False)  # compared by identity: == would compare the snapshots' tensors
class SavedPrompt:
    """The main model's cache rows and, with speculative decoding, the MTP block's state beside them."""

    kv: CacheSnapshot
    draft_state: Any = None  # speculative.DraftState (it has .nbytes), or None

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.kv.tokens

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + (self.draft_state.nbytes if self.draft_state is not None else 0)


@dataclass
class PromptCache:
    """Saved prompts, most recently used last, within `budget` bytes (and `disk` below them, if any)."""

    budget: int
    min_tokens: int = MIN_TOKENS
    disk: PromptDisk | None = None
    entries: list[SavedPrompt] = field(default_factory=list)
    restores: int = 0  # prompts that started from a saved prefix
    restored_tokens: int = 0  # the prompt tokens those restores did not prefill
    saves: int = 0
    refused: int = 0  # caches larger than the whole budget, not kept

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def longest_prefix(self, tokens: Sequence[int]) -> tuple[SavedPrompt | DiskPrompt | None, int]:
        """The saved prompt sharing the longest prefix with `tokens`, in RAM or else on disk where a file's
        is longer, and that length (0: none). `bring` makes a file's a `SavedPrompt`."""
        best: SavedPrompt | DiskPrompt | None
        best, best_n = longest_match(self.entries, tokens)
        if self.disk is not None:
            on_disk, n = self.disk.longest_prefix(tokens)
            if n > best_n:
                best, best_n = on_disk, n
        return best, best_n

    def bring(self, entry: SavedPrompt | DiskPrompt) -> SavedPrompt | None:
        """`entry` in RAM: a file is read (and kept in RAM as the most recently used); None where it
        cannot be read."""
        if isinstance(entry, SavedPrompt):
            return entry
        assert self.disk is not None
        loaded = self.disk.load(entry)
        if loaded is None:
            return None
        prompt = SavedPrompt(*loaded)
        self.put(prompt, counted=False)
        return prompt

    def worth_saving(self, held: int, kept: int) -> bool:
        """Whether a live cache of `held` tokens, of which the next prompt keeps `kept`, should be saved first."""
        lost = held - kept
        return held >= self.min_tokens and lost >= self.min_tokens and lost >= LOST_SHARE * held

    def covers(self, tokens: Sequence[int]) -> bool:
        """Whether a saved prompt holds all of `tokens` already (saving them again would add nothing)."""
        return any(starts_with(e.tokens, tokens) for e in self.entries)

    def put(self, entry: SavedPrompt, *, counted: bool = True) -> bool:
        """Keep `entry` (dropping saved prompts it extends), then let the least recently used ones beyond
        the budget go (to disk, if any). False where it alone exceeds the budget: then it goes to disk,
        or nowhere. `counted`: a save (not a file read back)."""
        if entry.nbytes > self.budget:
            if self.disk is not None:
                self.disk.save(entry.kv, entry.draft_state)
                return False
            self.refused += 1
            if self.refused == 1:  # once: the user can raise the budget
                log.warning(
                    "a conversation's KV cache of %s is larger than the %s for saved prompts (--cache-ram), so it is "
                    "not kept: when its conversation comes back after another, its prompt is prefilled again",
                    human_bytes(entry.nbytes), human_bytes(self.budget),
                )  # fmt: skip
            return False
        self.entries = [e for e in self.entries if not starts_with(entry.tokens, e.tokens)]
        self.entries.append(entry)
        if counted:
            self.saves += 1
        while self.nbytes > self.budget:
            gone = self.entries.pop(0)
            if self.disk is not None:
                self.disk.save(gone.kv, gone.draft_state)
        return True

    def touch(self, entry: SavedPrompt, restored: int) -> None:
        """`entry` was restored (`restored` tokens): it becomes the most recently used."""
        if entry in self.entries:
            self.entries.remove(entry)
            self.entries.append(entry)
        self.restores += 1
        self.restored_tokens += restored

    def drop(self, entry: SavedPrompt, found: SavedPrompt | DiskPrompt | None = None) -> None:
        """Forget `entry`, rows that do not fit the cache they were to restore, and the file it was read
        from (`found`), which stays on disk."""
        if entry in self.entries:
            self.entries.remove(entry)
        if isinstance(found, DiskPrompt) and self.disk is not None:
            self.disk.forget(found, "its rows do not fit this model's cache")

    def persist(self, live: SavedPrompt | None) -> int:
        """Write `live` (the engine's live cache) and every prompt in RAM to disk, and wait for the writes:
        the server is stopping. Returns the files written (0 without a disk)."""
        if self.disk is None:
            return 0
        before = self.disk.writes
        for e in [*self.entries, *([live] if live is not None else [])]:
            self.disk.save(e.kv, e.draft_state)
        self.disk.flush()
        return self.disk.writes - before


def prompt_cache_for(
    requested: int | None, *, disk_dir: Path | None = None, disk_budget: int | None = None, setup: str | None = None
) -> PromptCache | None:
    """The store for `--cache-ram`: `requested` bytes (0: none), or by default 4 GiB or an eighth of the RAM
    available now (the model loaded), whichever is less. llama.cpp's server sets aside 8 GiB; our users'
    RAM holds the experts. With `disk_dir` (`--cache-dir`), files under it for the model `setup`
    (`Model.setup`), within `disk_budget` bytes (`--cache-disk`; by default 32 GiB or half the disk's
    free space, the less). None where neither RAM nor disk is given any."""
    if requested is None:
        import psutil

        requested = min(DEFAULT_BUDGET, psutil.virtual_memory().available // 8)
    disk = None
    if disk_dir is not None and disk_budget != 0:
        if setup is None:
            raise LocalGLMError("--cache-dir: this model has no setup to key its saved prompts by (load it with localglm.load)")
        if disk_budget is None:
            free = shutil.disk_usage(_existing_parent(Path(disk_dir).expanduser())).free
            disk_budget = min(DEFAULT_DISK_BUDGET, free // 2)
        disk = PromptDisk(Path(disk_dir), disk_budget, setup)
    if requested <= 0 and disk is None:
        return None
    return PromptCache(max(requested, 0), disk=disk)


def _existing_parent(path: Path) -> Path:
    """`path`, or its nearest existing parent (the disk whose free space counts)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path
