"""One request's logits processor: its grammar (JSON, tool calls) and thinking budget, from plain facts."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from .budget import ThinkingBudget, chain
from .processor import GrammarProcessor, error_line
from .spec import CUSTOM_INPUT, GrammarError, InputGrammar, OutputSpec, ToolGrammar, output_grammar
from .vocab import GrammarVocab

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


def _compile(vocab: GrammarVocab, spec: OutputSpec, max_new_tokens: int | None) -> GrammarProcessor | None:
    grammar = output_grammar(spec)
    return GrammarProcessor(vocab, grammar, max_new_tokens=max_new_tokens) if grammar is not None else None


def thinking_mode(prompt_text: str | None, vocab: GrammarVocab) -> str:
    """How the output may think: "open" (the prompt ends in `<think>`), "none" (a raw prompt, thinking
    turned off: the prompt ends in `</think>`, or a tokenizer without the tags), else "optional"."""
    if prompt_text is None or vocab.token_id("<think>") is None or vocab.token_id("</think>") is None:
        return "none"
    tail = prompt_text.rstrip()
    if tail.endswith("</think>"):
        return "none"
    return "open" if tail.endswith("<think>") else "optional"


def probe_inputs(processor: GrammarProcessor, thinking: str, tools: ToolGrammar) -> None:
    """Walk a copy of the matcher to the start of each custom tool's input and ask for the first mask there.

    A client grammar can compile and still be unusable: one with no finite derivation (`start: start`), or a
    regex whose lexer llguidance gives up building inside the whole grammar (`a{1000000}`). Found here, that
    is a 400 naming the tool's definition before anything is generated, not an error halfway through a
    streamed reply. A prefix the matcher does not take (no such path in this request's grammar) probes nothing."""
    if tools.mode == "none":
        return
    lead = "</think>" if thinking == "open" else ""
    for name, fmt in tools.formats.items():
        if tools.mode == "named" and name != tools.name:
            continue
        ids = processor.vocab.tokenizer.encode(f"{lead}<tool_call>{name}\n<arg_key>{CUSTOM_INPUT}</arg_key>\n<arg_value>")
        matcher = processor.matcher.deep_copy()
        if matcher.try_consume_tokens(ids) != len(ids) or matcher.is_error():
            continue
        processor.mask_of(matcher)
        if matcher.is_error():
            raise fmt.unusable(error_line(matcher))
    # Walking into an input builds its lexer, which the copies share: one too large to build (a{1000000}; fine
    # alone, past llguidance's limit beside the request's own rules) leaves the whole grammar unusable from its
    # start, even where the walk did not get in. Found here it is the 400 the client's definition earns.
    start = processor.matcher.deep_copy()
    processor.mask_of(start)
    if start.is_error():
        if len(tools.formats) == 1:
            raise next(iter(tools.formats.values())).unusable(error_line(start))
        raise GrammarError(f"tools: the custom tools' grammars cannot be followed together: {error_line(start)}", "tools")


def request_processor(
    vocab: GrammarVocab,
    *,
    prompt_text: str | None,
    json_schema: Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_mode: str = "auto",
    tool_name: str | None = None,
    single_tool_call: bool = False,
    tool_grammar: bool = True,
    tool_formats: Mapping[str, InputGrammar] | None = None,
    thinking_budget: int | None = None,
    max_new_tokens: int | None = None,
) -> LogitsProcessor | None:
    """The processor enforcing what a request asks (None when it asks nothing that needs one).

    `prompt_text` is the rendered chat prompt (None for raw prompts: no thinking block, no tools).
    Tools are held to GLM's format only with `tool_grammar` (the server's --no-tool-grammar turns it
    off), except that tool_choice "required" / named and custom tools' input grammars (`tool_formats`,
    by tool name) can only be enforced by the grammar.
    """
    mode = thinking_mode(prompt_text, vocab)
    tg = None
    formats = dict(tool_formats or {})
    if tools and prompt_text is not None and (tool_grammar or tool_mode in ("required", "named") or formats):
        tg = ToolGrammar(tools, tool_mode, tool_name, single_tool_call, formats=formats)
    spec = OutputSpec(thinking=mode, json_schema=json_schema, tools=tg)
    try:
        processor = _compile(vocab, spec, max_new_tokens)
    except GrammarError:
        for fmt in formats.values():  # only now, each alone: a client's grammar that does not compile is named
            fmt.check()
        if tg is None:
            raise
        # a tool schema the engine cannot compile: keep the call's structure, type the values loosely
        processor = _compile(vocab, replace(spec, tools=replace(tg, loose=True)), max_new_tokens)
    if processor is not None and tg is not None:
        probe_inputs(processor, spec.thinking, tg)
    budget = None
    if thinking_budget is not None and mode != "none":
        open_id, close_id = vocab.token_id("<think>"), vocab.token_id("</think>")
        if open_id is None or close_id is None:
            raise GrammarError("thinking budget: this tokenizer has no <think> / </think> tokens")
        budget = ThinkingBudget(thinking_budget, open_id, close_id, start_in_thinking=mode == "open")
    return chain(processor, budget)
