"""benchmarks/llama_mtp_peer.py: the greedy speculative loop that drives llama.cpp's MTP contexts, run on a
stand-in engine (no llama_cpp needed): its output is plain greedy decoding's, every (token, h) row it hands
the MTP block is the one the block must see at that position, and both caches are rolled back exactly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peer():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("llama_mtp_peer", ROOT / "benchmarks" / "llama_mtp_peer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["llama_mtp_peer"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("llama_mtp_peer", None)


VOCAB = 50
CHAINED = -1.0  # the stand-in block's output rows: what a chained draft must hand back


def next_token(seq: list[int]) -> int:
    """The stand-in main model: a deterministic function of the last two tokens."""
    return (seq[-1] * 7 + (seq[-2] if len(seq) > 1 else 3) * 3 + 1) % VOCAB


def hidden(seq: list[int], p: int) -> float:
    """The stand-in main model's h at position p: identifies the prefix seq[: p + 1]."""
    return float(hash(tuple(seq[: p + 1])) % 100003)


class StandIn:
    """Two KV caches that check every decode continues them; the block drafts the main model's token,
    but the `wrong_every`-th draft position of each step is wrong (so rejections and rollbacks happen)."""

    def __init__(self, wrong_every: int) -> None:
        self.wrong_every = wrong_every
        self.reset()

    def reset(self) -> None:
        self.seq: list[int] = []  # the main model's cache: position i holds seq[i]
        self.mtp: list[tuple[int, float]] = []  # the block's cache: position i + 1 holds mtp[i]
        self.chain = 0

    def target(self, tokens, pos):  # type: ignore[no-untyped-def]
        assert pos == len(self.seq), f"main model decode at {pos}, cache holds {len(self.seq)}"
        self.seq.extend(tokens)
        ids = np.array([next_token(self.seq[: pos + i + 1]) for i in range(len(tokens))])
        h = np.array([[hidden(self.seq, pos + i)] for i in range(len(tokens))])
        return ids, h

    def draft(self, tokens, pos, h):  # type: ignore[no-untyped-def]
        assert pos == len(self.mtp) + 1, f"MTP decode at {pos}, cache holds positions 1..{len(self.mtp)}"
        assert len(tokens) == len(h)
        for i, (t, row) in enumerate(zip(tokens, h)):
            p = pos + i
            if row[0] == CHAINED:  # a chained draft: its own previous output, one row
                assert len(tokens) == 1
            else:  # (t_p, h_{p-1}) of the sequence the main model holds
                assert p - 1 < len(self.seq) and row[0] == hidden(self.seq, p - 1), f"wrong h at MTP position {p}"
                assert p >= len(self.seq) or t == self.seq[p], f"wrong token at MTP position {p}"
            self.mtp.append((t, row[0]))
        self.chain = self.chain + 1 if h[-1][0] == CHAINED else 0
        guess = next_token([self.seq[0], *(t for t, _ in self.mtp)])  # the main model's token after the last row
        wrong = (self.chain + 1) % self.wrong_every == 0
        return (guess + 1) % VOCAB if wrong else guess, np.array([CHAINED])

    def trim(self, target_end: int, draft_end: int) -> None:
        assert target_end <= len(self.seq) and draft_end <= len(self.mtp) + 1
        del self.seq[target_end:]
        del self.mtp[draft_end - 1 :]


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
@pytest.mark.parametrize("wrong_every", [1, 2, 3, 100])
@pytest.mark.parametrize("new", [1, 2, 7, 30])
def test_speculative_output_is_plain_greedy(peer, depth: int, wrong_every: int, new: int) -> None:  # type: ignore[no-untyped-def]
    engine = StandIn(wrong_every)
    prompt = [5, 11, 2, 40, 9]
    plain = peer.greedy_plain(engine, prompt, new, peer.Run(0))
    assert len(plain) == new
    assert plain == [next_token(prompt + plain[:i]) for i in range(new)]
    run = peer.Run(depth)
    assert peer.greedy_speculative(engine, prompt, new, depth, run) == plain
    assert run.decode_tokens == new - 1
    assert run.accepted <= run.drafted <= depth * run.steps
    assert sum(run.depths.values()) == run.steps and sum(d * n for d, n in run.depths.items()) == run.drafted
    assert run.accepted + run.steps >= new - 1  # each step gives its accepted drafts and one token of its own
    if wrong_every == 1:  # every first draft wrong: nothing accepted, one token a step
        assert run.accepted == 0 and run.steps == new - 1
    if wrong_every == 100 and new == 30:  # every draft right: depth + 1 tokens a step
        assert run.accepted == run.drafted and run.steps == -(-(new - 1) // (depth + 1))


def test_prenorm_direction_gives_the_stream_back_to_a_norm(peer) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 64)).astype(np.float32) * 7
    w_final, w_next = rng.uniform(0.5, 2.0, 64).astype(np.float32), rng.uniform(0.5, 2.0, 64).astype(np.float32)

    def rms_norm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w

    handed = rms_norm(h, w_final)  # what llama.cpp hands over: the stream after the final norm
    assert np.allclose(rms_norm(peer.prenorm_direction(handed, w_final), w_next), rms_norm(h, w_next), atol=1e-4)
    assert not np.allclose(rms_norm(handed, w_next), rms_norm(h, w_next), atol=1e-2)


def test_measure_reports_every_depth_against_plain(peer) -> None:  # type: ignore[no-untyped-def]
    prompts = [[5, 11, 2, 40, 9], [1, 2, 3], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7]]
    result = peer.measure(StandIn(3), prompts, 12, [1, 2, 4], rounds=2)
    assert result["tokens"] == [peer.greedy_plain(StandIn(3), p, 12, peer.Run(0)) for p in prompts]
    assert [row["draft"] for row in [result["plain"], *result["spec"]]] == [0, 1, 2, 4]
    for row in result["spec"]:
        assert row["same_as_plain"] == len(prompts) and row["decode_tokens"] == 3 * 11 and row["tok_cpu_s"] > 0
        assert row["per_step"] == (row["accepted"] + row["steps"]) / row["steps"] > 1  # the third draft of a step is wrong
