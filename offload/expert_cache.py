"""Expert blobs and the device expert cache.

An expert is a byte blob plus a compute function (`ExpertCodec`): the bf16 codec packs gate_up
[2I, H] and down [H, I] back to back; a quantized codec (quant/) packs its packed weights and
scales the same way. Moving an expert is one copy of its blob; computing it needs only the blob.

The cache is one device allocation of `n_slots * blob_bytes` (so the budget is checked once and
can never be exceeded later), a key -> slot map, and an eviction policy. Keys in use by the
running layer are pinned and can never be chosen as victims.
"""

from __future__ import annotations

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


class ExpertCache:
    def __init__(self, device: Any, n_slots: int, blob_bytes: int, n_keys: int, policy: Policy) -> None:
        self.device = device
        self.n_slots = int(n_slots)
        self.blob_bytes = blob_bytes
        self.buffer = device.alloc(self.n_slots * blob_bytes, "expert cache") if n_slots > 0 else None
        self.policy = policy
        self.slot_of: dict[int, int] = {}
        self.key_of = np.full(max(1, self.n_slots), -1, dtype=np.int64)
        self.cached = np.zeros(n_keys, dtype=bool)
        self.pinned = np.zeros(n_keys, dtype=bool)
        self.ready: dict[int, Any] = {}  # slot -> copy event
        self.last_use: dict[int, Any] = {}  # slot -> event after its last compute (CUDA)
        self.version = np.zeros(max(1, self.n_slots), dtype=np.int64)  # bumped whenever a slot is refilled
        self.free = list(range(self.n_slots - 1, -1, -1))
        self.evictions = 0
        self.last_t = np.full(n_keys, -np.inf)  # when each key was last used (for prefetch's guard)

    def slot_tensor(self, slot: int) -> torch.Tensor:
        return self.buffer[slot * self.blob_bytes : (slot + 1) * self.blob_bytes]

    def lookup(self, key: int) -> int | None:
        return self.slot_of.get(key)

    def pin(self, keys: np.ndarray | list[int]) -> None:
        self.pinned[np.asarray(keys, dtype=np.int64)] = True

    def touch(self, keys: np.ndarray, t: float) -> None:
        self.last_t[keys] = t

    def unpin_all(self) -> None:
        self.pinned[:] = False

    def _take_slot(self, t: float, protect: np.ndarray | None, min_idle: float | None = None) -> int | None:
        if self.free:
            return self.free.pop()
        if self.n_slots == 0:
            return None
        victim = self.policy.victim(self.cached, self.pinned, t, protect)
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
        slot = self._take_slot(t, protect, min_idle)
        if slot is None:
            return None
        self.version[slot] += 1
        dst = self.slot_tensor(slot)[: src.numel()]  # layers may differ in blob size; slots fit the largest
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
