"""Preallocated attention caches for one sequence (batch 1 in generation, any batch in tests).

Allocated once at the context size so decode never reallocates. Each remembers which tokens it
holds so the engine can reuse the longest common prefix of the next prompt (agents resend the
whole conversation every turn): that bookkeeping is `TokenCache`, shared by every cache layout.
"""

from __future__ import annotations

import torch


class TokenCache:
    """The token bookkeeping every cache layout shares: which token ids are stored, in order."""

    max_tokens: int

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.tokens: list[int] = []  # the token ids whose keys/values are stored, in order

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def check_room(self, end: int) -> None:
        """Raise the one overflow error every layout gives when position `end` does not fit."""
        if end > self.max_tokens:
            raise ValueError(f"KV cache overflow: position {end} > context {self.max_tokens}")

    def common_prefix(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` are already cached."""
        n = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            n += 1
        return n

    def truncate(self, n: int) -> None:
        """Forget everything after the first n tokens (their slots are simply overwritten later)."""
        del self.tokens[n:]


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

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, kv_heads, T, hd] at positions start.. and return views of 0..start+T."""
        end = start + k.shape[2]
        self.check_room(end)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class LatentCache(TokenCache):
    """Multi-head latent attention's cache: per layer and token one row, the normalized latent
    (kv_lora_rank) then the roped shared key (qk_rope_head_dim): [layers, batch, T, kv_lora + rope].

    Heads share the row, so GLM-4.7-Flash stores (512 + 64) values a token a layer instead of
    20 heads x (256 + 256) expanded keys/values: ~18x smaller than a per-head cache.
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
    ) -> None:
        super().__init__(max_tokens)
        self.kv_lora_rank = kv_lora_rank
        self.kv = torch.zeros((layers, batch, max_tokens, kv_lora_rank + rope_dim), dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def write(self, layer: int, start: int, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store latent [B, T, kv_lora] and k_rope [B, T, rope] at positions start.. and return
        views of both for positions 0..start+T."""
        end = start + latent.shape[1]
        self.check_room(end)
        r = self.kv_lora_rank
        self.kv[layer, :, start:end, :r] = latent
        self.kv[layer, :, start:end, r:] = k_rope
        rows = self.kv[layer, :, :end]
        return rows[..., :r], rows[..., r:]
