"""A grammar as the engine's logits processor: llguidance's token mask applied to each step's logits.

The processor is called with the ids generated so far, in any order the caller likes (speculative
decoding verifies drafted positions, then rolls back): it brings llguidance's matcher to that history
by rolling back to the common prefix and consuming the rest. `on_token` (called by the engine right
after sampling) starts computing the next mask on a helper thread while the model runs its forward
pass (llguidance releases the GIL), so the mask is usually ready when the logits are. `allows` and
`veto` check drafted tokens against the grammar without computing a mask.

Closure: with `max_new_tokens` known, from CLOSE_WINDOW tokens before the end the processor measures
how many tokens a greedy closing policy (end-of-sequence if allowed; else a token that only closes:
`"`, `]`, `}` or a closing GLM tag; else the shortest allowed token) needs to finish, and switches
to that policy for every step where the tokens left are at most about twice that, so a reply that would
have been cut by max_tokens ends as valid output instead. Output that could end where it is (free text
beside tools, a closed JSON document) is not ended early: it runs on to the limit, unless the policy was
already closing at the step before (then its end-of-sequence follows). Before that point, a token that
would open more than the tokens left can close (a `,` starting one more array item with required keys:
one token can lengthen the closure from 3 to 17) is refused: over the window, each allowed token that may
open something (vocab.opening, a few per step) is looked ahead through. It is best effort: a schema whose
smallest valid document is longer than the tokens left still ends at max_tokens, unfinished, with
finish_reason "length".
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ..errors import LocalGLMError
from .spec import GrammarError
from .vocab import GrammarVocab, _llguidance

CLOSE_WINDOW = 96  # closure is considered over the last this many tokens of max_new_tokens
# Closing starts while the tokens left are at most twice the closure's length plus this: one sampled
# token can lengthen the closure a lot (a new array item with required keys), so leave room for one.
CLOSE_SLACK = 8
MAX_LOOKAHEAD = 32  # allowed opening tokens looked ahead through per step (more: mid free text, where none is risky)
_NEG_INF = float("-inf")


def error_line(matcher: object) -> str:
    """llguidance's error, first line only (the rest is its internal state: not for a client)."""
    text = (matcher.get_error() or "").strip()  # type: ignore[attr-defined]
    first = text.splitlines()[0] if text else "unknown error"
    return "no text matches the grammar from here (NoExtensionBias)" if first.startswith("NoExtensionBias") else first


