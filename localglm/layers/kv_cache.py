"""Preallocated attention caches for one sequence (batch 1 in generation, any batch in tests).

Allocated once at the context size so decode never reallocates. Each remembers which tokens it
holds so the engine can reuse the longest common prefix of the next prompt (agents resend the
whole conversation every turn): that bookkeeping is `TokenCache`, shared by every cache layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share (a 100k-token prompt: ~3 ms)."""
    n = 0
    for x, y in zip(a, b, strict=False):  # to the shorter
        if x != y:
            break
        n += 1
    return n


def starts_with(held: Sequence[int], tokens: Sequence[int]) -> bool:
    """Whether `held` begins with all of `tokens` (a saved prompt that covers them)."""
    return len(held) >= len(tokens) and common_prefix(held, tokens) == len(tokens)


def longest_match(entries: Iterable[T], tokens: Sequence[int]) -> tuple[T | None, int]:
    """Of `entries` (each with `.tokens`), the one sharing the longest prefix with `tokens`, and that length (0: none)."""
    best, best_n = None, 0
    for e in entries:
        n = common_prefix(e.tokens, tokens)  # type: ignore[attr-defined]
        if n > best_n:
            best, best_n = e, n
    return best, best_n


class TokenCache:
    """The token bookkeeping every cache layout shares: which token ids are stored, in order."""

    max_tokens: int

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.tokens: list[int] = []  # the token ids whose keys/values are stored, in order
        self._end_logits: tuple[int, torch.Tensor] | None = None  # (n, the logits after the first n tokens' rows)

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        """The memory the cache holds, every token's rows (`token_rows`) at the context size."""
        return tensor_bytes(rows for rows, _ in self.token_rows())

    def check_room(self, end: int) -> None:
        """Raise the one overflow error every layout gives when position `end` does not fit."""
        if end > self.max_tokens:
            raise ValueError(f"KV cache overflow: position {end} > context {self.max_tokens}")

    def common_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of `tokens` are already cached."""
        return common_prefix(self.tokens, tokens)

    def truncate(self, n: int) -> None:
        """Forget everything after the first n tokens (their slots are simply overwritten later)."""
        del self.tokens[n:]
        if self._end_logits is not None and self._end_logits[0] > n:
            self._end_logits = None

    def remember_logits(self, n: int, logits: torch.Tensor) -> None:
        """Keep a prompt's last logits (those after the first n tokens' rows) while those rows stay.

        Why: a prompt sent again (a regenerated reply, a retried request) then goes on from the very numbers
        its first run had. Recomputing its last token instead sums the same products in another grouping
        than the prefill's chunk did: in bf16 the last bits differ, and a near tie picked another token."""
        self._end_logits = (n, logits.detach().clone())

    def holds_logits_after(self, n: int) -> bool:
        """Whether the logits after the first n tokens are kept (the cache still holds those rows)."""
        kept = self._end_logits
        return kept is not None and kept[0] == n <= self.length

    def logits_after(self, n: int) -> torch.Tensor | None:
        """The kept logits after the first n tokens (a copy: a caller may change it), if held."""
        return self._end_logits[1].clone() if self.holds_logits_after(n) else None  # type: ignore[index]

    def token_rows(self) -> list[tuple[torch.Tensor, int]]:
        """Every tensor that holds per-token rows, with its token dimension: what `snapshot` copies."""
        raise NotImplementedError(f"{type(self).__name__}: token_rows (needed to save and restore prompts)")

    def snapshot(self) -> CacheSnapshot:
        """A copy of the rows of the tokens held, in host RAM: the KV of a prompt set aside while another
        conversation uses the cache (localglm/prompt_cache.py). Rows at position i depend only on tokens
        0..i, so any prefix of a snapshot is a valid cache for that prefix."""
        n = self.length
        parts = [rows.narrow(dim, 0, n).to("cpu", copy=True) for rows, dim in self.token_rows()]
        return CacheSnapshot(tuple(self.tokens), parts)

    def accepts(self, snap: CacheSnapshot) -> bool:
        """Whether `snap` holds rows of this layout, shapes and dtypes (a snapshot read from a file may not)."""
        rows = self.token_rows()
        if len(rows) != len(snap.parts) or len(snap.tokens) > self.max_tokens:
            return False
        for (r, dim), part in zip(rows, snap.parts, strict=True):
            want = list(r.shape)
            want[dim] = len(snap.tokens)
            if list(part.shape) != want or part.dtype != r.dtype:
                return False
        return True

    def restore(self, snap: CacheSnapshot, n: int) -> None:
        """Hold the first `n` tokens of `snap` (a snapshot of a cache of this layout and size)."""
        if n > len(snap.tokens) or n > self.max_tokens:
            raise ValueError(f"restore: {n} tokens asked of a snapshot of {len(snap.tokens)} (cache of {self.max_tokens})")
        for (rows, dim), part in zip(self.token_rows(), snap.parts, strict=True):
            rows.narrow(dim, 0, n).copy_(part.narrow(dim, 0, n))
        self.tokens = list(snap.tokens[:n])
        self._end_logits = None


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity (PromptCache.touch finds it in a list)
class CacheSnapshot:
    """A cache's token ids and a host copy of their rows (`TokenCache.snapshot`)."""

    tokens: tuple[int, ...]
    parts: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.parts)


