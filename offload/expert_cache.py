"""Expert blobs and the device expert cache.

An expert is a byte blob plus a compute function (`ExpertCodec`): the bf16 codec packs gate_up
[2I, H] and down [H, I] back to back; a quantized codec (quant/) packs its packed weights and
scales the same way. Moving an expert is one copy of its blob; computing it needs only the blob.

The cache is one device allocation (so the budget is checked once and can never be exceeded
later), a key -> slot map, and an eviction policy. Keys in use by the running layer are pinned and
can never be chosen as victims. Where layers' blobs differ in size (an MTP block kept at 8 bits beside
4-bit experts), the slots come in size classes (`SlotClass`): a key only ever takes, and evicts, a slot
of its own class, so a few wide experts do not make every slot wide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from localglm.layers.experts import expert_swiglu

from .policies import Policy


class ExpertCodec(Protocol):
    nbytes: int

    def forward(self, blob: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


class Bf16Codec:
    """Unquantized experts (any float dtype): blob = gate_up [2I, H] then down [H, I]."""

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype) -> None:
        self.hidden, self.inter, self.dtype = hidden, inter, dtype
        self.esize = torch.tensor([], dtype=dtype).element_size()
        self.gu_bytes = 2 * inter * hidden * self.esize
        self.nbytes = self.gu_bytes + hidden * inter * self.esize

    def pack(self, gate_up: torch.Tensor, down: torch.Tensor, out: torch.Tensor) -> None:
        out[: self.gu_bytes].copy_(gate_up.contiguous().view(-1).view(torch.uint8))
        out[self.gu_bytes :].copy_(down.contiguous().view(-1).view(torch.uint8))

    def weights(self, blob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gu = blob[: self.gu_bytes].view(self.dtype).view(2 * self.inter, self.hidden)
        dn = blob[self.gu_bytes :].view(self.dtype).view(self.hidden, self.inter)
        return gu, dn

    def forward(self, blob: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # The same function as InMemoryExperts._expert (and the fused decode's numbers), so results are bit-identical.
        gu, dn = self.weights(blob)
        return expert_swiglu(x, gu, dn)


class QuantCodec:
    """Quantized experts from quant/: blob = [gate_up QuantTensor | down QuantTensor] (quant.blob)."""

    def __init__(self, layout: Any, dtype: torch.dtype) -> None:
        self.layout = layout  # quant.blob.ExpertBlobLayout
        self.dtype = dtype
        self.nbytes = layout.nbytes

    def forward(self, blob: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        from quant.blob import expert_forward

        return expert_forward(self.layout, blob, x)

    def prepare(self, blob: torch.Tensor) -> Any:
        """The expert with its kernels built once (quant.blob.PreparedExpert); call it on x."""
        from quant.blob import PreparedExpert

        return PreparedExpert(self.layout, blob, self.dtype)


@dataclass(frozen=True)
class SlotClass:
    """`n_slots` slots of `blob_bytes` each, for the keys whose class index this is."""

    n_slots: int
    blob_bytes: int


class ExpertCache:
    """`n_slots` slots of `blob_bytes` for all keys; or, with `classes` and `key_class` (per key, an
    index into `classes`), one region per class, each key cached only in its own class's slots."""

    def __init__(
        self, device: Any, n_slots: int, blob_bytes: int, n_keys: int, policy: Policy,
        classes: list[SlotClass] | None = None, key_class: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        if classes is None:
            classes, key_class = [SlotClass(int(n_slots), blob_bytes)], None
        elif key_class is None or len(key_class) != n_keys:
            raise ValueError("slot classes need a class index for every key")
        self.device = device
        self.classes = list(classes)
        self.n_slots = sum(c.n_slots for c in self.classes)
        self.blob_bytes = max(c.blob_bytes for c in self.classes)  # the widest slot
        self.key_class = np.zeros(n_keys, dtype=np.int64) if key_class is None else np.asarray(key_class, dtype=np.int64)
        self._of_class = [self.key_class == i for i in range(len(self.classes))]  # key masks, for victims
        self.slot_class = np.zeros(max(1, self.n_slots), dtype=np.int64)
        self.slot_start = np.zeros(max(1, self.n_slots), dtype=np.int64)  # byte offset of each slot
        self.slot_bytes = np.zeros(max(1, self.n_slots), dtype=np.int64)
        self.free_of: list[list[int]] = []  # per class, its free slots (popped from the end: lowest first)
        slot = offset = 0
        for ci, c in enumerate(self.classes):
            first = slot
            for _ in range(c.n_slots):
                self.slot_class[slot], self.slot_start[slot], self.slot_bytes[slot] = ci, offset, c.blob_bytes
                slot, offset = slot + 1, offset + c.blob_bytes
            self.free_of.append(list(range(slot - 1, first - 1, -1)))
        self.buffer = device.alloc(offset, "expert cache") if self.n_slots > 0 else None
        self.policy = policy
        self.slot_of: dict[int, int] = {}
        self.key_of = np.full(max(1, self.n_slots), -1, dtype=np.int64)
        self.cached = np.zeros(n_keys, dtype=bool)
        self.pinned = np.zeros(n_keys, dtype=bool)
        self.ready: dict[int, Any] = {}  # slot -> copy event
        self.last_use: dict[int, Any] = {}  # slot -> event after its last compute (CUDA)
        self.version = np.zeros(max(1, self.n_slots), dtype=np.int64)  # bumped whenever a slot is refilled
        self.evictions = 0
        self.last_t = np.full(n_keys, -np.inf)  # when each key was last used (for prefetch's guard)

    @property
    def free(self) -> list[int]:
        """Every free slot, of any class."""
        return [s for f in self.free_of for s in f]

    def has_free(self, key: int) -> bool:
        """Whether a slot of `key`'s class is free (a copy in would evict nothing)."""
        return bool(self.free_of[int(self.key_class[key])])

    def slot_tensor(self, slot: int) -> torch.Tensor:
        start = int(self.slot_start[slot])
        return self.buffer[start : start + int(self.slot_bytes[slot])]

    def lookup(self, key: int) -> int | None:
        return self.slot_of.get(key)

    def pin(self, keys: np.ndarray | list[int]) -> None:
        self.pinned[np.asarray(keys, dtype=np.int64)] = True

    def touch(self, keys: np.ndarray, t: float) -> None:
        self.last_t[keys] = t

    def unpin(self, keys: np.ndarray | list[int]) -> None:
        self.pinned[np.asarray(keys, dtype=np.int64)] = False

    def unpin_all(self) -> None:
        self.pinned[:] = False

    def _take_slot(self, cls: int, t: float, protect: np.ndarray | None, min_idle: float | None = None) -> int | None:
        if self.free_of[cls]:
            return self.free_of[cls].pop()
        if self.classes[cls].n_slots == 0:
            return None
        cached = self.cached if len(self.classes) == 1 else self.cached & self._of_class[cls]
        victim = self.policy.victim(cached, self.pinned, t, protect)
        if victim < 0:
            return None
        if min_idle is not None and t - self.last_t[victim] < min_idle:
            return None  # a speculative copy must not push out the working set
        assert not self.pinned[victim], "policy chose a pinned expert"
        slot = self.slot_of.pop(victim)
        self.cached[victim] = False
        self.key_of[slot] = -1
        self.evictions += 1
        return slot

    def insert(self, key: int, src: torch.Tensor, t: float, protect: np.ndarray | None = None, min_idle: float | None = None) -> int | None:
        """Copy `src` (the host blob) into a slot; None if every slot holds a pinned expert (or, with
        `min_idle`, if the victim was used less than that many tokens ago)."""
        slot = self._take_slot(int(self.key_class[key]), t, protect, min_idle)
        if slot is None:
            return None
        self.version[slot] += 1
        dst = self.slot_tensor(slot)[: src.numel()]  # layers of one class may differ in blob size; its slots fit the largest
        self.ready[slot] = self.device.copy_async(dst, src, after=self.last_use.pop(slot, None))
        self.slot_of[key] = slot
        self.key_of[slot] = key
        self.cached[key] = True
        return slot

    def wait(self, slot: int) -> None:
        ev = self.ready.pop(slot, None)
        if ev is not None:
            self.device.wait(ev)

    def used(self, slot: int) -> None:
        """Compute reading `slot` has been queued; a later copy into it must wait for that."""
        ev = self.device.record_use()
        if ev is not None:
            self.last_use[slot] = ev

    def resident_keys(self) -> list[int]:
        return sorted(self.slot_of)
