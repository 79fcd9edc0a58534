"""Speculative decoding with the checkpoint's own MTP block (models/mtp.py) as the drafter.

Each step drafts k tokens with the MTP block chained, verifies them in one forward of the main model
over k + 1 tokens (every routed expert runs once for all the tokens sent to it: layers/experts.py
groups them), keeps the longest accepted prefix plus one token of the main model's own, and rolls
both KV caches back to what was accepted (`TokenCache.truncate`: rows past the length are simply
overwritten later, so rollback is free for the GQA, latent and DSA caches alike).

- Greedy: a draft is accepted when it is the main model's argmax, so the output is token for token
  the one decoding without speculation gives (up to the float rounding of a k + 1-token forward
  against a one-token one).
- Temperature > 0: speculative sampling (Leviathan et al., Chen et al.): draft d ~ q, accepted with
  probability min(1, p(d) / q(d)), else the token is drawn from norm(max(0, p - q)); after k accepted
  drafts one more token is drawn from p. p and q are the distributions the sampler would draw from
  (penalty, temperature, top-k/p, min-p applied), so the output is distributed as without speculation.
- The drafter may score only the checkpoint's most frequent tokens (draft_vocab.py, FR-Spec): its q is
  zero elsewhere, which the accept/resample step above handles as it is (a token outside is never
  proposed, and the residual there is p); where a logits processor forbids every one of them, that
  draft uses the whole head.
- A logits processor (constrained decoding) is applied to the draft logits and to each verified
  position's logits with the ids before it, so a grammar shapes the drafts and vetoes what it forbids:
  a forbidden draft has p(d) = 0 and is rejected. `DraftVeto` is the cheaper seam for a checker that
  can refuse a drafted token outright: drafting stops before it.

The MTP cache mirrors the main one: entry j holds the block's keys for (h_j, t_{j+1}), so it is valid
for as long as tokens 0..j+1 are; it holds one entry per main-cache token once caught up. Entries
not yet computed (after a depth-0 step) wait as (stream, token) pairs and are computed in the next
draft's first, batched block call.

The depth is chosen per step by `DepthPolicy` from the measured acceptance and the price of the extra
experts a wider verification reads (offload/cost_model.py's price of a miss where experts are offloaded).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .layers.kv_cache import CacheSnapshot, TokenCache, tensor_bytes
from .layers.norm import rms_norm
from .models.mtp import MtpHead
from .sampling import Sampler, SamplingParams, check_finite
from .speculative_prices import PriceMemory, Remembered
from .stats import GenerationStats

PREFILL_CHUNK = 512
# (ids generated so far, logits [vocab]) -> logits: the engine's LogitsProcessor.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]
# (ids generated so far, drafted token) -> True to refuse it: drafting stops before it (grammars).
DraftVeto = Callable[[list[int], int], bool]

DEFAULT_DRAFT = 3  # the most drafted tokens a step (--draft)
EXPERT_OVERLAP = 0.2  # share of a drafted token's experts another token of the step also uses (10-30% measured on GLM)
EXPLORE_EVERY = 16  # after this many depth-0 steps, draft one token to keep measuring acceptance ...
EXPLORE_MAX = 256  # ... doubling up to this while it keeps not paying
TIMING_WINDOW = 9  # a depth's price: the median of its last this many timed steps
PROBE_STEPS = 4  # a probe drafts this many steps in a row: its first (cold) step is not timed, the others are
ZERO_PROBE_EVERY = 64  # while drafting, time depth 0 again after at most this many drafting steps ...
ZERO_PROBE_FIRST = 8  # ... 8 at first, doubling
ZERO_PROBE_STEPS = 8  # ... for this many steps, the first ZERO_COLD_STEPS not timed (and at once where it has never been timed)
ZERO_COLD_STEPS = 4  # depth-0 steps after a drafting one that are not timed: the main model's weights coming back
PRIOR_TRIES = 2.0  # a remembered acceptance weighs as this many tried drafts (the prior of one hit in two as much)
# Prompt tokens the main model may compute again only so that the MTP block catches up (its state lags the
# main cache after plain decoding, `Speculation.reusable`); beyond this the adaptive depth decodes plain.
CATCH_UP_MAX = 256
RETRY_AFTER = 4 * EXPLORE_MAX  # tokens decoded without speculation, once it has settled on depth 0, before a generation tries again


@dataclass
class SpecCounters:
    """What speculation did in one generation (GenerationStats' draft_tokens, accepted_tokens, ...)."""

    draft_tokens: int = 0
    accepted_tokens: int = 0
    steps: int = 0  # verification forwards (depth 0 included)
    depths: Counter[int] = field(default_factory=Counter)

    def record(self, depth: int, accepted: int) -> None:
        self.steps += 1
        self.draft_tokens += depth
        self.accepted_tokens += accepted
        self.depths[depth] += 1

    def into(self, stats: GenerationStats) -> None:
        stats.draft_tokens = self.draft_tokens
        stats.accepted_tokens = self.accepted_tokens
        stats.acceptance_length = round((self.accepted_tokens + self.steps) / self.steps, 4) if self.steps else 0.0
        stats.draft_depths = {int(k): v for k, v in sorted(self.depths.items())}


@dataclass
class StepCosts:
    """The price of one main forward over T tokens and of one MTP block call, in expert-reads (the
    bytes of one routed expert). `fixed`: the always-used weights a forward reads; `layers`: MoE
    layers; `top_k`, `n_experts`; `price`: what reading one more expert costs relative to a resident
    one (1 in RAM; offloaded: hits at 1, misses at the cost model's miss/hit ratio); `draft`: one block call's
    always-used weights, and `draft_experts` its routed experts, priced as the main ones (offloaded with them)."""

    fixed: float
    layers: int
    top_k: int
    n_experts: int
    draft: float
    price: Callable[[], float] = lambda: 1.0
    overlap: float = EXPERT_OVERLAP
    draft_experts: int = 0

    def unique_experts(self, tokens: int) -> float:
        """Experts a layer reads for `tokens` tokens: each token after the first brings (1 - overlap) new ones."""
        return min(float(self.n_experts), self.top_k * (1 + (tokens - 1) * (1 - self.overlap)))

    def verify(self, tokens: int, unit: float | None = None) -> float:
        """One forward over `tokens` tokens; `unit`: price() already read."""
        return self.fixed + self.layers * self.unique_experts(tokens) * (self.price() if unit is None else unit)

    @classmethod
    def of(cls, net: Any, head: MtpHead) -> StepCosts:
        """From the model's config (and its expert backend's cost model where experts are offloaded)."""
        cfg = net.cfg
        h, inter, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
        expert = 3.0 * h * inter
        attn_mlp = 4.0 * h * h + 3.0 * h * max(inter * cfg.n_shared_experts, 1)  # per layer, roughly: attention + shared
        dense = cfg.first_k_dense_replace * 3.0 * h * cfg.intermediate_size
        head_params = float(cfg.vocab_size * h)
        draft_head = float((cfg.vocab_size if head.vocab is None else len(head.vocab)) * h)  # a draft vocabulary's rows only
        fixed = (cfg.num_hidden_layers * attn_mlp + dense + head_params) / expert
        draft = (attn_mlp + 2.0 * h * h + draft_head) / expert  # one layer, eh_proj, head; and its k experts
        return cls(fixed=fixed, layers=len(cfg.moe_layers), top_k=k, n_experts=cfg.n_routed_experts, draft=draft, price=_expert_price(net.experts), draft_experts=k)


def _expert_price(experts: Any) -> Callable[[], float]:
    """An offloaded backend's price of one more expert read, relative to a resident one: a hit costs 1,
    a miss the cost model's miss/hit ratio, weighted by the measured hit rate. 1 for experts in memory."""
    cost = getattr(experts, "cost", None)
    counters = getattr(experts, "counters", None)
    if cost is None or counters is None or not hasattr(cost, "miss_s"):
        return lambda: 1.0
    ratio = cost.miss_s(1) / max(cost.gpu_s(1), 1e-12)

    def price() -> float:
        uses = getattr(counters, "hits", 0) + getattr(counters, "misses", 0)
        hit = getattr(counters, "hits", 0) / uses if uses else 0.5
        return hit + (1 - hit) * ratio

    return price


@dataclass
class DepthPolicy:
    """Chooses each step's draft depth k in 0..max_depth: the k that maximizes expected tokens per step
    sum_{i<=k} a^i over the step's price (verifying k + 1 tokens plus k draft calls), with `a` the
    measured per-token acceptance (decayed counts from a prior of one hit in two). `fixed`: always max.

    The price of a depth is the cost model's (StepCosts, in expert reads) until steps of that depth have
    been timed; then the measured seconds (`observe_time`: what the model's weights cost to read is not
    all a step costs on a CPU, where one decoded token runs through one fused native call and a
    multi-token verification through torch's ops). Depths not timed yet are priced by the model, scaled
    by the nearest timed depth's measured time. Steps are timed in the generating thread's CPU time
    (time.thread_time), so a busy machine's preemptions do not tip the choice. Without timings (a
    seeded generation) the choice is the model's alone.

    A drafting step right after a depth-0 step (or a generation's first) is cold: the block's weights
    have left the caches and it catches up the pairs the depth-0 steps left. That is a price of starting
    to draft, not of drafting, and timed as a depth's price it kept depth 1 from ever looking worth it,
    so the generating loop does not time it, and a probe drafts PROBE_STEPS steps in a row so that its
    later steps are. Likewise the first ZERO_COLD_STEPS depth-0 steps after drafting ones: the wider
    steps' weights took the one-token working set's place in a shared L3 (on a 2-core EPYC one-token
    steps after three-token ones took +20-30% for about five steps, in one process), and timed, they made
    drafting look cheaper than it was. A depth's price is the median of its last
    TIMING_WINDOW timed steps.

    Depth 0 is timed too, as soon as a drafting depth has been and then every 8, 16, ... ZERO_PROBE_EVERY
    drafting steps: priced from a drafting depth's time by the model alone, a CPU whose multi-token steps cost
    more than the model says (an AVX-512 EPYC without AMX: 3 tokens at 2.1x one) kept drafting at half
    of plain decoding's speed, never having seen what a plain step costs.

    `prior`: the prices an earlier process measured on this setup (speculative_prices.py), read as
    proportions: they stand in for the cost model under this process's timings, so the first steps
    already draft where drafting paid then, and not where it did not. Probes still run (at the
    remembered back-off) until this process has timed a drafting depth itself."""

    max_depth: int
    costs: StepCosts | None = None
    fixed: bool = False
    decay: float = 0.97
    hits: float = 1.0
    tries: float = 2.0
    zero_run: int = 0
    seconds: dict[int, float] = field(default_factory=dict)  # depth -> median of its last TIMING_WINDOW step times
    samples: dict[int, deque[float]] = field(default_factory=dict)  # depth -> its last step times
    explore_every: int = EXPLORE_EVERY
    probe_left: int = 0  # steps of the current probe still to draft
    since_zero: int = 0  # drafting steps chosen since the last depth-0 one
    zero_left: int = 0  # depth-0 steps of the current re-timing still to take
    zero_every: int = ZERO_PROBE_FIRST  # drafting steps between depth-0 re-timings (doubling to ZERO_PROBE_EVERY)
    prior: dict[int, float] = field(default_factory=dict)  # depth -> a step's price an earlier process measured (proportions)

    @property
    def acceptance(self) -> float:
        return self.hits / self.tries if self.tries else 0.0

    def _best(self, cap: int) -> tuple[int, float, list[float]]:
        """The depth in 0..cap with the most expected tokens per unit of price at the measured acceptance,
        its rate, and the prices."""
        a, prices = self.acceptance, self._prices(cap)
        best, best_rate, expected = 0, 1.0 / prices[0], 1.0
        for k in range(1, cap + 1):
            expected += a**k
            rate = expected / prices[k]
            if rate > best_rate:
                best, best_rate = k, rate
        return best, best_rate, prices

    def _could_pay(self, prices: list[float], best_rate: float, cap: int) -> bool:
        """Whether a perfect acceptance would make some depth beat the best rate (nothing timed yet: assume so)."""
        return not self.seconds or any((k + 1) / prices[k] > best_rate for k in range(1, cap + 1))

    def settled_off(self) -> bool:
        """Whether drafting has kept not paying: at the measured (or remembered) acceptance and prices no depth
        beats decoding without drafts, and either the probes' back-off is at its longest or not even a perfect
        acceptance would pay (then it never probes). A fixed policy never settles, nor one that has measured
        and remembers nothing."""
        if self.fixed or self.costs is None or self.max_depth == 0 or not (self.seconds or self.prior):
            return False
        best, best_rate, prices = self._best(self.max_depth)
        return best == 0 and (self.explore_every >= EXPLORE_MAX or not self._could_pay(prices, best_rate, self.max_depth))

    def choose(self, budget: int) -> int:
        cap = max(0, min(self.max_depth, budget))
        if self.fixed or self.costs is None or cap == 0:
            return cap
        best, best_rate, prices = self._best(cap)
        if best == 0 and self.probe_left > 0:
            self.probe_left -= 1
            return 1
        if best == 0:
            # Keep measuring now and then (acceptance may have risen), where a perfect acceptance would pay at all.
            # Timed (not a seeded run): only where a perfect acceptance could pay, and backing off.
            self.zero_run += 1
            if self._could_pay(prices, best_rate, cap) and self.zero_run >= self.explore_every:
                self.zero_run = 0
                if self.seconds or self.prior:
                    self.explore_every = min(2 * self.explore_every, EXPLORE_MAX)  # while it keeps not paying
                self.probe_left = PROBE_STEPS - 1
                return 1
        else:
            self.zero_run, self.probe_left = 0, 0
            self.explore_every = EXPLORE_EVERY
            if self._retime_zero():
                return 0
            self.since_zero += 1
            return best
        self.since_zero = 0
        return best

    def _retime_zero(self) -> bool:
        """True where this drafting step should be a depth-0 one instead, to time depth 0: never timed
        while a drafting depth is, or not for `zero_every` drafting steps. Untimed (seeded) runs never."""
        if self.zero_left == 0 and self.seconds and (0 not in self.seconds or self.since_zero >= self.zero_every):
            self.zero_left = ZERO_PROBE_STEPS
            if 0 in self.seconds:
                self.zero_every = min(2 * self.zero_every, ZERO_PROBE_EVERY)
        if self.zero_left == 0:
            return False
        self.zero_left -= 1
        self.since_zero = 0
        return True

    def price(self, k: int) -> float:
        """A step of depth k: measured seconds where timed, else the remembered or cost model's price,
        scaled to seconds by the timed depth nearest k (the deeper one on a tie): where a multi-token
        step costs more than the model says (a small model, compute-bound on the CPU), a timed depth 1
        carries that to depths 2 and 3 instead of their being priced from depth 0's time."""
        return self._prices(k)[k]

    def _prices(self, cap: int) -> list[float]:
        """price(k) for k = 0..cap at once (choose's: once a decoded token, so one pass): the cost model's,
        then the remembered prices' proportions over it, then this process's seconds over that."""
        top = max([cap, *self.seconds, *self.prior])
        return _scaled(self.seconds, _scaled(self.prior, self._models(top)))[: cap + 1]

    def _models(self, top: int) -> list[float]:
        """The cost model's price of a depth-k step for k = 0..top, in expert reads."""
        c = self.costs
        assert c is not None
        unit = c.price()
        return [c.verify(k + 1, unit) + k * (c.draft + c.draft_experts * unit) for k in range(top + 1)]

    def _model(self, k: int) -> float:
        return self._models(k)[k]

    def observe_time(self, depth: int, seconds: float) -> None:
        """A warm step's time (the caller leaves cold ones out). The depth's price is the median of its
        last TIMING_WINDOW: one slow step (the machine's other tenants) does not move it, and a depth
        timed only now and then (depth 0 while drafting pays) is not stuck with an old outlier."""
        window = self.samples.setdefault(depth, deque(maxlen=TIMING_WINDOW))
        window.append(seconds)
        self.seconds[depth] = statistics.median(window)

    def reset(self) -> None:
        """Back to the prior: a seeded generation must not depend on what earlier ones measured."""
        self.hits, self.tries, self.zero_run = 1.0, 2.0, 0
        self.seconds, self.samples, self.explore_every, self.prior = {}, {}, EXPLORE_EVERY, {}
        self.zero_every = ZERO_PROBE_FIRST
        self.probe_left = self.since_zero = self.zero_left = 0

    def remember(self, r: Remembered) -> None:
        """Start from what an earlier process measured on this setup (nothing timed here yet)."""
        self.prior = dict(r.prices)
        self.hits, self.tries = r.acceptance * PRIOR_TRIES, PRIOR_TRIES
        self.explore_every = min(max(r.explore_every, EXPLORE_EVERY), EXPLORE_MAX)

    def remembered(self) -> Remembered | None:
        """What to keep for the next process: the prices of the depths timed here (and of those only
        remembered, in this process's proportions); None where nothing was timed here."""
        if not self.seconds:
            return None
        depths = sorted(set(self.seconds) | set(self.prior))
        return Remembered({k: self.price(k) for k in depths}, round(self.acceptance, 6), self.explore_every)

    def observe(self, depth: int, accepted: int) -> None:
        if depth == 0:
            return
        tried = min(accepted + 1, depth)  # the drafts looked at: every accepted one and the first rejected
        self.hits = self.hits * self.decay + accepted
        self.tries = self.tries * self.decay + tried


def _scaled(table: dict[int, float], base: list[float]) -> list[float]:
    """Per depth k < len(base): table[k] where it has k, else base[k] in the table's units, by the ratio at
    the table's depth nearest k (the deeper one on a tie); base itself for an empty table. (The table's
    depths are all < len(base).)"""
    if not table:
        return base
    out = []
    for k, b in enumerate(base):
        if k in table:
            out.append(table[k])
        else:
            anchor = min(table, key=lambda j: (abs(j - k), -j))
            out.append(table[anchor] * b / base[anchor])
    return out


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, draft: int, sampler: Sampler) -> tuple[int, bool]:
    """Speculative sampling's step: the draft (drawn from q) is kept with probability min(1, p/q), else
    a token is drawn from norm(max(0, p - q)); the result is distributed as p. -> (token, kept)."""
    qd, pd = float(q[draft]), float(p[draft])
    if qd > 0 and sampler.uniform() * qd < pd:
        return draft, True
    residual = (p - q).clamp_min(0)
    return sampler.sample(residual if float(residual.sum()) > 0 else p), False


