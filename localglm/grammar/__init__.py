"""Constrained decoding: JSON mode, JSON schemas, GLM tool calls that cannot break, thinking budgets,
custom tools' input grammars.

The grammar engine is llguidance (what llama.cpp and vLLM use): `vocab.GrammarVocab` wraps the
model's tokenizer once, `spec` writes the Lark grammar one request needs (the whole assistant
output: an optional thinking block, then JSON, text and/or tool calls in GLM's XML format),
`processor.GrammarProcessor` turns it into the engine's per-token logits processor (with the next
mask computed while the model runs, drafted-token checks for speculative decoding, and closure when
tokens run low), and `budget.ThinkingBudget` closes `</think>` at a token budget.
"""

from __future__ import annotations

from .budget import ThinkingBudget, chain
from .processor import GrammarProcessor
from .spec import (
    CUSTOM_INPUT,
    GrammarError,
    InputGrammar,
    OutputSpec,
    ToolGrammar,
    output_grammar,
    parse_input_format,
    parse_response_format,
)
from .vocab import GrammarVocab

__all__ = [
    "CUSTOM_INPUT",
    "GrammarError",
    "GrammarProcessor",
    "GrammarVocab",
    "InputGrammar",
    "OutputSpec",
    "ThinkingBudget",
    "ToolGrammar",
    "chain",
    "output_grammar",
    "parse_input_format",
    "parse_response_format",
]
