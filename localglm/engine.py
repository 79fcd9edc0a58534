"""The engine: a loaded model that computes logits and streams generations.

`Model.generate` is the one generation API the CLI, the TUI and the server use. It prefills the
prompt in chunks (reusing the KV cache of the previous request's longest common prefix), decodes
token by token, samples, stops on the model's end-of-turn ids or on stop strings, and yields typed
events: thinking, content and tool-call deltas from the chat stream parser, then `Done` with stats.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import ModelConfig
from .errors import LocalGLMError
from .layers.kv_cache import TokenCache
from .models.arch import DecoderModel
from .models.mtp import MtpHead
from .prompt_cache import PromptCache, SavedPrompt
from .sampling import Sampler, SamplingParams
from .speculative import DEFAULT_DRAFT, Speculation
from .speculative_prices import PriceMemory
from .stats import GenerationStats, peak_rss_bytes
from .chat.stream_parser import ChatStreamParser, ContentDelta
from .chat.tokenizer import IncrementalDecoder, Tokenizer

if TYPE_CHECKING:
    from .grammar import GrammarVocab

log = logging.getLogger("localglm")
PREFILL_CHUNK = 512
# With a prompt cache on disk (--cache-dir): where the tokens no file there holds would take this long to compute
# again (at the rate this request's prompt computed), the live cache is written there at once, in the background,
# not only when RAM lets it go or the server stops, so a crash or a kill does not lose them. An agent's turn
# after a long saved prefix computes little and is not written again for it.
WRITE_PROMPT_AFTER_S = 30.0

# (ids generated so far in this request, next-token logits [vocab]) -> logits to sample from.
# Constrained decoding, grammars and tests that force a model's output all plug in here.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


class PromptTooLong(LocalGLMError):
    """The prompt does not fit the context; `exact` is False when `tokens` is a lower bound from its length."""

    def __init__(self, tokens: int, ctx: int, *, exact: bool = True) -> None:
        self.tokens, self.ctx, self.exact = tokens, ctx, exact
        super().__init__(f"prompt is {'' if exact else 'at least '}{tokens} tokens, the context is {ctx}: raise --ctx or shorten it")


@dataclass(frozen=True)
class EncodedChat:
    """A conversation rendered by the chat template and tokenized (`Model.encode_chat`)."""

    text: str
    ids: list[int]


@dataclass
class Done:
    """The last event of every generation."""

    finish_reason: str  # "stop" (end-of-turn id), "stop_string", "length", "cancelled"
    stats: GenerationStats
    text: str = ""  # the whole generated text as the model wrote it (tags included)
    token_ids: list[int] = field(default_factory=list)


def reused_rows(cache: TokenCache, tokens: list[int], held: int) -> int:
    """How many of the prompt's leading rows a generation keeps when the cache holds `held` of its tokens: all
    but the last, recomputed for its logits, unless the cache kept the logits of exactly this prompt (sent
    again): then all of it, so the reply goes on from its first run's numbers."""
    if held >= len(tokens) and cache.holds_logits_after(len(tokens)):
        return len(tokens)
    return min(held, len(tokens) - 1)


