"""Expert prediction for prefetch: the next layers' routers applied to the current hidden state.

`predict(layer, x)` takes the residual stream entering MoE layer `layer` (the output of the layer
before it) and, for `layer` and the `depth - 1` MoE layers after it, applies each one's
post-attention RMSNorm and router to x: what that router would see if the blocks in between added
nothing. The residual stream changes little per block, so this is a good guess, and it is made one
attention block (or more) before the layer routes, which is the time a copy has to overlap. For
the layer itself, in decode, what its attention added to the previous token (`attended`) is added
to x first: attention output changes slowly from token to token, and the guess improves a lot.
Guesses made without that (two layers ahead, prefill) are blended with the statistics: the
co-occurrence prior P(expert | the previous MoE layer's choice: its actual one if it ran this
step, else the one just predicted for it) from the saved router profile.

Measured on four traces of the trained default model (benchmarks/bench_offload.py), decode recall
at top-k for the layer about to run: 91-93% (82-87% from its input alone; 81% with the old guess
from the previous layer's router input); two layers ahead 73-76%.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from localglm.layers.norm import rms_norm
from localglm.layers.router import RouterSpec, RouterWeights, choice_scores

from .router_stats import RouterStats


@dataclass
class PredictionCounts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, predicted: set[int], actual: set[int]) -> None:
        self.tp += len(predicted & actual)
        self.fp += len(predicted - actual)
        self.fn += len(actual - predicted)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0


GUESS = 0  # _Pending.ahead of a `guess` (from a stand-in stream, not a layer's input)


@dataclass
class _Pending:
    experts: set[int]
    ahead: int  # 1: predicted from this layer's own input; 2: from the input of the MoE layer before it ...


def _topk_on_host(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """torch.topk of scores [N, E] as numpy (values float32, indices int64), in one device-to-host copy:
    each copy waits for the GPU's queue, and the predictor runs once per MoE layer. Indices ride as
    float32 (exact below 2**24 experts)."""
    val, top = torch.topk(scores, k=k, dim=-1)
    both = torch.stack([val.float(), top.float()]).cpu().numpy()
    return both[0], both[1].astype(np.int64)


@dataclass
class NextLayerPredictor:
    """predict(layer, x) -> {MoE layer: predicted expert ids} for `layer` and the `depth - 1` after it.

    Per token, a target's top (k + extra) experts by its router's choice score (sigmoid + correction
    bias), plus `stat_weight` x the co-occurrence prior where it applies; the union over tokens.
    `counts` scores each layer's latest prediction when it runs (the one made from its own input);
    `counts_ahead[d]` scores the predictions made d MoE layers ahead.
    """

    routers: dict[int, RouterWeights]
    norms: dict[int, torch.Tensor]  # post-attention RMSNorm weight per MoE layer
    spec: RouterSpec
    eps: float
    stats: RouterStats | None = None
    extra: int = 0
    depth: int = 2
    stat_weight: float = 0.1
    max_tokens: int = 64  # prefill batches: the union saturates; predict from a sample
    counts: PredictionCounts = field(default_factory=PredictionCounts)
    counts_ahead: dict[int, PredictionCounts] = field(default_factory=dict)
    counts_guess: dict[int, PredictionCounts] = field(default_factory=dict)  # per layer: `guess`'s predictions

    carry_attention: bool = True
    # Layers predicted from their own input alone, outside the chain of layers ahead and `guess`: an
    # MTP block's MoE layer, whose input (eh_proj of a token and a stream) no main layer's input resembles.
    solo: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        self.layers = sorted(r for r in self.routers if r not in self.solo)  # the main chain, in order
        self._pending: dict[int, list[_Pending]] = {}
        self._seen: dict[int, np.ndarray] = {}  # layer -> its last call's expert ids [N, k]
        self._input: dict[int, torch.Tensor] = {}  # layer -> the last token's input (fp32 [H])
        self._attn: dict[int, torch.Tensor] = {}  # layer -> what its attention added to the last token

    def attended(self, layer: int, x: torch.Tensor) -> None:
        """The residual after `layer`'s attention: keep what attention added to the last token."""
        xin = self._input.get(layer)
        last = x.reshape(-1, x.shape[-1])[-1].float()
        if xin is not None and xin.shape == last.shape:
            self._attn[layer] = last - xin

    def predict(self, layer: int, x: torch.Tensor) -> dict[int, np.ndarray]:
        if layer not in self.routers:
            return {}
        flat = x.reshape(-1, x.shape[-1])
        self._input[layer] = flat[-1].to(torch.float32, copy=True)  # x may change after the call
        sample = None
        if len(flat) > self.max_tokens:
            sample = torch.linspace(0, len(flat) - 1, self.max_tokens).long()
            flat = flat[sample]
        if layer in self.solo:
            targets = [layer]
        else:
            pos = self.layers.index(layer)
            targets = self.layers[pos : pos + self.depth]
        k = self.spec.top_k + self.extra
        out: dict[int, np.ndarray] = {}
        n_tokens = len(x.reshape(-1, x.shape[-1]))
        guessed: dict[int, np.ndarray] = {}  # target -> its predicted top-k per token, the next target's condition
        for target in targets:
            xt = flat.float()
            carry = self._attn.get(target) if self.carry_attention and target == layer and len(flat) == 1 else None
            if carry is not None:  # attention's output moves slowly from token to token: add the last one's
                xt = xt + carry.to(xt.device)
            h = rms_norm(xt, self.norms[target].float(), self.eps)
            choice = choice_scores(h, self.routers[target], self.spec)[1]
            # The statistics help the weaker guesses only (two layers ahead, prefill): measured, they
            # cost 1-2 points of recall where last token's attention is carried over, and add 1-3 here.
            prior = self._prior(target, n_tokens, sample, guessed) if carry is None else None
            if prior is not None:
                choice = choice + self.stat_weight * torch.from_numpy(prior).float().to(choice.device)
            val, top = _topk_on_host(choice, min(k, choice.shape[-1]))
            guessed[target] = top[:, : self.spec.top_k]
            out[target] = np.unique(top[np.isfinite(val)])  # never a masked group's expert
        return out

    def guess(self, streams: torch.Tensor) -> dict[int, np.ndarray]:
        """Every MoE layer's experts for tokens not yet run, from a stand-in for their residual stream
        (speculation: the MTP block's output streams of the drafted tokens, which approximate the main
        model's last-layer streams): each layer's norm and router applied to it, top-k per token, the
        union over tokens. Far from the last layers the stand-in is worse; `guess_precision` says per
        layer how often these guesses were right."""
        flat = streams.reshape(-1, streams.shape[-1]).float()
        out: dict[int, np.ndarray] = {}
        for target in self.layers:
            h = rms_norm(flat, self.norms[target].float(), self.eps)
            choice = choice_scores(h, self.routers[target], self.spec)[1]
            val, top = _topk_on_host(choice, min(self.spec.top_k, choice.shape[-1]))
            out[target] = np.unique(top[np.isfinite(val)])
        return out

    def expect_guess(self, predictions: dict[int, np.ndarray]) -> None:
        """Remember `guess`'s predictions, scored apart from the layer-ahead ones when their layer runs."""
        for target, experts in predictions.items():
            self._pending.setdefault(target, []).append(_Pending({int(e) for e in experts}, GUESS))

    def guess_precision(self, layer: int) -> float:
        """Share of `guess`'s experts for this layer that the layer then used (1 of 2 before any)."""
        c = self.counts_guess.get(layer)
        return (c.tp + 1) / (c.tp + c.fp + 2) if c is not None else 0.5

    def _prior(self, target: int, n_tokens: int, sample: torch.Tensor | None, guessed: dict[int, np.ndarray]) -> np.ndarray | None:
        """P(expert at `target` | the previous MoE layer's choice), per (sampled) token, from the
        statistics: its actual choice when it ran this step, else the one just predicted for it."""
        if target in self.solo:
            return None
        pos = self.layers.index(target)
        if self.stats is None or self.stat_weight <= 0 or pos == 0 or not self.stats.tokens:
            return None
        prev = self.layers[pos - 1]
        ids = guessed.get(prev)
        if ids is None:
            ids = self._seen.get(prev)
            if ids is None or len(ids) != n_tokens:
                return None  # the previous layer's call was another step's
            if sample is not None:
                ids = ids[sample.numpy()]
        li = self.stats.index[prev]
        return np.stack([self.stats.next_given(li, row) for row in ids])

    def expect(self, predictions: dict[int, np.ndarray], layer: int | None = None) -> None:
        """Remember predictions so `observe` can score them when their layer runs.

        `layer` is the layer whose input they were made from (default: the first target).
        """
        if not predictions:
            return
        first = min(predictions) if layer is None else layer
        src = None if first in self.solo else self.layers.index(first)
        for target, experts in predictions.items():
            ahead = 1 if src is None or target in self.solo else self.layers.index(target) - src + 1
            self._pending.setdefault(target, []).append(_Pending({int(e) for e in experts}, ahead))

    def observe(self, layer: int, expert_ids: torch.Tensor) -> None:
        ids = expert_ids.detach().cpu().numpy().reshape(len(expert_ids), -1)
        self._seen[layer] = ids
        pend = self._pending.pop(layer, None)
        if not pend:
            return
        actual = set(ids.reshape(-1).tolist())
        for p in pend:
            into = self.counts_guess.setdefault(layer, PredictionCounts()) if p.ahead == GUESS else self.counts_ahead.setdefault(p.ahead, PredictionCounts())
            into.add(p.experts, actual)
        ahead = [p for p in pend if p.ahead != GUESS]
        if ahead:
            self.counts.add(min(ahead, key=lambda p: p.ahead).experts, actual)


def predictor_for(
    net, stats: RouterStats | None = None, extra: int = 0, depth: int = 2, stat_weight: float = 0.1, carry_attention: bool = True,
    solo: dict[int, tuple[torch.Tensor, RouterWeights]] | None = None,
) -> NextLayerPredictor:
    """A predictor over a model's MoE routers (`net.moe_routers()`: post-attention norm and router per
    layer), and `solo` ones (layer -> norm and router: an MTP block's) predicted from their own input only."""
    pairs = net.moe_routers() | (solo or {})
    routers = {i: router for i, (_, router) in pairs.items()}
    norms = {i: norm for i, (norm, _) in pairs.items()}
    return NextLayerPredictor(
        routers, norms, net.router_spec, net.cfg.rms_norm_eps, stats, extra=extra, depth=depth, stat_weight=stat_weight,
        carry_attention=carry_attention, solo=frozenset(solo or ()),
    )
