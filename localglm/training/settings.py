"""Checks of the training commands' settings: a bad flag is a one-line error naming it, before a corpus
is built or a model loaded (and never a traceback, a NaN model or a checkpoint of zero steps)."""

from __future__ import annotations

import math
from typing import Any


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _finite(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def require_at_least(cfg: Any, minimums: dict[str, float]) -> None:
    """Each named field is a finite number no smaller than its minimum."""
    for name, low in minimums.items():
        v = getattr(cfg, name)
        if not _finite(v) or v < low:
            raise ValueError(f"{_flag(name)} {v}: must be a number of at least {low:g}")


def require_positive(cfg: Any, names: tuple[str, ...]) -> None:
    """Each named field is a finite number above 0 (learning rates, clipping norms)."""
    for name in names:
        v = getattr(cfg, name)
        if not _finite(v) or v <= 0:
            raise ValueError(f"{_flag(name)} {v}: must be a finite number above 0")


def require_fraction(cfg: Any, names: tuple[str, ...]) -> None:
    """Each named field is a share between 0 and 1."""
    for name in names:
        v = getattr(cfg, name)
        if not _finite(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{_flag(name)} {v}: must be between 0 and 1")


def require_choice(cfg: Any, name: str, choices: tuple[str, ...]) -> None:
    v = getattr(cfg, name)
    if v not in choices:
        raise ValueError(f"{_flag(name)} {v!r}: expected one of {', '.join(choices)}")


def require_finite_loss(value: float, step: int, what: str) -> None:
    """Training stops, writing nothing more, when its loss stops being a number (diverged)."""
    if not math.isfinite(value):
        raise ValueError(f"{what}: the loss is {value} at step {step} (diverged); try a lower --lr")