class Model:
    """A loaded GLM model. Build it with `localglm.load(path, ...)`."""

    def __init__(
        self,
        path: Path,
        config: ModelConfig,
        net: DecoderModel,
        tokenizer: Tokenizer | None,
        *,
        ctx: int,
        sampling: SamplingParams,
        mtp: MtpHead | None = None,
        draft: int = DEFAULT_DRAFT,
        draft_fixed: bool = False,
        prices: PriceMemory | None = None,
        setup: str | None = None,
    ) -> None:
        self.path = path
        # What the numbers this model computes depend on (files, config, dtype, device, processor, load options,
        # the code's version): saved prompts on disk are kept per setup (prompt_disk.py). None: not from a checkpoint.
        self.setup = setup
        self.config = config
        self.net = net
        self.tokenizer = tokenizer
        self.ctx = ctx
        self.default_sampling = sampling
        self._cache: TokenCache | None = None
        # Prompts set aside for conversations that take turns (prompt_cache.py); None: only the live cache is reused.
        self.prompt_cache: PromptCache | None = None
        self._lock = threading.Lock()
        self.last_stats: GenerationStats | None = None
        # Speculative decoding with the checkpoint's MTP head (speculative.py); None without one.
        self.speculation = Speculation(net, mtp, draft, adaptive=not draft_fixed, memory=prices) if mtp is not None else None

    @property
    def device(self) -> torch.device:
        return self.net.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    # ---- constrained decoding (localglm/grammar) ----------------------------------------------
    @cached_property
    def grammar_vocab(self) -> GrammarVocab:
        """The vocabulary as the grammar engine sees it (built on first use, ~0.1-1 s)."""
        from .grammar import GrammarVocab

        return GrammarVocab(self._need_tokenizer(), self.config.vocab_size, self.stop_token_ids())

    def constrained(
        self,
        *,
        prompt_text: str | None,
        response_format: Mapping[str, Any] | None = None,
        thinking_budget: int | None = None,
        max_new_tokens: int | None = None,
        **tools: Any,
    ) -> LogitsProcessor | None:
        """The logits processor for an OpenAI-style `response_format`, a thinking budget and tools
        (grammar.build.request_processor's tool arguments); None when none of them constrains."""
        from .grammar import parse_response_format
        from .grammar.build import request_processor

        schema = parse_response_format(response_format)
        if schema is None and thinking_budget is None and not tools.get("tools"):
            return None
        return request_processor(
            self.grammar_vocab, prompt_text=prompt_text, json_schema=schema, thinking_budget=thinking_budget,
            max_new_tokens=max_new_tokens, **tools,
        )  # fmt: skip

    # ---- math ------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full forward without a cache: input_ids [B, T] -> float32 logits [B, T, vocab]."""
        if input_ids.dim() != 2:
            raise LocalGLMError(f"logits: input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        ids = input_ids.to(self.device)
        return self.net.lm_head(self.net.hidden_states(ids)).float()

    # ---- prompts ---------------------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise LocalGLMError(f"{self.path}: no tokenizer.json, so text prompts cannot be encoded")
        return self.tokenizer

    def render_chat(
        self, messages: Sequence[dict[str, Any]], *, tools: list[dict] | None = None, enable_thinking: bool | None = None,
        clear_thinking: bool | None = None,
    ) -> str:
        """The prompt text for a conversation, rendered by the checkpoint's own chat template (`encode_chat`'s)."""
        extra = {} if clear_thinking is None else {"clear_thinking": clear_thinking}
        return self._need_tokenizer().apply_chat_template(
            list(messages), tools=tools, add_generation_prompt=True, enable_thinking=enable_thinking, **extra
        )

    def check_length(self, chars: int) -> None:
        """Refuse a prompt of `chars` characters that cannot fit the context, before tokenizing it.

        Each token covers at most `tokenizer.max_token_chars` characters, so the prompt has at
        least chars / max_token_chars tokens; a tokenizer without that bound lets everything pass.
        """
        bound = self.tokenizer.max_token_chars if self.tokenizer is not None else None
        if bound and chars > (self.ctx - 1) * bound:
            raise PromptTooLong(math.ceil(chars / bound), self.ctx, exact=False)

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: list[dict] | None = None,
        enable_thinking: bool | None = None,
        parse_special_tokens: bool = False,
        fit: bool = True,
        clear_thinking: bool | None = None,
    ) -> EncodedChat:
        """Render and tokenize a conversation. Special-token text in user, system and tool content
        stays text unless `parse_special_tokens` (see `Tokenizer.render_prompt`). With `fit`, a prompt
        whose length alone shows it cannot fit the context raises PromptTooLong before tokenizing.
        `clear_thinking=False` keeps the reasoning of earlier turns in the prompt (GLM-4.7 and GLM-5.x's
        "preserved thinking"; their templates drop it by default); None leaves the template's default."""
        tok = self._need_tokenizer()
        extra = {} if clear_thinking is None else {"clear_thinking": clear_thinking}
        prompt = tok.render_prompt(list(messages), tools, True, enable_thinking, parse_special_tokens=parse_special_tokens, **extra)
        if fit:
            self.check_length(len(prompt.text))
        return EncodedChat(prompt.text, tok.encode_prompt(prompt))

    def encode_text(self, text: str, *, fit: bool = True) -> list[int]:
        """Token ids of a raw prompt (special tokens in it parsed: the caller writes the whole prompt)."""
        tok = self._need_tokenizer()
        if fit:
            self.check_length(len(text))
        return tok.encode(text)

    def stop_token_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        if not ids and self.tokenizer is not None:
            ids.update(self.tokenizer.stop_token_ids)
        return ids

    # ---- token loop ------------------------------------------------------------------------
    def _cache_for(self, prompt_len: int) -> TokenCache:
        if prompt_len >= self.ctx:
            raise PromptTooLong(prompt_len, self.ctx)
        if self._cache is None:
            self._cache = self.net.new_cache(self.ctx)
        return self._cache

    def _bring_saved_prefix(self, cache: TokenCache, tokens: list[int], stats: GenerationStats) -> int:
        """Before `tokens` are prefilled: restore the saved prompt sharing the longest prefix with them where
        it beats the live cache's, and save the live cache first where the prompt would overwrite much of it
        (prompt_cache.py). The MTP block's state travels with the main cache's rows. Returns how many leading
        tokens of `tokens` the cache then holds."""
        store, spec = self.prompt_cache, self.speculation
        assert store is not None
        live = cache.common_prefix(tokens)
        found, n = store.longest_prefix(tokens)
        restoring = found is not None and n > live
        keep_live = None
        if (restoring or store.worth_saving(cache.length, live)) and cache.length >= store.min_tokens and not store.covers(cache.tokens):
            keep_live = self._live_prompt(cache)
        saved = store.bring(found) if restoring and found is not None else None  # a file on disk is read here
        if saved is not None and not cache.accepts(saved.kv):
            store.drop(saved, found)  # a file of another layout (a setup the key did not tell apart): prefilled instead
            saved = None
        if saved is not None:
            cache.restore(saved.kv, n)
            if spec is not None:
                if saved.draft_state is not None:
                    spec.load_state(saved.draft_state, cache.max_tokens)
                else:
                    spec.forget()
            store.touch(saved, n)
            stats.restored_prompt_tokens = n
        if keep_live is not None:
            store.put(keep_live)
        return n if saved is not None else live

    def _live_prompt(self, cache: TokenCache) -> SavedPrompt:
        """A copy of the live cache's rows, and the MTP block's state computed beside them."""
        spec = self.speculation
        return SavedPrompt(cache.snapshot(), spec.save_state() if spec is not None else None)

    def keep_prompts(self, wait_s: float = 30.0) -> int:
        """Write the live cache and the prompts saved in RAM to the prompt cache's disk (`serve --cache-dir`),
        for the next start; the server calls it when stopping. A generation still running after `wait_s`
        keeps the live cache out (its rows are changing). Returns the files written."""
        store = self.prompt_cache
        if store is None or store.disk is None:
            return 0
        live = None
        if self._lock.acquire(timeout=wait_s):
            try:
                cache = self._cache
                if cache is not None and cache.length >= store.min_tokens:
                    live = self._live_prompt(cache)
            finally:
                self._lock.release()
        return store.persist(live)

    def _prefill(self, cache: TokenCache, tokens: list[int], keep: int, stats: GenerationStats) -> torch.Tensor:
        """Run the prompt past its first `keep` tokens (held by the cache) through the model; return the last
        position's logits (kept by the cache: the whole prompt held again, `keep` is all of it)."""
        cache.truncate(keep)
        stats.cached_prompt_tokens = keep
        if keep == len(tokens):
            kept = cache.logits_after(keep)
            assert kept is not None, "reuse of a whole prompt needs its kept logits (reused_rows)"
            return kept
        hidden = None
        for start in range(keep, len(tokens), PREFILL_CHUNK):
            chunk = tokens[start : start + PREFILL_CHUNK]
            ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
            hidden = self.net.hidden_states(ids, cache, start)
            cache.tokens.extend(chunk)
        assert hidden is not None
        logits = self.net.lm_head(hidden[0, -1])
        cache.remember_logits(len(tokens), logits)
        return logits

    def stream_tokens(
        self,
        input_ids: Sequence[int],
        *,
        max_new_tokens: int,
        sampling: SamplingParams,
        stop_ids: set[int] | frozenset[int] = frozenset(),
        cancel: threading.Event | None = None,
        reuse_prefix: bool = True,
        stats: GenerationStats | None = None,
        logits_processor: LogitsProcessor | None = None,
    ) -> Iterator[int]:
        """Yield sampled token ids (a stop id is yielded too, then the loop ends)."""
        stats = stats if stats is not None else GenerationStats()
        try:
            yield from self._stream(input_ids, max_new_tokens, sampling, stop_ids, cancel, reuse_prefix, stats, logits_processor)
        finally:
            try:
                self._write_costly_prompt(stats)
            except (MemoryError, RuntimeError, OSError) as exc:  # the copy or the disk said no: the reply stands
                log.warning("the live cache could not be set aside for --cache-dir (%s); it is written at exit or when RAM lets it go", exc)

    def _write_costly_prompt(self, stats: GenerationStats) -> None:
        """With a prompt cache on disk: the live cache written there in the background (a copy is taken now) where
        its tokens that no file holds would take WRITE_PROMPT_AFTER_S or more to compute again, at the rate this
        request computed its prompt."""
        store, cache = self.prompt_cache, self._cache
        computed = stats.prompt_tokens - stats.cached_prompt_tokens
        if store is None or store.disk is None or cache is None or stats.prompt_s <= 0 or computed <= 0 or cache.length < store.min_tokens:
            return
        _, on_disk = store.disk.longest_prefix(cache.tokens)
        if (cache.length - on_disk) * stats.prompt_s / computed >= WRITE_PROMPT_AFTER_S:
            live = self._live_prompt(cache)
            store.disk.save(live.kv, live.draft_state)

    def _stream(self, input_ids: Sequence[int], max_new_tokens: int, sampling: SamplingParams, stop_ids: set[int] | frozenset[int],
                cancel: threading.Event | None, reuse_prefix: bool, stats: GenerationStats,
                logits_processor: LogitsProcessor | None) -> Iterator[int]:
        """stream_tokens' generation."""
        tokens = [int(t) for t in input_ids]
        if not tokens:
            raise LocalGLMError("the prompt is empty")
        if any(t < 0 or t >= self.config.vocab_size for t in tokens):
            raise LocalGLMError(f"prompt holds token ids outside the vocabulary (0..{self.config.vocab_size - 1})")
        cache = self._cache_for(len(tokens))
        sampler = Sampler(sampling, self.device)
        stats.prompt_tokens = len(tokens)
        # The prompt's leading tokens the cache holds and prefill keeps (all but the last, recomputed for its
        # logits): worked out once here, a pass over the prompt, and handed to what needs it.
        held = 0
        if reuse_prefix and self.prompt_cache is not None:
            with torch.inference_mode():  # the MTP block's cache is made in inference mode
                held = self._bring_saved_prefix(cache, tokens, stats)
        elif reuse_prefix:
            held = cache.common_prefix(tokens)
        reused = reused_rows(cache, tokens, held)
        spec = self.speculation
        if spec is not None and spec.max_draft > 0 and spec.worth_trying(sampling, lost=reused - spec.reusable(tokens, reused)[1]):
            with torch.inference_mode():
                yield from spec.stream(
                    cache, tokens, ctx=self.ctx, max_new_tokens=max_new_tokens, sampling=sampling, sampler=sampler, stop_ids=stop_ids,
                    cancel=cancel, reused=reused, stats=stats, logits_processor=logits_processor,
                    veto=getattr(logits_processor, "veto", None),  # a grammar refuses drafts outright
                )  # fmt: skip
            return
        if spec is not None:  # this run changes the main cache behind the MTP block's back, from the reused prefix on
            spec.forget_from(reused)
        history = torch.tensor(tokens, dtype=torch.long, device=self.device)
        generated: list[int] = []
        try:
            on_token = getattr(logits_processor, "on_token", None)
            t0 = time.perf_counter()
            with torch.inference_mode():
                logits = self._prefill(cache, tokens, reused, stats)
                for step in range(max_new_tokens):
                    if cancel is not None and cancel.is_set():
                        return
                    if logits_processor is not None:
                        logits = logits_processor(generated, logits)
                    tok = sampler(logits, history if sampling.repetition_penalty != 1.0 else None)
                    generated.append(tok)
                    if on_token is not None:
                        on_token(generated)  # a grammar starts the next mask during the forward pass
                    now = time.perf_counter()
                    if step == 0:
                        stats.prompt_s = stats.ttft_s = now - t0
                        t_decode = now
                    else:
                        stats.decode_s = now - t_decode
                    stats.decode_tokens = step + 1
                    yield tok
                    if tok in stop_ids or cache.length + 1 >= self.ctx or step + 1 == max_new_tokens:
                        return
                    logits = self.net.next_token_logits(tok, cache, cache.length)
                    cache.tokens.append(tok)
                    if sampling.repetition_penalty != 1.0:
                        history = torch.cat([history, torch.tensor([tok], dtype=torch.long, device=self.device)])
        finally:
            if spec is not None and spec.max_draft > 0:
                spec.count_plain(len(generated))  # toward speculation's next try (Speculation.worth_trying)

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict[str, Any]] | None = None,
        chat: EncodedChat | None = None,
        input_ids: Sequence[int] | None = None,
        max_new_tokens: int = 512,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        enable_thinking: bool | None = None,
        clear_thinking: bool | None = None,
        tools: list[dict] | None = None,
        cancel: threading.Event | None = None,
        reuse_prefix: bool = True,
        logits_processor: LogitsProcessor | None = None,
        parse_special_tokens: bool = False,
        response_format: Mapping[str, Any] | None = None,
        thinking_budget: int | None = None,
        tool_grammar: bool = True,
        **sampling_overrides: Any,
    ) -> Iterator[Any]:
        """Stream events for one of: a raw `prompt`, chat `messages` (or the same already encoded
        by `encode_chat`, as `chat`), or raw `input_ids`.

        With `messages` or `chat`, the output is split into ThinkingDelta / ContentDelta / ToolCall*
        events; otherwise every piece of text is a ContentDelta. The last event is always `Done`.
        `parse_special_tokens` lets special-token text in message content become special tokens.
        `clear_thinking=False` keeps earlier turns' reasoning in the prompt (`encode_chat`).
        `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema":
        ...}}) holds the output to JSON; `thinking_budget` closes the thinking block after that many
        tokens; with `tools` and `tool_grammar`, tool calls are held to GLM's format (localglm/grammar).
        """
        if sum(x is not None for x in (prompt, messages, chat, input_ids)) != 1:
            raise LocalGLMError("generate: give exactly one of prompt, messages, chat or input_ids")
        if max_new_tokens < 1:
            raise LocalGLMError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        params = (sampling or self.default_sampling).updated(**sampling_overrides)
        if messages is not None:
            chat = self.encode_chat(messages, tools=tools, enable_thinking=enable_thinking, parse_special_tokens=parse_special_tokens,
                                    clear_thinking=clear_thinking)  # fmt: skip
        if chat is not None:
            ids = chat.ids
        elif prompt is not None:
            ids = self.encode_text(prompt)
        else:
            ids = list(input_ids)
        start_in_thinking = chat is not None and chat.text.rstrip().endswith("<think>")
        if response_format is not None or thinking_budget is not None or (tools and tool_grammar):
            from .grammar import chain

            grammar = self.constrained(
                prompt_text=chat.text if chat is not None else None, response_format=response_format,
                thinking_budget=thinking_budget, max_new_tokens=max_new_tokens, tools=tools if tool_grammar else None,
            )  # fmt: skip
            logits_processor = chain(logits_processor, grammar)
        if not self._lock.acquire(blocking=False):
            raise LocalGLMError("this model is already generating; one generation at a time")
        try:
            yield from self._generate_locked(
                ids, chat is not None, start_in_thinking, tools, max_new_tokens, params, stop, ignore_eos, cancel, reuse_prefix, logits_processor
            )
        finally:
            self._lock.release()

    def _generate_locked(
        self,
        ids: list[int],
        chat: bool,
        start_in_thinking: bool,
        tools: list[dict] | None,
        max_new_tokens: int,
        params: SamplingParams,
        stop: Sequence[str],
        ignore_eos: bool,
        cancel: threading.Event | None,
        reuse_prefix: bool,
        logits_processor: LogitsProcessor | None,
    ) -> Iterator[Any]:
        stats = GenerationStats()
        stop_ids = set() if ignore_eos else self.stop_token_ids()
        decoder = IncrementalDecoder(self.tokenizer) if self.tokenizer is not None else None
        parser = ChatStreamParser(start_in_thinking=start_in_thinking, tools=tools) if chat else None
        stopper = StopStrings(stop)
        out_ids: list[int] = []
        text_parts: list[str] = []
        finish = "length"

        def emit(piece: str) -> list[Any]:
            if not piece:
                return []
            text_parts.append(piece)
            return parser.feed(piece) if parser else [ContentDelta(piece)]

        for tok in self.stream_tokens(
            ids,
            max_new_tokens=max_new_tokens,
            sampling=params,
            stop_ids=stop_ids,
            cancel=cancel,
            reuse_prefix=reuse_prefix,
            stats=stats,
            logits_processor=logits_processor,
        ):
            if tok in stop_ids:
                finish = "stop"
                break
            out_ids.append(tok)
            piece = decoder.feed(tok) if decoder else ""
            piece, hit = stopper.push(piece)
            yield from emit(piece)
            if hit:
                finish = "stop_string"
                break
        else:
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
        if finish != "stop_string":
            tail = decoder.finish() if decoder else ""
            piece, _ = stopper.push(tail)
            yield from emit(piece + stopper.flush())
        if parser:
            yield from parser.finish()
        stats.finish_reason = finish
        stats.peak_rss_bytes = peak_rss_bytes()
        snapshot = getattr(self.net.experts, "stats_snapshot", None)  # offloaded backend counters
        if snapshot is not None:
            stats.backend = snapshot()
        self.last_stats = stats
        yield Done(finish_reason=finish, stats=stats, text="".join(text_parts), token_ids=out_ids)

    def generate_text(self, prompt: str | None = None, **kwargs: Any) -> str:
        """Convenience: run `generate` and return the generated text."""
        done = None
        for event in self.generate(prompt, **kwargs):
            done = event
        assert isinstance(done, Done)
        return done.text


class StopStrings:
    """Cuts a text stream at the first stop string, holding back only what could begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return piece, False
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
