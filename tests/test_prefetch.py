"""The prefetch predictor: each layer's router applied to the residual stream entering it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import localglm
from localglm.layers import rms_norm
from localglm.layers.router import route
from localglm.models.glm4_moe.tiny import TinySpec
from localglm.tiny import make_tiny
from offload.prefetch import predictor_for
from offload.router_stats import RouterStats

SHAPES = {"flat": {}, "groups": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)}


def _net(tmp_path: Path, shape: str, **spec: object):
    root = make_tiny(tmp_path / shape, TinySpec(num_hidden_layers=4, **SHAPES[shape], **spec))
    return localglm.load(str(root), dtype="float32").net


@pytest.mark.parametrize("shape", SHAPES)
def test_a_layer_predicted_from_its_input_is_its_routing_when_attention_adds_nothing(tmp_path: Path, shape: str) -> None:
    """With nothing added between the layer's input and its router, the prediction must be the
    routing itself, group limits included; the next layer's comes from the same state."""
    net = _net(tmp_path, shape)
    pred = predictor_for(net, stat_weight=0.0)
    moe = pred.layers
    x = torch.randn(6, net.cfg.hidden_size) * 3
    for layer in moe:
        got = pred.predict(layer, x)
        assert sorted(got) == moe[moe.index(layer) : moe.index(layer) + 2]  # depth 2: this layer and the next
        for target, experts in got.items():
            h = rms_norm(x, net.w.layers[target].post_attention_norm, net.cfg.rms_norm_eps)
            ids, _ = route(h, net.w.layers[target].router, net.router_spec)
            assert experts.tolist() == sorted(set(ids.reshape(-1).tolist()))


def test_decode_guesses_carry_the_last_tokens_attention_over(tmp_path: Path) -> None:
    """After `attended`, a one-token guess for the layer is the routing of its input plus what the
    layer's attention added to the previous token: exact when attention adds the same again."""
    net = _net(tmp_path, "flat")
    pred = predictor_for(net, stat_weight=0.0, depth=1)
    layer = pred.layers[1]
    lw, h = net.w.layers[layer], net.cfg.hidden_size
    added = torch.randn(h) * 4

    def routing(x: torch.Tensor) -> list[int]:
        ids, _ = route(rms_norm(x, lw.post_attention_norm, net.cfg.rms_norm_eps), lw.router, net.router_spec)
        return sorted(set(ids.reshape(-1).tolist()))

    first, second = torch.randn(1, h), torch.randn(1, h)
    assert pred.predict(layer, first)[layer].tolist() == routing(first)  # nothing to carry yet
    pred.attended(layer, first + added)
    assert pred.predict(layer, second)[layer].tolist() == routing(second + added)
    batch = torch.randn(5, h)  # prefill: no carry
    assert pred.predict(layer, batch)[layer].tolist() == routing(batch)
    off = predictor_for(net, stat_weight=0.0, depth=1, carry_attention=False)
    off.predict(layer, first)
    off.attended(layer, first + added)
    assert off.predict(layer, second)[layer].tolist() == routing(second)


