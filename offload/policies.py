"""Eviction policies for the device expert cache, shared by the real cache and the trace simulator.

Keys are flat integers `moe_index * n_experts + expert` over all (MoE layer, expert) pairs. Every
policy keeps a score per key (numpy arrays, so choosing a victim is one masked argmin over a few
thousand keys) and evicts the cached, unpinned key with the lowest score. Time `t` is a float
clock in tokens (a layer visit adds a fraction of a token), so decay rates read as "per token".
"""

from __future__ import annotations

import math

import numpy as np

POLICY_NAMES = ("lru", "lfu", "stat")
BOUND_NAMES = ("belady", "step-oracle")
# Defaults measured on five traces of the default model (benchmarks/bench_offload.py, 10-50% cache):
# a 16-32 token half-life beat 64 at every size, and a quarter-weight prior beat none and full.
HALF_LIFE = 32.0
PRIOR_WEIGHT = 0.25  # need the future: references, never the cache's policy


class Policy:
    """Base: score-based eviction. Subclasses fill `score(t)`."""

    name = "base"

    def __init__(self, n_keys: int) -> None:
        self.n_keys = n_keys

    def access(self, keys: np.ndarray, t: float) -> None:
        """`keys` were used at time t (hit or miss)."""

    def score(self, t: float) -> np.ndarray:
        raise NotImplementedError

    def victim(self, cached: np.ndarray, pinned: np.ndarray, t: float, protect: np.ndarray | None = None) -> int:
        """The cached, unpinned key to evict, or -1 when every cached key is pinned.

        `protect` (optional) marks keys to keep if anything else can go (e.g. just-prefetched ones).
        """
        free = cached & ~pinned
        if not free.any():
            return -1
        if protect is not None and (free & ~protect).any():
            free = free & ~protect
        s = np.where(free, self.score(t), np.inf)
        return int(np.argmin(s))


class LRU(Policy):
    name = "lru"

    def __init__(self, n_keys: int) -> None:
        super().__init__(n_keys)
        self.last = np.full(n_keys, -np.inf)

    def access(self, keys: np.ndarray, t: float) -> None:
        self.last[keys] = t

    def score(self, t: float) -> np.ndarray:
        return self.last


class LFUDecay(Policy):
    """Frequency with exponential decay: each use adds 1, which halves every `half_life` tokens.

    Counts are kept for every key, cached or not, so an expert that comes back keeps its history.
    """

    name = "lfu"

    def __init__(self, n_keys: int, half_life: float = HALF_LIFE) -> None:
        super().__init__(n_keys)
        self.lam = math.log(2) / half_life
        self.count = np.zeros(n_keys)
        self.tlast = np.zeros(n_keys)

    def access(self, keys: np.ndarray, t: float) -> None:
        self.count[keys] = self.count[keys] * np.exp(-self.lam * (t - self.tlast[keys])) + 1.0
        self.tlast[keys] = t

    def score(self, t: float) -> np.ndarray:
        return self.count * np.exp(-self.lam * (t - self.tlast))


class StatGuided(LFUDecay):
    """Router statistics blended with recent use.

    score = decayed count + weight * rate / lambda, where `rate` is the key's long-run uses per
    token from the router statistics (saved profile plus this run). rate / lambda is what the
    decayed count of a key used at that steady rate converges to, so `weight` 1 gives equal say;
    the default gives the long-run rate a quarter of it (what measured best: routing drifts with
    the text, so the recent counts know more).
    """

    name = "stat"

    def __init__(self, n_keys: int, rates: np.ndarray | None = None, half_life: float = HALF_LIFE, weight: float = PRIOR_WEIGHT) -> None:
        super().__init__(n_keys, half_life)
        self.weight = weight
        self.rates = np.zeros(n_keys) if rates is None else np.asarray(rates, dtype=np.float64).reshape(-1)
        self.live = np.zeros(n_keys)
        self.tokens = 0.0
        self.prior_tokens = 0.0

    def set_prior(self, rates: np.ndarray, tokens: float) -> None:
        """Rates from a saved profile over `tokens` tokens; live counts are blended in as they come."""
        self.rates = np.asarray(rates, dtype=np.float64).reshape(-1)
        self.prior_tokens = float(tokens)

    def access(self, keys: np.ndarray, t: float) -> None:
        super().access(keys, t)
        self.live[keys] += 1.0
        self.tokens = max(self.tokens, t)

    def score(self, t: float) -> np.ndarray:
        total = self.prior_tokens + self.tokens
        rate = (self.rates * self.prior_tokens + self.live) / total if total > 0 else self.rates
        return super().score(t) + self.weight * rate / self.lam


class Belady(Policy):
    """The offline optimum: evict the key whose next use is furthest away (needs the future).

    The caller sets `next_use[key]` to the index of the key's next access group before each
    access; keys never used again get +inf and are evicted first.
    """

    name = "belady"

    def __init__(self, n_keys: int) -> None:
        super().__init__(n_keys)
        self.next_use = np.full(n_keys, np.inf)

    def score(self, t: float) -> np.ndarray:
        return -self.next_use


class StepOracle(LFUDecay):
    """A bound, not a policy: LFU with decay that also knows which experts the rest of the current
    step (this token's later layers) will use, and keeps them.

    The most any router-guided online policy could learn from predicting this token's layers; it
    still cannot know the next token's routing, which is where Belady's lead comes from.
    """

    name = "step-oracle"

    def __init__(self, n_keys: int, half_life: float = HALF_LIFE) -> None:
        super().__init__(n_keys, half_life)
        self.soon = np.zeros(n_keys, dtype=bool)  # set by the simulator before each access group

    def score(self, t: float) -> np.ndarray:
        return np.where(self.soon, np.inf, super().score(t))


def make_policy(name: str, n_keys: int, rates: np.ndarray | None = None, tokens: float = 0.0, half_life: float = HALF_LIFE) -> Policy:
    name = name.lower()
    if name == "lru":
        return LRU(n_keys)
    if name in ("lfu", "lfu-decay"):
        return LFUDecay(n_keys, half_life)
    if name in ("stat", "stats", "router-stats"):
        p = StatGuided(n_keys, half_life=half_life)
        if rates is not None:
            p.set_prior(rates, tokens)
        return p
    if name == "belady":
        return Belady(n_keys)
    if name == StepOracle.name:
        return StepOracle(n_keys, half_life)
    raise ValueError(f"unknown cache policy {name!r}: use one of {', '.join(POLICY_NAMES)}")
