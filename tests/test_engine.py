"""Generation behaviour: events, stopping, sampling, cancellation, prefix reuse."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import localglm
from localglm.engine import StopStrings
from localglm.sampling import Sampler, SamplingParams
from localglm.chat.stream_parser import ContentDelta

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model(tiny_fp32_dir: Path) -> localglm.Model:
    # fp32, so that batched (prefill) and one-token (decode) math agree to ~1e-7 and greedy
    # choices cannot flip between a prefix-reuse run and a fresh one
    return localglm.load(tiny_fp32_dir)


def _done(events: list) -> localglm.Done:
    assert isinstance(events[-1], localglm.Done)
    assert not any(isinstance(e, localglm.Done) for e in events[:-1])
    return events[-1]


def test_generate_streams_text_and_ends_with_stats(model: localglm.Model) -> None:
    events = list(model.generate("def main():", max_new_tokens=12, sampling=GREEDY, ignore_eos=True))
    done = _done(events)
    text = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert text == done.text
    assert len(done.token_ids) == 12 and done.finish_reason == "length"
    s = done.stats
    assert s.prompt_tokens == len(model.tokenizer.encode("def main():"))
    assert s.decode_tokens == 12 and s.ttft_s > 0 and s.peak_rss_bytes > 0
    assert model.tokenizer.decode(done.token_ids) == done.text


def test_greedy_is_deterministic_and_seed_reproduces(model: localglm.Model) -> None:
    a = model.generate_text("x = ", max_new_tokens=10, sampling=GREEDY, ignore_eos=True)
    b = model.generate_text("x = ", max_new_tokens=10, sampling=GREEDY, ignore_eos=True, reuse_prefix=False)
    assert a == b
    s1 = model.generate_text("x = ", max_new_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    s2 = model.generate_text("x = ", max_new_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    assert s1 == s2


def test_prefix_reuse_gives_same_tokens_and_skips_cached_prompt(model: localglm.Model) -> None:
    ids = model.tokenizer.encode("import os\nimport sys\n\ndef f(x):\n    return x")
    first = list(model.stream_tokens(ids, max_new_tokens=8, sampling=GREEDY, reuse_prefix=False))
    longer = ids + first[:4]
    stats = localglm.GenerationStats()
    reused = list(model.stream_tokens(longer, max_new_tokens=8, sampling=GREEDY, stats=stats))
    fresh = list(model.stream_tokens(longer, max_new_tokens=8, sampling=GREEDY, reuse_prefix=False))
    assert reused == fresh
    # the cache held the prompt and the generated tokens: all but the last prompt token is reused
    assert stats.cached_prompt_tokens == len(longer) - 1


def test_stop_on_eos_id(model: localglm.Model) -> None:
    ids = model.tokenizer.encode("hello")
    free = list(model.stream_tokens(ids, max_new_tokens=6, sampling=GREEDY))
    stop_at = free[2]
    got = list(model.stream_tokens(ids, max_new_tokens=6, sampling=GREEDY, stop_ids={stop_at}))
    assert got == free[: free.index(stop_at) + 1]


def test_stop_string_is_cut_and_not_emitted(model: localglm.Model) -> None:
    full = model.generate_text("def ", max_new_tokens=16, sampling=GREEDY, ignore_eos=True)
    stop = full[5:8]
    assert stop
    events = list(model.generate("def ", max_new_tokens=16, sampling=GREEDY, ignore_eos=True, stop=[stop]))
    done = _done(events)
    assert done.finish_reason == "stop_string"
    assert done.text == full[: full.index(stop)]


def test_stop_strings_hold_back_partial_matches() -> None:
    s = StopStrings(["</end>"])
    out = [s.push(p) for p in ["abc</e", "n", "x", "yz</", "end>tail"]]
    assert "".join(t for t, _ in out) == "abc</enxyz"
    assert out[-1][1] is True


def test_cancel_stops_generation(model: localglm.Model) -> None:
    cancel = threading.Event()
    events = []
    for ev in model.generate("a", max_new_tokens=50, sampling=GREEDY, ignore_eos=True, cancel=cancel):
        events.append(ev)
        if len(events) == 3:
            cancel.set()
    done = _done(events)
    assert done.finish_reason == "cancelled"
    assert len(done.token_ids) < 10


def test_one_generation_at_a_time(model: localglm.Model) -> None:
    gen = model.generate("a", max_new_tokens=5, sampling=GREEDY)
    next(gen)
    with pytest.raises(localglm.LocalGLMError, match="already generating"):
        next(model.generate("b", max_new_tokens=5))
    gen.close()
    assert model.generate_text("b", max_new_tokens=2, sampling=GREEDY)  is not None


def test_chat_generation_renders_template_and_parses(model: localglm.Model) -> None:
    msgs = [{"role": "user", "content": "Write a function."}]
    prompt = model.render_chat(msgs, enable_thinking=False)
    assert prompt.startswith("[gMASK]<sop><|user|>\nWrite a function./nothink")
    events = list(model.generate(messages=msgs, enable_thinking=False, max_new_tokens=8, sampling=GREEDY))
    _done(events)


def test_clear_thinking_false_keeps_earlier_reasoning(tmp_path: Path) -> None:
    """GLM-4.7 / 5.x templates drop earlier turns' reasoning; clear_thinking=False keeps it (preserved thinking)."""
    from localglm.models.glm4_moe.tiny import TinySpec
    from localglm.tiny import make_tiny

    m = localglm.load(make_tiny(tmp_path / "m47", TinySpec(chat_style="glm47")))
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "old plan"}, {"role": "user", "content": "c"}]
    assert "old plan" not in m.render_chat(msgs) and "old plan" in m.render_chat(msgs, clear_thinking=False)
    assert m.encode_chat(msgs, clear_thinking=False).text == m.render_chat(msgs, clear_thinking=False)
    done = _done(list(m.generate(messages=msgs, clear_thinking=False, max_new_tokens=1, sampling=GREEDY)))
    assert done.stats.prompt_tokens == len(m.tokenizer.encode(m.render_chat(msgs, clear_thinking=False)))


