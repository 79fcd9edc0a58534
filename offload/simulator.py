"""Replay a routing trace against a device expert cache: hit rate and bytes moved per policy,
beside Belady's offline optimum.

Model: the cache holds `capacity` expert slots shared by all MoE layers. Each trace call (one
MoE layer of one forward step) needs the union of its tokens' experts; those are in use together,
so none of them may be evicted while the call runs. A miss copies the expert in (evicting the
policy's victim); when every slot is in use the expert is streamed without being cached. With
`prefetch`, the experts the predictor named for a call (recorded in the trace) are copied in
just before it, into free slots or over the policy's coldest unprotected victims.

Counting is per (call, expert): an expert used by several tokens of one call is one access.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .policies import BOUND_NAMES, HALF_LIFE, Belady, Policy, StepOracle, make_policy
from .trace import Trace


@dataclass
class Group:
    t: float  # token clock
    keys: np.ndarray  # unique flat keys needed
    predicted: np.ndarray | None  # flat keys predicted for this call
    step: int = 0


@dataclass
class SimResult:
    policy: str
    capacity: int
    accesses: int = 0
    hits: int = 0
    bypassed: int = 0  # misses streamed without being cached (every slot in use)
    bytes_moved: int = 0
    prefetched: int = 0
    prefetch_used: int = 0  # prefetched copies that were hit before being evicted
    pred_tp: int = 0
    pred_fp: int = 0
    pred_fn: int = 0

    @property
    def misses(self) -> int:
        return self.accesses - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def precision(self) -> float:
        d = self.pred_tp + self.pred_fp
        return self.pred_tp / d if d else 0.0

    @property
    def recall(self) -> float:
        d = self.pred_tp + self.pred_fn
        return self.pred_tp / d if d else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(misses=self.misses, hit_rate=self.hit_rate, precision=self.precision, recall=self.recall)
        return d


def groups(trace: Trace) -> list[Group]:
    """The trace as access groups with a token clock (a call's layer adds a fraction of a token)."""
    index = trace.layer_index()
    n_layers = max(1, len(trace.moe_layers))
    e = trace.n_experts
    out: list[Group] = []
    tokens_before = 0
    step = None
    step_tokens = 0
    for c in trace.calls:
        if c.step != step:
            tokens_before += step_tokens
            step, step_tokens = c.step, 0
        step_tokens = max(step_tokens, len(c.experts))
        li = index[c.layer]
        keys = np.unique(c.experts.reshape(-1)) + li * e
        pred = None if c.predicted is None else np.unique(c.predicted) + li * e
        out.append(Group(tokens_before + li / n_layers, keys.astype(np.int64), pred, c.step))
    return out


def _step_ends(gs: list[Group]) -> list[int]:
    """For each group, the index one past the last group of its step."""
    ends = [0] * len(gs)
    end = len(gs)
    for g in range(len(gs) - 1, -1, -1):
        if g + 1 < len(gs) and gs[g + 1].step != gs[g].step:
            end = g + 1
        ends[g] = end
    return ends


def _next_uses(gs: list[Group]) -> list[np.ndarray]:
    """For each group, the index of the next group using each of its keys (inf if none)."""
    last: dict[int, int] = {}
    res: list[np.ndarray] = [np.empty(0)] * len(gs)
    for g in range(len(gs) - 1, -1, -1):
        keys = gs[g].keys
        res[g] = np.array([last.get(int(k), np.inf) for k in keys], dtype=np.float64)
        for k in keys:
            last[int(k)] = g
    return res


def simulate(
    trace: Trace,
    capacity: int,
    policy: str | Policy = "lru",
    *,
    prefetch: bool = False,
    rates: np.ndarray | None = None,
    rate_tokens: float = 0.0,
    half_life: float = HALF_LIFE,
    expert_bytes: int | None = None,
    gs: list[Group] | None = None,
    prefetch_min_idle: float | None = None,
) -> SimResult:
    gs = gs if gs is not None else groups(trace)
    n = trace.n_keys
    pol = policy if isinstance(policy, Policy) else make_policy(policy, n, rates, rate_tokens, half_life)
    belady = isinstance(pol, Belady)
    nxt = _next_uses(gs) if belady else None
    ends = _step_ends(gs) if isinstance(pol, StepOracle) else None
    if (belady or isinstance(pol, StepOracle)) and prefetch:
        raise ValueError(f"{pol.name} is a demand-paging bound; run it without prefetch")
    size = trace.expert_bytes if expert_bytes is None else expert_bytes
    res = SimResult(pol.name, capacity)
    cached = np.zeros(n, dtype=bool)
    fresh = np.zeros(n, dtype=bool)  # prefetched and not yet used
    used_slots = 0
    last_t = np.full(n, -np.inf)

    def insert(key: int, pinned: np.ndarray, t: float, protect: np.ndarray | None, min_idle: float | None = None) -> bool:
        nonlocal used_slots
        if used_slots >= capacity:
            v = pol.victim(cached, pinned, t, protect)
            if v < 0:
                return False
            if min_idle is not None and t - last_t[v] < min_idle:
                return False  # as the backend: a prefetch never evicts the recent working set
            cached[v] = False
            fresh[v] = False
            used_slots -= 1
        cached[key] = True
        used_slots += 1
        return True

    for gi, g in enumerate(gs):
        if g.predicted is not None:
            actual = set(g.keys.tolist())
            pred = set(g.predicted.tolist())
            res.pred_tp += len(actual & pred)
            res.pred_fp += len(pred - actual)
            res.pred_fn += len(actual - pred)
            if prefetch and capacity > 0:
                protect = np.zeros(n, dtype=bool)
                protect[g.predicted] = True
                for k in g.predicted:
                    if not cached[k] and insert(int(k), protect, g.t, None, prefetch_min_idle):
                        fresh[k] = True
                        res.prefetched += 1
                        res.bytes_moved += size
        if ends is not None:  # the bound knows this step's later groups
            pol.soon[:] = False
            for later in gs[gi + 1 : ends[gi]]:
                pol.soon[later.keys] = True
        if belady:
            pol.next_use[g.keys] = gi  # in use now
        pinned = np.zeros(n, dtype=bool)
        pinned[g.keys] = True
        hit = cached[g.keys]
        res.accesses += len(g.keys)
        res.hits += int(hit.sum())
        res.prefetch_used += int((fresh[g.keys] & hit).sum())
        fresh[g.keys] = False
        for k in g.keys[~hit]:
            res.bytes_moved += size
            if capacity <= 0 or not insert(int(k), pinned, g.t, None):
                res.bypassed += 1
        pol.access(g.keys, g.t)
        last_t[g.keys] = g.t
        if belady:
            pol.next_use[g.keys] = nxt[gi]
    return res


def capacity_for(trace: Trace, fraction: float) -> int:
    return max(1, int(round(fraction * trace.n_keys)))


def compare(
    trace: Trace,
    fractions: list[float],
    policies: list[str],
    *,
    prefetch: bool = False,
    rates: np.ndarray | None = None,
    rate_tokens: float = 0.0,
    half_life: float = HALF_LIFE,
) -> list[dict]:
    """One row per cache size: each policy's result and Belady's (always demand paging)."""
    gs = groups(trace)
    rows = []
    for f in fractions:
        cap = capacity_for(trace, f)
        opt = simulate(trace, cap, "belady", gs=gs)
        row = {"fraction": f, "capacity": cap, "belady": opt}
        for p in policies:
            row[p] = simulate(trace, cap, p, prefetch=prefetch, rates=rates, rate_tokens=rate_tokens, half_life=half_life, gs=gs)
        rows.append(row)
    return rows


def format_table(rows: list[dict], policies: list[str], expert_bytes: int) -> str:
    from localglm.model_info import human_bytes

    head = f"{'cache':>12}  " + "  ".join(f"{p:>22}" for p in policies) + f"  {'belady (optimal)':>22}  best/opt"  # best: of the online policies
    lines = [head, f"{'':>12}  " + "  ".join(f"{'hit%  moved':>22}" for _ in policies + ['belady'])]
    for r in rows:
        cells = []
        for p in policies + ["belady"]:
            s: SimResult = r[p]
            moved = human_bytes(s.bytes_moved) if expert_bytes else f"{s.misses + s.prefetched} exp"
            cells.append(f"{100 * s.hit_rate:6.1f}%  {moved:>13}")
        online = [p for p in policies if p not in BOUND_NAMES]
        best = max(r[p].hit_rate for p in online) if online else 0.0
        ratio = best / r["belady"].hit_rate if r["belady"].hit_rate else 0.0
        lines.append(f"{100 * r['fraction']:4.0f}% ({r['capacity']:>4})  " + "  ".join(f"{c:>22}" for c in cells) + f"  {100 * ratio:6.1f}%")
    return "\n".join(lines)