STREAM_WINDOW = 64  # streams kept for positions the MTP cache already holds: a re-rendered last turn reuses them


class StreamLog:
    """The main model's residual streams of positions start..end-1, as the chunks they came in (appending
    is O(1); a long run of depth-0 steps is not copied over and over): what the MTP block reads. A step
    touches only the chunks at the end (`since`) and the start (`forget_before`), never the whole window."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.start = 0
        self.end = 0

    def reset(self, start: int) -> None:
        self.chunks, self.start, self.end = [], start, start

    def append(self, streams: torch.Tensor) -> None:
        self.chunks.append(streams)
        self.end += streams.shape[1]

    def last(self) -> torch.Tensor:
        return self.chunks[-1][0, -1]

    def since(self, pos: int) -> torch.Tensor:
        """Streams of positions pos..end-1 [1, n, H]: the chunks from the one holding pos on, joined once."""
        at, first = self.end, len(self.chunks)
        while first > 0 and at > pos:
            first -= 1
            at -= self.chunks[first].shape[1]
        if first + 1 < len(self.chunks):
            self.chunks[first:] = [torch.cat(self.chunks[first:], dim=1)]
        return self.chunks[first][:, pos - at :]

    def truncate(self, end: int) -> None:
        """Forget positions from `end` on."""
        if end < self.end:
            self.chunks = [self.since(self.start)[:, : end - self.start]]
            self.end = end

    def forget_before(self, pos: int) -> None:
        """Forget positions before pos: whole chunks dropped, the first one kept sliced (no copy)."""
        while self.chunks and pos > self.start:
            n = self.chunks[0].shape[1]
            if pos - self.start < n:
                self.chunks[0] = self.chunks[0][:, pos - self.start :]
                self.start = pos
                return
            self.chunks.pop(0)
            self.start += n
        if not self.chunks:
            self.start = self.end = max(self.start, pos)


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class DraftState:
    """`Speculation.save_state`: the MTP cache's rows and the stream log, as of one main-cache snapshot."""

    kv: CacheSnapshot | None
    chunks: list[torch.Tensor]
    start: int
    end: int
    first_token: int | None

    @property
    def nbytes(self) -> int:
        return (self.kv.nbytes if self.kv is not None else 0) + tensor_bytes(self.chunks)


