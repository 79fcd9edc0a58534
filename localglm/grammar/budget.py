"""Thinking budgets (Anthropic `thinking.budget_tokens`, OpenAI `reasoning_effort`), and chaining processors.

`ThinkingBudget` counts the tokens of the open thinking block and, at the budget, allows only
`</think>`: the model then goes on to its answer. It works on the ids alone (GLM's `<think>` and
`</think>` are single special tokens), so it needs no grammar and composes with one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]

# OpenAI reasoning_effort -> thinking tokens (None: unbounded; "none" turns thinking off instead).
EFFORT_BUDGETS: dict[str, int | None] = {"minimal": 256, "low": 1024, "medium": 4096, "high": None}


class ThinkingBudget:
    def __init__(self, budget: int, open_id: int, close_id: int, *, start_in_thinking: bool) -> None:
        if budget < 0:
            raise ValueError(f"thinking budget must be 0 or more, got {budget}")
        self.budget, self.open_id, self.close_id = budget, open_id, close_id
        self.start_in_thinking = start_in_thinking

    def thinking_tokens(self, history: Sequence[int]) -> int | None:
        """Tokens written in the thinking block so far, or None when no block is open."""
        start = 0 if self.start_in_thinking else None
        if start is None:
            if self.open_id not in history:
                return None
            start = list(history).index(self.open_id) + 1
        if self.close_id in history[start:]:
            return None
        return len(history) - start

    def __call__(self, history: list[int], logits: torch.Tensor) -> torch.Tensor:
        n = self.thinking_tokens(history)
        if n is None or n < self.budget:
            return logits
        out = torch.full_like(logits, float("-inf"))
        out[self.close_id] = 0.0
        return out


class Chain:
    """Processors applied in order; the engine's extra seams (on_token, veto) reach those that have them."""

    def __init__(self, processors: Sequence[LogitsProcessor]) -> None:
        self.processors = list(processors)

    def __call__(self, history: list[int], logits: torch.Tensor) -> torch.Tensor:
        for p in self.processors:
            logits = p(history, logits)
        return logits

    def on_token(self, history: list[int]) -> None:
        for p in self.processors:
            hook = getattr(p, "on_token", None)
            if hook is not None:
                hook(history)

    def veto(self, history: list[int], token: int) -> bool:
        return any(getattr(p, "veto", None) is not None and p.veto(history, token) for p in self.processors)


def chain(*processors: LogitsProcessor | None) -> LogitsProcessor | None:
    """One processor applying the given ones (None entries skipped) in order; None when there are none."""
    real = [p for p in processors if p is not None]
    if not real:
        return None
    return real[0] if len(real) == 1 else Chain(real)