class GrammarProcessor:
    """Logits processor holding generation to a Lark grammar (see spec.output_grammar)."""

    def __init__(self, vocab: GrammarVocab, grammar: str, *, max_new_tokens: int | None = None, prefetch: bool = True) -> None:
        llg = _llguidance()
        self.vocab = vocab
        self.grammar = grammar
        self.matcher = llg.LLMatcher(vocab.ll, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"grammar: {error_line(self.matcher)}")
        self.max_new_tokens = max_new_tokens
        self.consumed: list[int] = []  # the history the matcher is at
        self.dead: tuple[int, int] | None = None  # (position, token) of a token the grammar refused
        self._bits = np.empty(vocab.words, dtype=np.int32)
        self._pending: Future[np.ndarray] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._prefetch = prefetch

    # ---- matcher state ----------------------------------------------------------------------------
    def _sync(self, history: Sequence[int]) -> None:
        """Bring the matcher to `history` (rollback to the common prefix, then consume the rest)."""
        self._wait()
        have = self.consumed
        n = min(len(have), len(history))
        keep = 0
        while keep < n and have[keep] == history[keep]:
            keep += 1
        if keep < len(have):
            if not self.matcher.rollback(len(have) - keep):
                raise LocalGLMError(f"grammar: rollback failed: {error_line(self.matcher)}")
            del have[keep:]
        if self.dead is not None:
            pos, tok = self.dead
            if pos != len(have) or pos >= len(history) or history[pos] != tok:
                self.dead = None
        if self.dead is None and len(history) > len(have):
            new = [int(t) for t in history[len(have) :]]
            took = self.matcher.try_consume_tokens(new)
            if self.matcher.is_error():
                raise LocalGLMError(f"grammar: the output cannot continue: {error_line(self.matcher)}")
            have.extend(new[:took])
            if took < len(new):
                self.dead = (len(have), new[took])

    def mask_of(self, matcher: object) -> np.ndarray:
        """The allowed-token mask at another matcher's state (a `deep_copy` of this one's)."""
        return self._compute(matcher)

    def _compute(self, matcher: object | None = None) -> np.ndarray:
        """The allowed-token mask [vocab] (numpy bool) at the matcher's state.

        numpy, not torch: torch splits a 151k-element operation across its intra-op threads, and on a
        busy machine one late thread makes the operation take milliseconds (measured: 50 ms at load 5
        on 2 cores); these few single-threaded passes take tens of microseconds."""
        bits = np.empty_like(self._bits) if matcher is not None else self._bits
        (matcher or self.matcher).unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        if matcher is None and self.matcher.is_error():  # a client's grammar that no text can follow from here
            raise LocalGLMError(f"grammar: the output cannot continue: {error_line(self.matcher)}")
        return np.unpackbits(bits.view(np.uint8), bitorder="little")[: self.vocab.vocab_size].view(np.bool_)

    def _wait(self) -> np.ndarray | None:
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def allowed(self, history: Sequence[int]) -> np.ndarray:
        """Bool mask [vocab] (numpy) of the tokens the grammar allows after `history`."""
        if self._pending is not None and list(history) == self.consumed and self.dead is None:
            ready = self._wait()
            assert ready is not None
            return ready
        self._sync(history)
        if self.dead is not None:  # a refused (drafted) token: only ending is left, and it is discarded anyway
            mask = np.zeros(self.vocab.vocab_size, dtype=np.bool_)
            mask[self.vocab.stop_ids] = True
            return mask
        return self._compute()

    # ---- the engine's seams -----------------------------------------------------------------------
    def __call__(self, history: list[int], logits: torch.Tensor) -> torch.Tensor:
        mask = self.allowed(history)
        if self.max_new_tokens is not None and self.dead is None:
            left = self.max_new_tokens - len(history)
            # a function of the history alone (no state carried between calls), so speculative
            # verification, which calls in any order, sees what the plain loop sees
            if left <= CLOSE_WINDOW:
                mask = self._within(mask, left)
        return apply_mask(logits, mask)

    def on_token(self, history: list[int]) -> None:
        """The engine sampled history[-1]: start the next mask while the model computes the logits."""
        if not self._prefetch:
            return
        self._sync(history)
        if self.dead is not None or self.matcher.is_stopped():
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="localglm-grammar")
            weakref.finalize(self, self._executor.shutdown, wait=False)
        self._pending = self._executor.submit(self._compute)

    def allows(self, history: Sequence[int], tokens: Sequence[int]) -> int:
        """How many of `tokens` (e.g. drafted ones), in order, the grammar accepts after `history`."""
        self._sync(history)
        if self.dead is not None:
            return 0
        return int(self.matcher.validate_tokens([int(t) for t in tokens]))

    def veto(self, history: list[int], token: int) -> bool:
        """speculative.DraftVeto: True when the grammar refuses `token` after `history`."""
        return self.allows(history, [token]) == 0

    @property
    def accepting(self) -> bool:
        """Whether the output so far is complete (the grammar would let it end here)."""
        return self.dead is None and self.matcher.is_accepting()

    # ---- closure ----------------------------------------------------------------------------------
    def _closing(self, left: int) -> bool:
        """Whether the closing policy decides the step with `left` tokens left: a closure is needed and
        takes about half of them, or none is needed because the policy closed the structure at the step
        before (its end-of-sequence comes next). A function of the history alone, as `__call__` must be."""
        need = self._closure_length(left)
        if need:
            return 2 * need + CLOSE_SLACK >= left
        # complete here: free text (tools offered, none called) or a closed document runs on to the limit
        if left + 1 > CLOSE_WINDOW or not self.consumed:
            return False
        m = self.matcher.deep_copy()
        if not m.rollback(1):
            return False
        before = self._closure_length(left + 1, m)
        return before > 0 and 2 * before + CLOSE_SLACK >= left + 1

    def _within(self, mask: np.ndarray, left: int) -> np.ndarray:
        """`mask` narrowed so the output can still close in the `left` tokens left (this one included):
        the closing policy's token alone once the closure needs about half of them, else the allowed
        tokens less those after which the closure would not fit in the tokens then left."""
        if self._closing(left):
            only = np.zeros_like(mask)
            only[self._closer(mask)] = True
            return only
        risky = np.flatnonzero(mask & self.vocab.opening)
        if not len(risky) or len(risky) > MAX_LOOKAHEAD:
            return mask
        out = mask.copy()
        for t in risky:
            m = self.matcher.deep_copy()
            # after t, left - 1 tokens remain: the closure and the end-of-sequence token must fit
            if not m.consume_token(int(t)) or self._closure_length(left - 2, m) > left - 2:
                out[t] = False
        if not out.any():
            out[self._closer(mask)] = True
        return out

    def _closer(self, mask: np.ndarray) -> int:
        """The greedy closing policy's token among the allowed ones."""
        stops = [t for t in self.vocab.stop_ids if mask[t]]
        if stops:
            return stops[0]
        lengths = self.vocab.token_lengths
        closing = mask & self.vocab.closing
        if closing.any():
            return int(np.where(closing, lengths, -1).argmax())
        return int(np.where(mask, lengths, np.iinfo(np.int32).max).argmin())

    def _closure_length(self, limit: int, matcher: object | None = None) -> int:
        """Tokens the closing policy needs before end-of-sequence is allowed, from the matcher's state or
        `matcher`'s (which it advances); limit + 1: more than limit."""
        m = matcher if matcher is not None else self.matcher.deep_copy()
        stops = self.vocab.stop_ids
        for n in range(limit + 1):
            mask = self._compute(m)
            if any(mask[t] for t in stops):
                return n
            if not mask.any() or not m.consume_token(self._closer(mask)):
                break
        return limit + 1


def apply_mask(logits: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """`logits` with the tokens `mask` refuses at -inf (a new tensor; numpy on the CPU, see `_compute`:
    16-bit floats are handled as their bit patterns, so no torch conversion runs either)."""
    if logits.device.type == "cpu" and logits.dim() == 1:
        if logits.dtype == torch.float32:
            return torch.from_numpy(np.where(mask, logits.numpy(), np.float32(_NEG_INF)))
        if logits.dtype in (torch.bfloat16, torch.float16):
            neg_inf = torch.tensor(_NEG_INF, dtype=logits.dtype).view(torch.int16).item()
            bits = np.where(mask, logits.view(torch.int16).numpy(), np.int16(neg_inf))
            return torch.from_numpy(bits).view(logits.dtype)
    return logits.masked_fill(~torch.from_numpy(mask).to(logits.device), _NEG_INF)