def test_prompt_longer_than_context_is_refused(tiny_dir: Path) -> None:
    m = localglm.load(tiny_dir, ctx=8)
    with pytest.raises(localglm.LocalGLMError, match="context is 8"):
        list(m.stream_tokens(list(range(20)), max_new_tokens=1, sampling=GREEDY))


def test_generation_stops_at_context_end(tiny_dir: Path) -> None:
    m = localglm.load(tiny_dir, ctx=10)
    got = list(m.stream_tokens(list(range(5)), max_new_tokens=50, sampling=GREEDY))
    assert len(got) == 5  # prompt 5 + 5 generated fills the 10-token context


def _sample_many(params: SamplingParams, logits: torch.Tensor, n: int = 200) -> set[int]:
    s = Sampler(params)
    return {s(logits) for _ in range(n)}


def test_sampling_filters() -> None:
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0, -2.0])
    assert _sample_many(SamplingParams(temperature=0), logits) == {0}
    assert _sample_many(SamplingParams(temperature=1.0, top_k=2, seed=1), logits) <= {0, 1}
    probs = torch.softmax(logits, 0)
    # top_p just above p0 keeps exactly tokens 0 and 1
    assert _sample_many(SamplingParams(temperature=1.0, top_p=float(probs[0]) + 0.01, seed=2), logits) == {0, 1}
    # min_p 0.3 drops tokens under 0.3 x p0 (token 2 has ~0.13 x p0)
    assert _sample_many(SamplingParams(temperature=1.0, min_p=0.3, seed=3), logits) == {0, 1}
    # repetition penalty lowers a seen token below the next one
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=10.0))
    assert s(logits, torch.tensor([0])) == 1


@pytest.mark.parametrize("vocab,scale,top_p,min_p", [(50, 0.7, 0.8, 0.0), (50, 0.7, 0.8, 0.3), (5000, 0.3, 0.9, 0.0)])
def test_top_p_and_min_p_sample_the_renormalised_distribution(vocab: int, scale: float, top_p: float, min_p: float) -> None:
    """Frequencies against the exact filtered distribution (sort, keep the smallest set reaching
    top_p, drop under min_p x max). 5000 flat logits: thousands of candidates, so the partial
    top-k has to grow past its first guess."""
    torch.manual_seed(vocab)
    logits = torch.randn(vocab) * scale
    probs = torch.softmax(logits, 0)
    srt, order = probs.sort(descending=True)
    keep = ((srt.cumsum(0) - srt) <= top_p) & (srt >= min_p * srt[0])
    want = torch.zeros(vocab)
    want[order[keep]] = srt[keep] / srt[keep].sum()
    s, n = Sampler(SamplingParams(temperature=1.0, top_p=top_p, min_p=min_p, seed=5)), 20000
    got = torch.bincount(torch.tensor([s(logits) for _ in range(n)]), minlength=vocab).float() / n
    assert got[~(want > 0)].sum() == 0  # nothing outside the filtered set
    assert (got - want).abs().max() < 0.01 and int(keep.sum()) > (256 if vocab > 256 else 2)