def test_extra_predictions_never_name_an_expert_of_a_masked_group(tmp_path: Path) -> None:
    net = _net(tmp_path, "groups")
    pred = predictor_for(net, extra=12, depth=1, stat_weight=0.0)  # k + 12 = all 16, but only 2 of 4 groups allowed
    x = torch.randn(1, net.cfg.hidden_size)
    got = pred.predict(pred.layers[0], x)[pred.layers[0]]
    assert len(got) == 8 and len({int(e) // 4 for e in got}) == 2


def test_counts_score_the_latest_prediction_and_each_distance() -> None:
    from offload.prefetch import NextLayerPredictor
    from localglm.layers.router import RouterSpec, RouterWeights

    routers = {i: RouterWeights(torch.zeros(4, 8), torch.zeros(4)) for i in (1, 2)}
    pred = NextLayerPredictor(routers, {i: torch.ones(8) for i in routers}, RouterSpec(top_k=2), 1e-5)
    pred.expect({1: np.array([0, 1]), 2: np.array([0, 1])}, 1)  # made from layer 1's input
    pred.observe(1, torch.tensor([[0, 2]]))
    pred.expect({2: np.array([2, 3])}, 2)  # from layer 2's input: the latest for layer 2
    pred.observe(2, torch.tensor([[2, 3]]))
    assert (pred.counts.tp, pred.counts.fp, pred.counts.fn) == (1 + 2, 1, 1)
    near, far = pred.counts_ahead[1], pred.counts_ahead[2]
    assert (near.tp, near.fp, near.fn) == (3, 1, 1) and (far.tp, far.fp, far.fn) == (0, 2, 2)


def test_statistics_blend_in_from_the_previous_layers_actual_choice(tmp_path: Path) -> None:
    """A heavy statistics weight makes the co-occurrence prior decide; it applies only when the
    previous MoE layer's call was this step's (same token count)."""
    net = _net(tmp_path, "flat")
    moe = predictor_for(net).layers
    stats = RouterStats(moe, net.cfg.n_routed_experts, net.cfg.num_experts_per_tok)
    for _ in range(20):  # expert 0 at the first MoE layer is always followed by 5 and 6 at the next
        stats.update(moe[0], np.array([[0, 1]]))
        stats.update(moe[1], np.array([[5, 6]]))
    pred = predictor_for(net, stats, depth=1, stat_weight=1e3)
    x = torch.randn(1, net.cfg.hidden_size)
    pred.observe(moe[0], torch.tensor([[0, 1]]))
    assert pred.predict(moe[1], x)[moe[1]].tolist() == [5, 6]
    plain = predictor_for(net, depth=1, stat_weight=0.0).predict(moe[1], x)[moe[1]]
    assert pred.predict(moe[1], torch.randn(3, net.cfg.hidden_size)) is not None  # another step: no prior, no error
    pred.observe(moe[0], torch.tensor([[0, 1], [0, 1], [0, 1]]))
    assert pred.predict(moe[1], x)[moe[1]].tolist() == plain.tolist()  # 3 tokens seen, 1 asked: not this step's


def test_backends_are_hinted_with_each_moe_layers_input_on_both_decode_paths(tmp_path: Path) -> None:
    """The fused decoder folds the previous layer's expert output in before the hint, so the
    backend sees the same residual stream as on the torch-op path."""
    from offload.trace import TraceRecorder, TracingExperts

    net = _net(tmp_path, "flat")
    cfg = net.cfg
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    seen: dict[bool, list[tuple[int, torch.Tensor]]] = {True: [], False: []}
    after: dict[bool, list[tuple[int, torch.Tensor]]] = {True: [], False: []}

    class Hinted(TracingExperts):
        def hint(self, layer: int, x: torch.Tensor) -> None:
            seen[net.fused_decode].append((layer, x.detach().reshape(-1).clone()))

        def attended(self, layer: int, x: torch.Tensor) -> None:
            after[net.fused_decode].append((layer, x.detach().reshape(-1).clone()))

    net.experts = Hinted(net.experts, TraceRecorder(cfg.n_routed_experts, cfg.num_experts_per_tok, moe_layers))
    assert net._fused_decoder() is not None
    prompt = torch.tensor([[1, 5, 9, 33, 7]])
    for fused in (True, False):
        net.fused_decode = fused
        cache = net.new_cache(16)
        with torch.inference_mode():
            net.hidden_states(prompt[:, :3], cache, 0)
            seen[fused].clear()  # compare the decoded tokens
            after[fused].clear()
            for p in (3, 4):
                net.hidden_states(prompt[:, p : p + 1], cache, p)
    assert [layer for layer, _ in seen[True]] == moe_layers * 2
    assert [layer for layer, _ in after[True]] == moe_layers * 2
    for (la, a), (lb, b) in zip(seen[True] + after[True], seen[False] + after[False]):
        assert la == lb and torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after[True][0][1], seen[True][0][1])  # attention did add something
    # and it is the layer's input: the first MoE layer's hint is what the dense layer before it outputs
    net.fused_decode = net.fused_prefill = False  # the torch ops (the fused decoder holds the uncut layers)
    with torch.inference_mode():
        seen[False].clear()
        net.hidden_states(prompt, net.new_cache(8), 0)
        first_hint = seen[False][0]
        layers = net.w.layers
        net.w.layers = layers[: moe_layers[0]]  # the model cut before its first MoE layer
        try:
            cut = net.hidden_states(prompt, net.new_cache(8), 0)
        finally:
            net.w.layers = layers
    assert first_hint[0] == moe_layers[0]
    expect = rms_norm(first_hint[1].view(cut.shape), net.w.final_norm, cfg.rms_norm_eps)
    assert torch.equal(expect, cut)