class Speculation:
    """A model's MTP head, its KV cache and its depth policy, across generations (the engine holds one)."""

    def __init__(
        self, net: Any, head: MtpHead, max_draft: int = DEFAULT_DRAFT, *, adaptive: bool = True, memory: PriceMemory | None = None
    ) -> None:
        self.net = net
        self.head = head
        self.cache: TokenCache | None = None
        self.first_token: int | None = None  # the token 0 the MTP cache's entries were computed after
        self.log = StreamLog()  # the main model's recent streams: past the MTP cache's entries, and a few before
        self.policy = DepthPolicy(max_draft, StepCosts.of(net, head), fixed=not adaptive)
        self.memory = memory  # the policy's prices kept across processes (speculative_prices.py); None: not kept
        self.skipped = 0  # tokens decoded without speculation since the policy settled on depth 0 (worth_trying)
        self.recalled = False  # whether _recall has read the prices file for the current policy

    @property
    def max_draft(self) -> int:
        return self.policy.max_depth

    def set_draft(self, n: int, adaptive: bool | None = None) -> None:
        if n < 0:
            raise ValueError(f"draft must be 0 or more, got {n}")
        self.policy.max_depth = n
        if adaptive is not None:
            self.policy.fixed = not adaptive

    def save_state(self) -> DraftState:
        """The MTP cache and the kept streams, copied: saved beside the main cache's snapshot (prompt_cache.py),
        whose tokens they were computed for, so a restored prompt drafts at once, without a second prefill."""
        log = self.log
        kv = self.cache.snapshot() if self.cache is not None and self.cache.length else None
        return DraftState(kv, [c.clone() for c in log.chunks], log.start, log.end, self.first_token)

    def load_state(self, state: DraftState, max_tokens: int) -> None:
        """Take back a `save_state` (the engine restores the main cache's rows beside it). `_steps` checks
        both against the next prompt, as it does the state a previous generation left."""
        self.forget()
        if state.kv is not None:
            cache = self._mtp_cache(max_tokens)
            if not cache.accepts(state.kv):  # a file's state for another MTP block: drafting catches up instead
                return
            cache.restore(state.kv, len(state.kv.tokens))
        self.log.chunks = [c.clone() for c in state.chunks]
        self.log.start, self.log.end = state.start, state.end
        self.first_token = state.first_token

    def forget_from(self, pos: int) -> None:
        """The main cache is about to change from position `pos` on without the block (the engine's plain
        loop): keep what stays valid, the MTP entries j whose tokens 0..j+1 lie before `pos` and the streams
        of positions before it. The next speculative generation then recomputes the main model only from
        about `pos` (before, every switch from plain decoding to drafting prefilled the whole prompt again)."""
        if pos <= 0:
            self.forget()
            return
        if self.cache is not None:
            self.cache.truncate(min(self.cache.length, pos - 1))
        log = self.log
        if pos <= log.start:
            log.reset(pos)
        elif pos < log.end:
            log.truncate(pos)

    def forget(self) -> None:
        """Drop the MTP cache's entries and the kept streams (the main cache is about to change without them)."""
        if self.cache is not None:
            self.cache.truncate(0)
        self.log.reset(0)
        self.first_token = None

    def _norm(self, stream: torch.Tensor) -> torch.Tensor:
        return rms_norm(stream, self.net.w.final_norm, self.net.cfg.rms_norm_eps)

    def _mtp_cache(self, max_tokens: int) -> TokenCache:
        if self.cache is None or self.cache.max_tokens != max_tokens:
            self.cache = self.head.new_cache(max_tokens)
        return self.cache

    def _recall(self) -> None:
        """Start the depth policy from the prices kept for this setup, where it has measured nothing yet: the
        file is read once (again only after a seeded run reset the policy), not at every generation."""
        policy, memory = self.policy, self.memory
        if self.recalled or memory is None or policy.fixed or policy.seconds or policy.prior:
            return
        self.recalled = True
        remembered = memory.load()
        if remembered is not None:
            policy.remember(remembered)

    def reusable(self, tokens: list[int], main: int) -> tuple[int, int]:
        """What a speculative generation of `tokens` keeps, without changing anything, where the main cache
        holds `main` of their leading tokens: (the valid MTP entries, the prefix it keeps). MTP entry j holds
        (h_j, t_{j+1}): valid while tokens 0..j+1 are. Past the valid entries the block needs the main
        model's streams: the ones kept from the last generation (valid while tokens 0..j are), then
        recomputed ones, so the main model is run again from where the kept streams end."""
        mcache = self.cache
        valid = 0
        if mcache is not None and main > 0 and tokens[0] == self.first_token:
            valid = min(mcache.common_prefix(tokens[1:]), main)
        log = self.log
        streams_end = log.end if log.start <= valid <= log.end else valid
        return valid, min(main, streams_end)

    def worth_trying(self, sampling: SamplingParams, lost: int = 0) -> bool:
        """Whether a generation should run through speculation at all. Always where the depth is fixed. Never
        for a seeded run with the adaptive depth: a seed must reproduce the whole output, so its depths could
        only come from the cost model, untimed, and where that model is wrong (a small model compute-bound on
        the CPU: the packaged one's seeded decode ran at 0.47x of --no-mtp) every seeded request paid for it;
        the plain loop reproduces the output and is never slower. Otherwise not while the policy has settled on
        depth 0 (`DepthPolicy.settled_off`: measured here or remembered from an earlier process): then the
        engine's plain loop decodes, which costs less than depth-0 steps do (their bookkeeping: 0.91-0.93x
        the speed on the default model), until RETRY_AFTER tokens have gone by; the next generation then
        speculates and probes at once. And not where drafting would first prefill `lost` > CATCH_UP_MAX prompt
        tokens again that the main cache holds (`reusable`): after plain decoding the block's state lags, and
        catching it up used to cost a long conversation its whole prompt."""
        policy = self.policy
        if policy.fixed:
            return True
        if sampling.seed is not None:
            return False
        if lost > CATCH_UP_MAX:  # the block's state lags the main cache (plain decoding ran): not worth a prefill
            return False
        self._recall()
        if not policy.settled_off():
            return True
        if self.skipped < RETRY_AFTER:
            return False
        self.skipped = 0
        policy.zero_run = policy.explore_every  # probe at the first step
        return True

    def count_plain(self, tokens: int) -> None:
        """Tokens the engine decoded without speculation (worth_trying said no): toward the next retry."""
        self.skipped += tokens

    def stream(self, cache: TokenCache, tokens: list[int], *, sampling: SamplingParams, **kw: Any) -> Iterator[int]:
        """The engine's token loop with speculation (`_steps`): yields sampled ids (a stop id too, then
        ends). Unseeded, the depth policy starts from the prices kept for this setup where it has measured
        nothing yet, and what it measured is kept for the next process when the generation ends."""
        policy, memory = self.policy, self.memory
        if sampling.seed is not None:  # the seed reproduces the whole generation: depths included
            policy.reset()
            self.recalled = False
        else:
            self._recall()
        try:
            yield from self._steps(cache, tokens, sampling=sampling, **kw)
        finally:
            if memory is not None and sampling.seed is None and not policy.fixed:
                remembered = policy.remembered()
                if remembered is not None:
                    memory.save(remembered)

    def _steps(
        self,
        cache: TokenCache,
        tokens: list[int],
        *,
        ctx: int,
        max_new_tokens: int,
        sampling: SamplingParams,
        sampler: Sampler,
        stop_ids: set[int] | frozenset[int],
        cancel: threading.Event | None,
        reused: int,
        stats: GenerationStats,
        logits_processor: LogitsProcessor | None = None,
        veto: DraftVeto | None = None,
    ) -> Iterator[int]:
        """`reused`: the prompt's leading tokens the main cache holds (the engine's prefix reuse)."""
        net, device = self.net, self.net.device
        mcache = self._mtp_cache(cache.max_tokens)
        counters = SpecCounters()
        last_k = 0  # the depth of the step before: a step that starts or stops drafting is cold, not timed
        warm = 0  # steps in a row at the same drafting-ness (drafting or not) before this one
        t0 = time.perf_counter()
        clock = {"decode": t0}
        valid, keep = self.reusable(tokens, reused)  # prefix reuse, for the main cache and the block's
        mcache.truncate(valid)
        self.first_token = tokens[0]
        log = self.log
        if not log.start <= valid <= log.end:
            log.reset(valid)
        log.truncate(keep)
        kept_logits = cache.logits_after(len(tokens)) if reused == len(tokens) else None  # the prompt sent again
        cache.truncate(keep)
        stats.cached_prompt_tokens = reused

        def prefill(lo: int, hi: int) -> None:
            for start in range(lo, hi, PREFILL_CHUNK):
                chunk = tokens[start : min(start + PREFILL_CHUNK, hi)]
                log.append(net.residual(torch.tensor([chunk], dtype=torch.long, device=device), cache, start))
                cache.tokens.extend(chunk)

        # Rows the cache held past the kept streams are run again for their streams only, then put back: the
        # prompt's rows are then the ones plain decoding keeps, and so is every token after (in bf16 a row
        # recomputed in another grouping differs in its last bits, which made a series of requests' greedy
        # output differ from --no-mtp's).
        held = [(rows, dim, rows.narrow(dim, keep, reused - keep).clone()) for rows, dim in cache.token_rows()] if keep < reused else []
        prefill(keep, reused)
        for rows, dim, part in held:
            rows.narrow(dim, keep, reused - keep).copy_(part)
        prefill(reused, len(tokens))
        pend_t = tokens[valid + 1 :]  # the token after each pending stream (the last one comes from sampling)
        logits = kept_logits if kept_logits is not None else net.lm_head(self._norm(log.last()))  # sent again: its first run's
        cache.remember_logits(len(tokens), logits)
        logits = logits.float()
        penalize = sampling.repetition_penalty != 1.0
        generated: list[int] = []

        def history(extra: Sequence[int] = ()) -> torch.Tensor | None:
            return torch.tensor(tokens + generated + list(extra), dtype=torch.long, device=device) if penalize else None

        def target(ids: list[int], lg: torch.Tensor) -> torch.Tensor:
            return logits_processor(generated + ids, lg) if logits_processor is not None else lg

        argmax_only = sampling.greedy and logits_processor is None and not penalize  # the sampler's pick is the row's argmax

        def out(tok: int) -> bool:
            """Account one generated token; True when the loop must end after yielding it."""
            generated.append(tok)
            now = time.perf_counter()
            if len(generated) == 1:
                stats.prompt_s = stats.ttft_s = now - t0
                clock["decode"] = now
            else:
                stats.decode_s = now - clock["decode"]
            stats.decode_tokens = len(generated)
            counters.into(stats)
            position = len(tokens) + len(generated) - 1  # where the plain loop would have sampled it
            return tok in stop_ids or position + 1 >= ctx or len(generated) == max_new_tokens

        first = sampler(target([], logits), history())
        end = out(first)
        yield first
        if end:
            return
        pend_t.append(first)
        while True:
            if cancel is not None and cancel.is_set():
                return
            step_t0 = time.thread_time()  # the depth policy's clock: this thread's CPU time, blind to other processes' load
            length = cache.length  # positions 0..length-1 cached; generated[-1] is pending at `length`
            budget = min(max_new_tokens - len(generated) - 1, ctx - length - 2)
            depth = self.policy.choose(budget)
            drafts: list[int] = []
            qs: list[torch.Tensor] = []
            if depth:
                backlog = len(pend_t) - (self.policy.max_depth + 1)  # pairs left by depth-0 steps, past a drafting step's own
                if backlog > 0:  # caught up outside the step's clock: a one-off price of starting to draft, not a depth's
                    t_backlog = time.thread_time()
                    self._catch_up(mcache, log.since(mcache.length)[:, :backlog], pend_t[:backlog])
                    pend_t = pend_t[backlog:]
                    step_t0 += time.thread_time() - t_backlog
                pend_h = log.since(mcache.length)
                drafts, qs, guide = self._draft(mcache, pend_h, pend_t, depth, sampling, sampler, target, argmax_only, history, veto, generated)
                pend_t = []
                log.forget_before(length - STREAM_WINDOW)
                guess = getattr(net.experts, "guess", None)  # an offloaded backend prefetches the drafts' experts
                if guess is not None and drafts:
                    guess(guide[: len(drafts)])
            k = len(drafts)
            ids = [generated[-1], *drafts]
            streams = net.residual(torch.tensor([ids], dtype=torch.long, device=device), cache, length, steps=True)
            cache.tokens.extend(ids)
            all_logits = net.lm_head(self._norm(streams[0])).float()  # each row a decode step's (MoeDecoder.lm_head)
            new: list[int] = []
            if argmax_only:  # the rows' argmaxes at once, as the sampler takes each
                check_finite(all_logits)
                for tok, d in zip(all_logits.argmax(dim=-1).tolist(), [*drafts, None]):
                    new.append(tok)
                    if tok != d:
                        break
            for j in range(k + 1 if not new else 0):
                lg = target(drafts[:j], all_logits[j])
                if j == k:  # every draft accepted: one more token of the main model's own
                    new.append(sampler(lg, history(drafts[:j])))
                    break
                d = drafts[j]
                if sampling.greedy:
                    tok = sampler(lg, history(drafts[:j]))
                    if tok == d:
                        new.append(d)
                        continue
                    new.append(tok)
                    break
                tok, ok = accept_or_resample(sampler.distribution(lg, history(drafts[:j])), qs[j], d, sampler)
                new.append(tok)
                if not ok:
                    break
            accepted = len(new) - 1
            cache.truncate(length + accepted + 1)  # t_L and the accepted drafts; new[-1] is pending
            if mcache.length > length:
                mcache.truncate(length)  # drafted entries: recomputed from the main model's streams next step
            log.append(streams[:, : accepted + 1])
            pend_t.extend(new)
            counters.record(k, accepted)
            self.policy.observe(k, accepted)
            warm = warm + 1 if bool(k) == bool(last_k) else 0
            if sampling.seed is None and warm >= (1 if k else ZERO_COLD_STEPS):  # seeded: the cost model's depths alone (reproducible)
                self.policy.observe_time(k, time.thread_time() - step_t0)
            last_k = k
            for tok in new:
                if cancel is not None and cancel.is_set():
                    return
                end = out(tok)
                yield tok
                if end:
                    return

    def _draft(
        self,
        mcache: TokenCache,
        pend_h: torch.Tensor,
        pend_t: list[int],
        depth: int,
        sampling: SamplingParams,
        sampler: Sampler,
        target: Callable[[list[int], torch.Tensor], torch.Tensor],
        argmax_only: bool,
        history: Callable[[Sequence[int]], torch.Tensor | None],
        veto: DraftVeto | None,
        generated: list[int],
    ) -> tuple[list[int], list[torch.Tensor], torch.Tensor]:
        """Catch the MTP cache up on the pending (stream, token) pairs, then draft up to `depth` tokens,
        chaining the block's own output stream. Returns the drafts, sampling their distributions q, and
        the block's output streams [depth, H] (row j: its stand-in for the main model's last-layer stream
        of the verification's token j; the offload prefetcher's guess). `target` applies the logits
        processor; `argmax_only` (greedy, no processor, no penalty) takes the head's argmax directly."""
        head, device = self.head, pend_h.device
        if argmax_only:
            native = self._draft_native(mcache, pend_h, pend_t, depth, veto, generated)
            if native is not None:
                return native
        g = self._catch_up(mcache, pend_h, pend_t)[:, -1:]
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        guide = [g[0, -1]]
        for j in range(depth):
            if argmax_only:  # the sampler's pick without forming the vocabulary-wide row
                d = head.greedy(g[0, -1])
            else:
                lg = target(drafts, head.logits(g[0, -1]))
                if head.vocab is not None and float(lg.max()) == float("-inf"):  # the processor forbade every token of the draft vocabulary
                    lg = target(drafts, head.logits(g[0, -1], full=True))
                if sampling.greedy:
                    d = sampler(lg, history(drafts))
                else:
                    q = sampler.distribution(lg, history(drafts))
                    d = sampler.sample(q)
                    qs.append(q)
            if veto is not None and veto(generated + drafts, d):
                qs = qs[: len(drafts)]
                break
            drafts.append(d)
            if j + 1 < depth:
                g = head.forward(g, torch.tensor([[d]], dtype=torch.long, device=device), mcache, mcache.length)
                mcache.tokens.append(d)
                guide.append(g[0, -1])
        return drafts, qs, torch.stack(guide)

    def _catch_up(self, mcache: TokenCache, pend_h: torch.Tensor, pend_t: list[int]) -> torch.Tensor:
        """The block over pending (stream, token) pairs (pend_h [1, n, H], n >= 1), in prompt-sized chunks,
        their entries appended to the MTP cache. -> the last chunk's output streams."""
        start, g = mcache.length, None
        for i in range(0, len(pend_t), PREFILL_CHUNK):
            ids = torch.tensor([pend_t[i : i + PREFILL_CHUNK]], dtype=torch.long, device=pend_h.device)
            g = self.head.forward(pend_h[:, i : i + PREFILL_CHUNK], ids, mcache, start + i)
            mcache.tokens.extend(pend_t[i : i + PREFILL_CHUNK])
        assert g is not None
        return g

    def _draft_native(
        self, mcache: TokenCache, pend_h: torch.Tensor, pend_t: list[int], depth: int, veto: DraftVeto | None, generated: list[int]
    ) -> tuple[list[int], list[torch.Tensor], torch.Tensor] | None:
        """`_draft`'s greedy case in one native call (MtpHead.draft_greedy: the catch-up's last up to
        `fused_prefill_max` pairs and every draft; earlier pairs through MtpHead.forward first), with
        the same drafts and streams; None where the native step does not take the call (nothing done).
        A veto looks at the drafts afterwards: those from the refused one on are dropped (their
        cache entries go with the verification's rollback, as a rejected draft's do)."""
        head, start = self.head, mcache.length
        cut = max(0, len(pend_t) - head.block.fused_prefill_max)
        fused = head.fused()
        if fused is None or (cut and not fused.takes(mcache, len(pend_t) - cut)):  # (no cut: draft_greedy says so, before doing anything)
            return None
        if cut:  # a long catch-up (a prompt's pairs): all but its last pairs
            self._catch_up(mcache, pend_h[:, :cut], pend_t[:cut])
        out = head.draft_greedy(pend_h[0, cut:], pend_t[cut:], mcache, start + cut, depth)
        if out is None:
            assert not cut  # `takes` said it would
            return None
        drafts, streams = out
        mcache.tokens.extend(pend_t[cut:])
        mcache.tokens.extend(drafts[: depth - 1])
        T = len(pend_t) - cut
        if veto is not None:
            for j, d in enumerate(drafts):
                if veto(generated + drafts[:j], d):
                    drafts = drafts[:j]
                    break
        return drafts, [], streams[T - 1 : T - 1 + depth]