class KVCache(TokenCache):
    """Keys and values per kv head (grouped-query attention): [layers, batch, kv_heads, T, head_dim] each."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        max_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        batch: int = 1,
    ) -> None:
        super().__init__(max_tokens)
        shape = (layers, batch, kv_heads, max_tokens, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def token_rows(self) -> list[tuple[torch.Tensor, int]]:
        return [(self.k, 3), (self.v, 3)]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, kv_heads, T, hd] at positions start.. and return views of 0..start+T."""
        end = start + k.shape[2]
        self.check_room(end)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


@dataclass(frozen=True)
class HostRows:
    """A LatentCache kept in host RAM apart from the compute device: `fetch` brings rows there (the
    offload device's copy stream, which counts the bytes), `host_buffer(nbytes)` gives the host
    memory (the offload device's: page-locked at its exact size on CUDA, where torch's pinned
    allocator would round 94 GB of GLM-5.2 rows at 1M tokens up to 128 GiB). Worth it only where a
    decoded token reads a selection of rows (GLM-5's DSA top-k): its bulk then needs no VRAM and each
    step moves k rows a layer, not the context."""

    fetch: Callable[[torch.Tensor], torch.Tensor]
    host_buffer: Callable[[int], torch.Tensor] | None = None  # None: ordinary (pageable) memory


class LatentCache(TokenCache):
    """Multi-head latent attention's cache: per layer and token one row, the normalized latent
    (kv_lora_rank) then the roped shared key (qk_rope_head_dim): [layers, batch, T, kv_lora + rope].

    Heads share the row, so GLM-4.7-Flash stores (512 + 64) values a token a layer instead of
    20 heads x (256 + 256) expanded keys/values: ~18x smaller than a per-head cache. With `host`
    the rows live in host RAM and `read` brings the ones attention needs to `device`.
    """

    def __init__(
        self,
        layers: int,
        kv_lora_rank: int,
        rope_dim: int,
        max_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        batch: int = 1,
        host: HostRows | None = None,
    ) -> None:
        super().__init__(max_tokens)
        self.kv_lora_rank = kv_lora_rank
        self.host = host
        self._last_plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (selection, picked, renumbered)
        shape = (layers, batch, max_tokens, kv_lora_rank + rope_dim)
        if host is None:
            self.kv = torch.zeros(shape, dtype=dtype, device=device)
        elif host.host_buffer is None:
            self.kv = torch.zeros(shape, dtype=dtype)
        else:
            nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
            self.kv = host.host_buffer(nbytes).view(dtype).view(shape)
            self.kv.zero_()

    def token_rows(self) -> list[tuple[torch.Tensor, int]]:
        return [(self.kv, 2)]

    def write(self, layer: int, start: int, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Store latent [B, T, kv_lora] and k_rope [B, T, rope] at positions start.. (into host RAM
        with `host`); `read` gives them back for attention."""
        end = start + latent.shape[1]
        self.check_room(end)
        r = self.kv_lora_rank
        self.kv[layer, :, start:end, :r] = latent
        self.kv[layer, :, start:end, r:] = k_rope

    def read(self, layer: int, end: int, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(latent, rope key) rows of positions 0..end for attention, and `allowed` (MLA's key
        selection) as it applies to them. In host RAM, one query's selected positions are gathered
        alone and `allowed` renumbered to index the gathered rows; anything else (no selection, a
        mask, a prefill chunk, whose selection need not be causal) brings the layer's rows whole."""
        rows = self.kv[layer, :, :end]
        if self.host is not None:
            if allowed is not None and allowed.dtype != torch.bool and allowed.shape[1] == 1:
                picked, renumbered = self._gather_plan(allowed)
                if picked.numel() < end:
                    rows, allowed = rows.index_select(1, picked), renumbered
            rows = self.host.fetch(rows.contiguous())
        r = self.kv_lora_rank
        return rows[..., :r], rows[..., r:], allowed

    def _gather_plan(self, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The host positions to gather for a selection, ascending, and the selection renumbered to
        index them. GLM-5.2's shared layers pass the same selection tensor as the full layer before
        them: it is worked out (a device-to-host copy, a sort) once, not once a layer."""
        if self._last_plan is None or self._last_plan[0] is not allowed:
            picked = torch.unique(allowed.cpu())  # ascending
            self._last_plan = (allowed, picked, torch.searchsorted(picked.to(allowed.device), allowed))
        return self._last_plan[1], self._last_plan[2]
