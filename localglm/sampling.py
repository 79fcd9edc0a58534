"""Next-token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seed.

Applied in llama.cpp's and transformers' usual order: penalty, temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from .errors import LocalGLMError

# Temperatures below this sample as greedy (vLLM's threshold): dividing logits by 1e-45 overflows
# to inf, and softmax of inf is NaN, while any temperature this small is argmax in all but name.
GREEDY_BELOW = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
# The repetition penalty divides or multiplies float32 logits: at these bounds it already makes a seen
# token certain or impossible, and beyond them it overflows the logits to inf (1e-320: NaN probabilities,
# an IndexError drawing from them) or is a number torch cannot take (10**30). The server's request
# validation uses the same bounds.
REPETITION_PENALTY_RANGE = (1e-3, 1e3)
# What each field accepts, in the words of the error that refuses it (the CLI's names the flag instead).
RANGES = {
    "temperature": "0 or more; 0 is greedy",
    "top_k": "0 or more; 0 is off",
    "top_p": "above 0, at most 1",
    "min_p": "0 or more, below 1",
    "repetition_penalty": f"{REPETITION_PENALTY_RANGE[0]:g} to {REPETITION_PENALTY_RANGE[1]:g}; 1 is off",
    "seed": "an integer from -2**63 to 2**64-1",
}
_INTEGER_FIELDS = ("top_k", "seed")


class NonFiniteLogitsError(LocalGLMError):
    """The model produced NaN or +inf logits (or a logits processor masked every token)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in RANGES:
            value = getattr(self, name)
            if value is None and name == "seed":
                continue
            # bool is an int to Python but never a meant value; a float top_k or seed reaches torch as a
            # TypeError mid-generation, and an int too big for a float (10**400) overflows math.isfinite.
            integer = name in _INTEGER_FIELDS
            if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
                kind = "an integer" if integer else "a number"
                raise LocalGLMError(f"sampling: {name}={_shown(value)} is not {kind} ({RANGES[name]})")
            try:
                value = int(value) if integer else float(value)  # a float field as a float: torch cannot take 10**30
            except OverflowError:
                raise LocalGLMError(f"sampling: {name}={_shown(value)} is out of range ({RANGES[name]})") from None
            object.__setattr__(self, name, value)
        lo, hi = REPETITION_PENALTY_RANGE
        checks = (
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0),
            ("top_k", self.top_k >= 0),
            ("top_p", 0 < self.top_p <= 1),
            ("min_p", 0 <= self.min_p < 1),
            ("repetition_penalty", lo <= self.repetition_penalty <= hi),
            ("seed", self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
        )
        for name, ok in checks:
            if not ok:
                raise LocalGLMError(f"sampling: {name}={_shown(getattr(self, name))} is out of range ({RANGES[name]})")

    @property
    def greedy(self) -> bool:
        """Argmax sampling: temperature 0, or one so small that dividing by it would overflow."""
        return self.temperature < GREEDY_BELOW

    def updated(self, **overrides: object) -> SamplingParams:
        """A copy with the given fields replaced, ignoring None values (unset CLI flags)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_generation_config(cls, model_dir: Path) -> SamplingParams:
        """The checkpoint's recommended defaults (`generation_config.json`), where it has them."""
        path = Path(model_dir) / "generation_config.json"
        base = cls()
        if not path.is_file():
            return base
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return base
        return cls.from_generation_dict(raw)

    @classmethod
    def from_generation_dict(cls, raw: dict[str, Any]) -> SamplingParams:
        """Defaults from generation_config.json's fields (a GGUF's general.sampling.* read back into them)."""
        base = cls()
        if raw.get("do_sample") is False:
            return replace(base, temperature=0.0)
        known = {f.name for f in fields(cls)} - {"seed"}
        picked = {k: raw[k] for k in known if isinstance(raw.get(k), (int, float)) and not isinstance(raw.get(k), bool)}
        try:
            return replace(base, **picked)
        except LocalGLMError:
            return base


