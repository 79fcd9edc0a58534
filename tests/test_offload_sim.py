"""Routing traces, eviction policies and the cache simulator (Belady's optimum on hand-made traces)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from localglm.cli import main
from localglm.errors import LocalGLMError
from offload.policies import LFUDecay, LRU, StatGuided, make_policy
from offload.simulator import capacity_for, compare, simulate
from offload.trace import Trace, TraceCall, TraceRecorder


def single_layer(seq: list[int], n_experts: int = 8) -> Trace:
    tr = Trace(n_experts, 1, [0], expert_bytes=100)
    tr.calls = [TraceCall(i, 0, np.array([[e]])) for i, e in enumerate(seq)]
    return tr


def test_belady_and_lru_textbook_counts() -> None:
    # The classic reference string: with 3 frames OPT faults 7 times, LRU 10 times.
    tr = single_layer([1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5])
    opt = simulate(tr, 3, "belady")
    assert (opt.misses, opt.hits) == (7, 5)
    assert simulate(tr, 3, "lru").misses == 10
    assert opt.bytes_moved == 7 * 100
    # With 4 frames OPT faults 6 times; with one frame every change of page is a fault.
    assert simulate(tr, 4, "belady").misses == 6
    assert simulate(tr, 1, "belady").misses == 12


def test_belady_respects_experts_in_use_together() -> None:
    # Two experts per call (one layer, top-2), capacity 2: both experts of a call are in use, so a
    # call with two new experts always misses twice. Calls: {0,1} {0,2} {0,1} {2,3} {0,1}
    tr = Trace(4, 2, [5], expert_bytes=1)
    for i, pair in enumerate([(0, 1), (0, 2), (0, 1), (2, 3), (0, 1)]):
        tr.calls.append(TraceCall(i, 5, np.array([pair])))
    # {0,1}: 2 misses. {0,2}: 0 hits, 2 replaces 1 (0 is in use). {0,1}: 1 replaces 2. {2,3}: both miss.
    # {0,1}: both miss. Optimal total: 8 misses, 2 hits.
    res = simulate(tr, 2, "belady")
    assert (res.misses, res.hits) == (8, 2)
    assert res.bypassed == 0


def test_calls_bigger_than_the_cache_stream_without_caching() -> None:
    tr = Trace(8, 4, [0])
    tr.calls = [TraceCall(0, 0, np.array([[0, 1, 2, 3]])), TraceCall(1, 0, np.array([[0, 1, 2, 3]]))]
    res = simulate(tr, 2, "lru")
    assert res.accesses == 8 and res.bypassed == 4 and res.hits == 2
    assert simulate(tr, 0, "lru").hits == 0


def test_belady_is_never_beaten_on_random_traces() -> None:
    rng = np.random.default_rng(0)
    tr = Trace(16, 2, [1, 2, 3])
    for s in range(200):
        for layer in (1, 2, 3):
            p = np.arange(1, 17) ** -1.2
            tr.calls.append(TraceCall(s, layer, rng.choice(16, size=(1, 2), replace=False, p=p / p.sum())))
    rows = compare(tr, [0.1, 0.3, 0.5], ["lru", "lfu", "stat"])
    for r in rows:
        for p in ("lru", "lfu", "stat"):
            assert r[p].hits <= r["belady"].hits
        assert r["belady"].hit_rate > 0
    assert capacity_for(tr, 0.5) == 24


def test_step_oracle_keeps_what_the_rest_of_the_token_uses() -> None:
    """Two MoE layers, top-1, two slots (keys: layer-1 expert e is e, layer-2 expert e is 4 + e).
    Step 2's layer 1 misses on expert 3: LFU evicts the once-used key 6, the oracle knows layer 2
    needs it later in the step and evicts the twice-used key 0 instead (as Belady does)."""
    tr = Trace(4, 1, [1, 2], expert_bytes=1)
    for s, (a, b) in enumerate([(0, 1), (0, 2), (3, 2)]):
        tr.calls += [TraceCall(s, 1, np.array([[a]])), TraceCall(s, 2, np.array([[b]]))]
    assert simulate(tr, 2, "lfu").hits == 1
    assert simulate(tr, 2, "step-oracle").hits == 2 == simulate(tr, 2, "belady").hits
    rng = np.random.default_rng(1)
    tr = Trace(16, 2, [1, 2, 3])
    for s in range(300):
        for layer in (1, 2, 3):
            tr.calls.append(TraceCall(s, layer, rng.choice(16, size=(1, 2), replace=False)))
    for cap in (4, 12, 24):
        assert simulate(tr, cap, "step-oracle").hits <= simulate(tr, cap, "belady").hits
    with pytest.raises(ValueError, match="demand-paging bound"):
        simulate(tr, 4, "step-oracle", prefetch=True)


def test_policies_never_pick_pinned_and_decay() -> None:
    cached = np.array([True, True, True, False])
    pinned = np.array([True, False, False, False])
    lru = LRU(4)
    lru.access(np.array([0]), 0.0)
    lru.access(np.array([1]), 1.0)
    lru.access(np.array([2]), 2.0)
    assert lru.victim(cached, pinned, 3.0) == 1
    assert lru.victim(cached, np.array([True, True, True, False]), 3.0) == -1
    lfu = LFUDecay(4, half_life=1.0)
    for t in range(5):
        lfu.access(np.array([1]), float(t))  # used a lot, long ago
    lfu.access(np.array([2]), 20.0)  # used once, just now
    assert lfu.victim(cached, pinned, 20.0) == 1
    stat = StatGuided(4, half_life=1.0)
    stat.set_prior(np.array([0.0, 5.0, 0.0, 0.0]), tokens=1000)
    stat.access(np.array([2]), 20.0)
    assert stat.victim(cached, pinned, 25.0) == 2  # the prior keeps the statistically hot expert 1
    with pytest.raises(ValueError, match="unknown cache policy"):
        make_policy("fifo", 4)


def test_trace_roundtrip_and_recorder_steps(tmp_path) -> None:
    rec = TraceRecorder(8, 2, [1, 2], expert_bytes=64, path=tmp_path / "t.jsonl")
    rec.record(1, np.array([[0, 1], [2, 3]]))  # prefill step of 2 tokens
    rec.predicted(2, [1, 4])
    rec.record(2, np.array([[1, 4], [4, 5]]))
    rec.record(1, np.array([[0, 7]]))  # a new step starts at the first layer again
    rec.close()
    tr = Trace.load(tmp_path / "t.jsonl")
    assert [c.step for c in tr.calls] == [0, 0, 1]
    assert tr.calls[1].predicted.tolist() == [1, 4]
    assert tr.tokens == 3 and tr.n_keys == 16
    tr.save(tmp_path / "u.jsonl")
    again = Trace.load(tmp_path / "u.jsonl")
    assert [c.experts.tolist() for c in again.calls] == [c.experts.tolist() for c in tr.calls]
    (tmp_path / "bad.jsonl").write_text("hello\n")
    with pytest.raises(LocalGLMError, match="not a localglm routing trace"):
        Trace.load(tmp_path / "bad.jsonl")


def test_prefetch_counts_precision_recall_and_helps() -> None:
    rng = np.random.default_rng(1)
    tr = Trace(16, 2, [0, 1])
    for s in range(300):
        for layer in (0, 1):
            ids = rng.choice(16, size=(1, 2), replace=False)
            tr.calls.append(TraceCall(s, layer, ids, predicted=ids[0]))  # a perfect predictor
    demand = simulate(tr, 8, "lru")
    pre = simulate(tr, 8, "lru", prefetch=True)
    assert pre.recall == 1.0 and pre.precision == 1.0
    assert pre.hit_rate == 1.0 > demand.hit_rate
    assert pre.prefetched == pre.prefetch_used


def test_simulate_cli(tmp_path, capsys) -> None:
    tr = single_layer([1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5], n_experts=10)
    tr.save(tmp_path / "t.jsonl")
    assert main(["simulate", str(tmp_path / "t.jsonl"), "--sizes", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "belady" in out and "41.7%" in out  # 5 hits of 12 at 3 slots
    assert main(["simulate", str(tmp_path / "t.jsonl"), "--sizes", "0.3", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["rows"][0]["belady"]["misses"] == 7
    assert main(["simulate", str(tmp_path / "t.jsonl"), "--sizes", "0.3", "--step-oracle", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["rows"][0]["step-oracle"]["misses"] == d["rows"][0]["lfu"]["misses"]  # one layer: nothing later in a step
    assert main(["simulate", str(tmp_path / "t.jsonl"), "--step-oracle", "--prefetch"]) == 2
    assert main(["simulate", str(tmp_path / "t.jsonl"), "--sizes", "2"]) == 2
    assert main(["simulate", str(tmp_path / "t.jsonl"), "--policies", "fifo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "localglm: error:" in err


def test_prefetch_guard_keeps_the_working_set() -> None:
    rng = np.random.default_rng(2)
    tr = Trace(16, 2, [0, 1])
    for s in range(100):
        for layer in (0, 1):
            ids = rng.choice(16, size=(1, 2), replace=False)
            tr.calls.append(TraceCall(s, layer, ids, predicted=rng.choice(16, size=4, replace=False)))  # a poor predictor
    free = simulate(tr, 6, "lru", prefetch=True)
    guarded = simulate(tr, 6, "lru", prefetch=True, prefetch_min_idle=3.0)
    assert guarded.prefetched < free.prefetched
