"""The model's vocabulary as llguidance sees it, built once per loaded model."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property

import numpy as np

from ..chat.tokenizer import Tokenizer
from ..errors import LocalGLMError

# Characters that only ever close what JSON (or a GLM argument value) has open: a token made of
# these and whitespace moves toward the end of the output (closure when tokens run low).
CLOSING_CHARS = frozenset(b'"]} \n')
CLOSING_TAGS = ("</think>", "</arg_key>", "</arg_value>", "</tool_call>")
# Bytes with which a token may open something that needs many tokens to close (a new array item or
# object member, a nested value, a GLM tag): near max_tokens, closure checks these tokens one by one.
OPENING_CHARS = frozenset(b",{[:<")


def _llguidance():  # noqa: ANN202 - the module
    try:
        import llguidance
    except ImportError as exc:  # a broken install: it is a declared dependency
        raise LocalGLMError("constrained decoding needs the llguidance package: pip install llguidance") from exc
    return llguidance


class GrammarVocab:
    """llguidance's tokenizer for one model (the tokenizer.json the engine encodes with, the model's
    vocabulary size, its stop ids as end-of-sequence), plus per-token facts closure needs."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: Iterable[int]) -> None:
        llg = _llguidance()
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = sorted(set(stop_ids))
        if not self.stop_ids:
            raise LocalGLMError("constrained decoding needs the model's end-of-sequence ids (eos_token_id)")
        self.ll = llg.LLTokenizer(tokenizer._backend.to_str(), n_vocab=vocab_size, eos_token=self.stop_ids)
        self.words = (vocab_size + 31) // 32  # int32 words of a bitmask

    def token_id(self, text: str) -> int | None:
        return self.tokenizer.token_to_id(text)

    @cached_property
    def opening(self) -> np.ndarray:
        """Tokens that may lengthen what is left to close (special tokens, or text with one of
        OPENING_CHARS), as a bool mask: the only ones closure has to look ahead through."""
        out = np.zeros(self.vocab_size, dtype=np.bool_)
        for i in range(self.vocab_size):
            out[i] = self.ll.is_special_token(i) or bool(set(self.ll.decode_bytes([i])) & OPENING_CHARS)
        return out

    @cached_property
    def token_lengths(self) -> np.ndarray:
        """Bytes per token (special tokens count as long, so closure never picks one by length)."""
        out = np.empty(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            out[i] = 1000 if self.ll.is_special_token(i) else len(self.ll.decode_bytes([i]))
        return out

    @cached_property
    def closing(self) -> np.ndarray:
        """Tokens that only close: GLM's closing tags, and tokens made of closing characters (with at
        least one of `"`, `]`, `}`), as a bool mask."""
        out = np.zeros(self.vocab_size, dtype=np.bool_)
        for tag in CLOSING_TAGS:
            tag_id = self.token_id(tag)
            if tag_id is not None and tag_id < self.vocab_size:
                out[tag_id] = True
        for i in range(self.vocab_size):
            if self.ll.is_special_token(i):
                continue
            raw = self.ll.decode_bytes([i])
            out[i] = bool(raw) and set(raw) <= CLOSING_CHARS and bool(set(raw) & set(b'"]}'))
        return out