@pytest.mark.parametrize("vocab,scale", [(300, 0.5), (8192, 0.2), (8192, 3.0), (151552, 0.3), (151552, 4.0)])
@pytest.mark.parametrize("top_p", [0.5, 0.95, 0.999])
def test_top_p_keeps_exactly_the_sorted_rule(vocab: int, scale: float, top_p: float) -> None:
    """The top-p set without sorting the vocabulary (the first 256, else a histogram and the boundary
    bin sorted) is the set the full sort keeps, token for token, with masked (-inf) tokens never in it."""
    from localglm.sampling import _top_p

    torch.manual_seed(vocab + int(scale * 10))
    z = torch.randn(vocab) * scale
    z[torch.randperm(vocab)[: vocab // 10]] = float("-inf")  # a top-k or a grammar's mask
    z = z - z.max()
    probs = torch.softmax(z, 0)
    srt, order = probs.sort(descending=True)
    want = set(order[(srt.double().cumsum(0) - srt.double()) <= top_p].tolist())
    got_p, got_i = _top_p(probs, z, top_p)
    assert set(got_i.tolist()) == want and torch.equal(got_p, probs[got_i])


def test_top_p_keeps_or_drops_tied_tokens_together() -> None:
    """bf16 logits tie often: a tie at the boundary stays or goes as a whole, the same in the listed set
    (distribution) as in the rejection draw (__call__), whatever order a sort leaves the ties in."""
    from localglm.sampling import _top_p

    logits = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, -1.0] * 40)  # 320 tokens, ties everywhere
    z = logits - 2.0
    probs = torch.softmax(z, 0)
    for top_p in (0.05, 0.3, 0.6, 0.9):
        above = torch.tensor([float(probs[probs > q].sum()) for q in probs])
        want = set(torch.nonzero(above <= top_p).flatten().tolist())
        assert set(_top_p(probs, z, top_p)[1].tolist()) == want
        s = Sampler(SamplingParams(temperature=1.0, top_p=top_p, seed=7))
        dist = s.distribution(logits)
        assert set(torch.nonzero(dist).flatten().tolist()) == want
        assert {s(logits) for _ in range(300)} <= want


def test_sample_draws_in_proportion_and_never_a_zero() -> None:
    s = Sampler(SamplingParams(temperature=1.0, seed=3))
    probs = torch.tensor([0.0, 2.0, 0.0, 1.0, 1.0, 0.0])  # unnormalized
    n = 20000
    got = torch.bincount(torch.tensor([s.sample(probs) for _ in range(n)]), minlength=6).float() / n
    assert got[probs == 0].sum() == 0 and (got - probs / probs.sum()).abs().max() < 0.015


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1), dict(top_p=0), dict(min_p=1.5), dict(repetition_penalty=0), dict(top_k=-1),
        # Before: accepted, then a traceback from the sampler. 1e-320 divided the seen tokens' logits to inf
        # (IndexError drawing from NaN probabilities); 10**30 reached torch as an int it cannot convert.
        dict(repetition_penalty=1e-320), dict(repetition_penalty=1e30), dict(repetition_penalty=10**30),
        # OverflowError from math.isfinite inside __post_init__ (an int too big for a float).
        dict(temperature=10**400), dict(repetition_penalty=10**400),
        # TypeError from torch.topk / RuntimeError from manual_seed, mid-generation.
        dict(top_k=1.5), dict(top_k=True), dict(seed=1.5), dict(seed=True), dict(temperature="1"), dict(top_p=True),
    ],
)
def test_bad_sampling_params(bad: dict) -> None:
    (name,) = bad
    with pytest.raises(localglm.LocalGLMError, match=f"^sampling: {name}=") as exc:
        SamplingParams(**bad)
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 200


@pytest.mark.parametrize("penalty", [1e-3, 1e3])
def test_repetition_penalty_at_its_bounds_samples(penalty: float) -> None:
    """The bounds the server and the CLI share still sample: a seen token is made certain or impossible."""
    logits = torch.tensor([30.0, 20.0, -30.0, 0.5])
    history = torch.tensor([0, 2])
    for temperature in (0.0, 1.0):
        s = Sampler(SamplingParams(temperature=temperature, repetition_penalty=penalty, seed=1))
        dist = s.distribution(logits, history)
        assert torch.isfinite(dist).all() and abs(float(dist.sum()) - 1) < 1e-5
        got = {s(logits, history) for _ in range(50)}
        assert got == ({1} if penalty > 1 else {0})


def test_integer_valued_sampling_params_are_numbers() -> None:
    """JSON and Python callers pass 1 for 1.0: the float fields hold floats (torch cannot take 10**30 as an
    int), the integer fields ints."""
    p = SamplingParams(temperature=1, top_p=1, min_p=0, repetition_penalty=2, top_k=3, seed=4)
    assert [type(getattr(p, n)) for n in ("temperature", "top_p", "min_p", "repetition_penalty", "top_k", "seed")] == [float] * 4 + [int] * 2


def test_logits_processor_forces_output(model: localglm.Model) -> None:
    """The hook that constrained decoding (and server tests) use to force a model's tokens."""
    script = model.tokenizer.encode("<think>plan</think>done")

    def force(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(logits, float("-inf"))
        out[script[len(generated)] if len(generated) < len(script) else model.config.eos_token_ids[0]] = 0.0
        return out

    events = list(model.generate(messages=[{"role": "user", "content": "hi"}], logits_processor=force, max_new_tokens=20))
    done = _done(events)
    assert done.finish_reason == "stop"
    thinking = "".join(e.text for e in events if isinstance(e, localglm.ThinkingDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert (thinking, content) == ("plan", "done")
    last_thinking = max(i for i, e in enumerate(events) if isinstance(e, localglm.ThinkingDelta))
    assert all(not isinstance(e, localglm.ThinkingDelta) for e in events[last_thinking + 1 :])
