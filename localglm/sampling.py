"""Next-token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seed.

Applied in llama.cpp's and transformers' usual order: penalty, temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from .errors import LocalGLMError

# Temperatures below this sample as greedy (vLLM's threshold): dividing logits by 1e-45 overflows
# to inf, and softmax of inf is NaN, while any temperature this small is argmax in all but name.
GREEDY_BELOW = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


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
        checks = (
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0),
            ("top_k", self.top_k >= 0),
            ("top_p", 0 < self.top_p <= 1),
            ("min_p", 0 <= self.min_p < 1),
            ("repetition_penalty", math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0),
            ("seed", self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
        )
        for name, ok in checks:
            if not ok:
                raise LocalGLMError(f"sampling: {name}={getattr(self, name)!r} is out of range")

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
        if raw.get("do_sample") is False:
            return replace(base, temperature=0.0)
        known = {f.name for f in fields(cls)} - {"seed"}
        picked = {k: raw[k] for k in known if isinstance(raw.get(k), (int, float)) and not isinstance(raw.get(k), bool)}
        try:
            return replace(base, **picked)
        except LocalGLMError:
            return base


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
        probs, idx = self._candidates(logits, top)
        choice = int(torch.multinomial(probs, 1, generator=self.generator))
        return choice if idx is None else int(idx[choice])

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
        """One token from an unnormalized distribution over the vocabulary, with this sampler's RNG."""
        return int(torch.multinomial(probs, 1, generator=self.generator))

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
        p = self.params
        if p.repetition_penalty != 1.0:
            top = float(logits.max())
        logits = (logits - top) / p.temperature  # shifted first, so a small temperature cannot overflow to inf
        if p.top_k and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        idx = None  # with top-p, probs holds the candidates only, most probable first, and idx their ids
        if p.top_p < 1.0:
            probs, idx = _top_mass(probs, p.top_p)
            cum = torch.cumsum(probs, dim=-1)
            probs[(cum - probs) > p.top_p] = 0.0  # keep the smallest set whose mass reaches top_p
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


def _top_mass(probs: torch.Tensor, mass: float, first: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The most probable tokens, in descending order, until their total passes `mass`.

    A partial top-k instead of sorting the whole vocabulary (GLM's has 151k entries: a full sort
    per token costs milliseconds); it grows until the kept mass exceeds `mass`, so every token left
    out would have been dropped by top-p anyway.
    """
    n, k = probs.numel(), min(first, probs.numel())
    while True:
        top, idx = torch.topk(probs, k)
        if k == n or float(top.sum()) > mass:
            return top, idx
        k = min(n, k * 8)