def _shown(value: object) -> str:
    """`value` for an error message, short: an integer of 10**400 is not 400 digits (nor, past 4,300
    digits, a ValueError from Python's int-to-string limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**21:
        return f"about {'-' if value < 0 else ''}2**{abs(value).bit_length() - 1}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Sampler:
    """Turns logits into token ids; owns the seeded RNG so a seed reproduces a whole generation."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> int:
        """Pick one token from logits [vocab]; `history` holds the ids seen so far (for the penalty)."""
        logits, top = self._penalized(logits, history)
        if self.params.greedy:
            return int(torch.argmax(logits))
        z = self._scaled(logits, top)
        probs = torch.softmax(z, dim=-1)
        if self.params.top_p < 1.0 or self.params.min_p > 0.0:
            drawn = self._draw_kept(probs)
            if drawn is not None:
                return drawn
            probs, idx = self._filtered(probs, z)
            choice = self.sample(probs)
            return choice if idx is None else int(idx[choice])
        return self.sample(probs)

    def distribution(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """The distribution `__call__` samples from, over the whole vocabulary (float32, sums to 1;
        one-hot at the argmax when greedy): what speculative sampling compares draft and target by."""
        logits, top = self._penalized(logits, history)
        out = torch.zeros_like(logits)
        if self.params.greedy:
            out[int(torch.argmax(logits))] = 1.0
            return out
        probs, idx = self._candidates(logits, top)
        probs = probs / probs.sum()
        return out.copy_(probs) if idx is None else out.index_copy_(0, idx, probs)

    def sample(self, probs: torch.Tensor) -> int:
        """One index drawn in proportion to `probs` (unnormalized, >= 0, some > 0) with this sampler's RNG:
        one uniform against the running sum (inverse CDF). torch.multinomial cost 240 us over 8,192
        entries on one core (it draws a random number per entry), a third of a decoded token of the
        default model; this costs ~15 us, ~150 us over GLM's 151k."""
        return self._inverse_cdf(probs.double().cumsum(0), probs)

    def _inverse_cdf(self, cum: torch.Tensor, probs: torch.Tensor) -> int:
        """The index whose slice of the running sum `cum` (of probs) a uniform draw falls in."""
        u = torch.rand(1, generator=self.generator, dtype=torch.float64, device=self.generator.device) * cum[-1]
        i = int(torch.searchsorted(cum, u, right=True))  # the first entry whose running sum passes u: its prob is > 0
        if i >= cum.numel():  # u rounded up to the total
            i = int(torch.nonzero(probs > 0)[-1])
        return i

    def uniform(self) -> float:
        """One uniform draw in [0, 1) from this sampler's RNG (speculative sampling's accept test)."""
        return float(torch.rand(1, generator=self.generator, device=self.generator.device))

    def _penalized(self, logits: torch.Tensor, history: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """float32 logits after the repetition penalty, and their largest value before it."""
        p = self.params
        logits = logits.float()
        top = check_finite(logits)
        if p.repetition_penalty != 1.0 and history is not None and history.numel():
            seen = torch.unique(history)
            vals = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        return logits, top

    def _candidates(self, logits: torch.Tensor, top: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Temperature, top-k, top-p and min-p: the probabilities to sample from, and their token ids
        when top-p keeps only some (None: probs covers the whole vocabulary)."""
        z = self._scaled(logits, top)
        return self._filtered(torch.softmax(z, dim=-1), z)

    def _scaled(self, logits: torch.Tensor, top: float) -> torch.Tensor:
        """Logits shifted to a maximum of 0 and divided by the temperature, top-k's losers at -inf."""
        p = self.params
        if p.repetition_penalty != 1.0:
            top = float(logits.max())
        z = (logits - top) / p.temperature  # shifted first, so a small temperature cannot overflow to inf
        if p.top_k and p.top_k < z.numel():
            kth = torch.topk(z, p.top_k).values[-1]
            z = z.masked_fill(z < kth, float("-inf"))
        return z

    def _draw_kept(self, probs: torch.Tensor) -> int | None:
        """A draw from `probs` restricted to what top-p and min-p keep, by rejection: draw from the whole
        distribution, keep the token where the filters keep it (top-p: the tokens more probable than it
        total at most top_p; min-p: at least min_p of the most probable), else draw again. Exactly the
        filtered distribution, without listing it (the list took a partial top-k, ~20 torch calls a
        token: a fifth of a decoded token of the default model). None after DRAWS_BEFORE_LISTING
        rejections (min-p can leave a small mass): the caller lists the kept set then."""
        p = self.params
        cum = probs.double().cumsum(0)
        floor = p.min_p * float(probs.max()) if p.min_p > 0.0 else 0.0
        for _ in range(DRAWS_BEFORE_LISTING):
            tok = self._inverse_cdf(cum, probs)
            pt = float(probs[tok])
            if pt < floor:
                continue
            if p.top_p < 1.0 and float(probs.masked_fill(probs <= pt, 0.0).double().sum()) > p.top_p:
                continue
            return tok
        return None

    def _filtered(self, probs: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Top-p and min-p on probs = softmax(z) (`_scaled`'s): the kept probabilities, and their token
        ids where top-p keeps only some (None: probs covers the whole vocabulary)."""
        p = self.params
        idx = None
        if p.top_p < 1.0:
            probs, idx = _top_p(probs, z, p.top_p)
        if p.min_p > 0.0:  # the most probable token is among the candidates: the same threshold either way
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return probs, idx


def check_finite(logits: torch.Tensor) -> float:
    """The largest logit; refuses logits no token can be sampled from: NaN or +inf anywhere, or
    every token at -inf.

    -inf alone is legitimate (a logits processor masking tokens). One max() covers all three
    cases, since torch's max propagates NaN.
    """
    top = float(logits.max())
    if math.isfinite(top):
        return top
    if top == float("-inf"):
        raise NonFiniteLogitsError("every token's logit is -inf: the logits processor left nothing to sample")
    raise NonFiniteLogitsError(
        f"the model produced {'NaN' if math.isnan(top) else 'infinite'} logits: the weights or the config are "
        "broken (NaN or inf weights, a negative rms_norm_eps, a NaN rope base), not the prompt"
    )


DRAWS_BEFORE_LISTING = 8  # rejected draws before the sampler lists the filtered set instead
TOP_FIRST = 256  # top-p's first try: the most probable tokens, usually enough at GLM's temperatures
BINS_PER_UNIT = 16  # top-p's histogram when they are not: bins of 1/16 of a unit of scaled logit ...
BINS = 1024  # ... so the last bin holds every token e^-64 below the most probable one


def _top_p(probs: torch.Tensor, z: torch.Tensor, mass: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p: the smallest set of most probable tokens whose total reaches `mass` (a token is kept
    where the tokens more probable than it total at most `mass`, ties together) -> (their probs, their
    ids); the others' probs are not returned. z: the scaled logits (<= 0) probs is the softmax of.

    No sort of the vocabulary (GLM's 151k entries: ~12 ms on one core, a full top-k as much): first
    the TOP_FIRST most probable; where they fall short of `mass` (a flat distribution), a histogram of
    z's masses finds the bin the boundary falls in; every token in a bin above it is kept, and only that
    bin's tokens are sorted to place the boundary exactly.
    """
    n = probs.numel()
    top, idx = torch.topk(probs, min(TOP_FIRST, n))
    if idx.numel() == n or float(top.sum()) > mass:
        kept_p, kept_i = _cut(top, idx, 0.0, mass)
        if kept_i.numel() < idx.numel() or idx.numel() == n:  # (else the boundary's ties may go on past the first ones)
            return kept_p, kept_i
    bins = (z * -BINS_PER_UNIT).clamp_(0, BINS - 1).long()  # monotone: a more probable token's bin is lower or the same
    weights = probs.double()
    cum = torch.bincount(bins, weights=weights, minlength=BINS).cumsum(0)
    edge = min(int(torch.searchsorted(cum, torch.tensor([mass], dtype=torch.float64, device=cum.device), right=True)), BINS - 1)
    above = float(cum[edge - 1]) if edge else 0.0
    kept = torch.nonzero(bins < edge).flatten()
    inside = torch.nonzero(bins == edge).flatten()
    top_in, order = torch.sort(probs[inside], descending=True)
    p_in, i_in = _cut(top_in, inside[order], above, mass)
    return torch.cat([probs[kept], p_in]), torch.cat([kept, i_in])


def _cut(top: torch.Tensor, idx: torch.Tensor, before: float, mass: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens in descending order, `before` the mass of those more probable still: keep each where the
    tokens more probable than it total at most `mass`. Tied tokens stay or go together (bf16 logits tie
    often), so the kept set does not depend on the order a sort leaves ties in, and is the set
    `_draw_kept` tests a draw against."""
    preceding = torch.cumsum(top.double(), 0) - top.double() + before
    keep = int((preceding <= mass).sum())
    if 0 < keep < top.numel():
        keep += int((top[keep:] == top[keep - 1]).sum())  # the last kept token's ties (next to it: sorted)
    return top[:keep], idx[:keep]
