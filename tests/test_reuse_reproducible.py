"""A prompt sent again gets the same greedy reply, and speculation gives plain decoding's tokens across a series
of requests (the default model, bf16, prompts past the 128 tokens the native path prefills: their first chunk
runs through torch's GEMMs, whose sums are grouped otherwise than a one-token step's, so a row computed again
differs in its last bits).

Before: the same request sent twice gave another reply (its last token was recomputed natively), and drafting
(MTP) recomputed a few reused rows for the block's streams, so across a series of requests its greedy output
moved away from --no-mtp's (found by a client sweep of the server). A prompt that extends a cached one is still
prefilled from the cached rows, which a fresh prefill would sum otherwise (README, prefix reuse)."""

from __future__ import annotations

import pytest
import torch

import localglm
from localglm.default_model import default_model_path
from localglm.layers.kv_cache import TokenCache
from localglm.sampling import SamplingParams
from localglm.stats import GenerationStats

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(temperature=0)
LONG = [{"role": "user", "content": "Write a Python function that parses a CSV file and returns a list of dicts, with error "
         "handling and docstrings. Explain each step in detail, then show usage examples with several files. " * 8}]  # fmt: skip
SHORT = [{"role": "user", "content": "hi"}]


def _reply(model: localglm.Model, messages: list[dict[str, str]]) -> tuple[list[int], int]:
    done = list(model.generate(messages=messages, temperature=0, max_new_tokens=60, enable_thinking=False))[-1]
    return done.token_ids, done.stats.cached_prompt_tokens


@pytest.fixture(scope="module")
def plain() -> localglm.Model:
    return localglm.load(default_model_path(), mtp=False)


def test_the_same_prompt_again_gives_the_same_reply(plain: localglm.Model) -> None:
    prompt = len(plain.encode_chat(LONG, enable_thinking=False).ids)
    assert prompt > 128  # the torch path's chunk
    first, _ = _reply(plain, LONG)
    again, cached = _reply(plain, LONG)
    assert cached == prompt  # its last token's logits were kept, not recomputed
    assert again == first
    _reply(plain, SHORT)  # another prompt overwrites the rows: the kept logits go with them
    _, cached = _reply(plain, LONG)
    assert cached < prompt


def test_a_series_of_requests_drafts_plain_decodings_tokens() -> None:
    """Speculation keeps the rows plain decoding keeps: a series of requests gives --no-mtp's tokens."""
    series = [LONG, LONG, SHORT, LONG]
    replies = {}
    for mtp in (False, True):
        model = localglm.load(default_model_path(), mtp=mtp, **({"draft": 2, "draft_fixed": True} if mtp else {}))
        replies[mtp] = [_reply(model, m) for m in series]
    assert replies[True] == replies[False]


def test_kept_logits_go_with_their_rows() -> None:
    cache = TokenCache(16)
    cache.tokens = [1, 2, 3, 4]
    cache.remember_logits(4, torch.arange(3.0))
    assert torch.equal(cache.logits_after(4), torch.arange(3.0)) and cache.logits_after(3) is None
    cache.tokens += [5, 6]
    cache.truncate(4)  # rows 0..3 stay
    assert cache.logits_after(4) is not None
    cache.truncate(3)
    assert cache.logits_after(4) is None
    cache.tokens = [1, 2, 3, 4]
    assert cache.logits_after(4) is None  # the same tokens written again are new rows: not the kept numbers


def test_stats_count_the_whole_prompt_as_cached(plain: localglm.Model) -> None:
    ids = plain.encode_chat(LONG, enable_thinking=False).ids
    stats = GenerationStats()
    list(plain.stream_tokens(ids, max_new_tokens=2, sampling=GREEDY))
    list(plain.stream_tokens(ids, max_new_tokens=2, sampling=GREEDY, stats=stats))
    assert stats.cached_prompt_tokens == stats.prompt_tokens == len(ids)
