"""GLM's sigmoid top-k router with the load-balancing correction bias and group-limited choice."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RouterWeights:
    weight: torch.Tensor  # [E, hidden], kept in fp32: routing decisions must not flip with the dtype
    correction_bias: torch.Tensor  # [E] fp32 (`e_score_correction_bias`)


@dataclass(frozen=True)
class RouterSpec:
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    scaling: float = 1.0


def choice_scores(x: torch.Tensor, w: RouterWeights, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's sigmoid scores [N, E] and its choice scores (biased; -inf outside the kept groups).

    The top-k of the choice scores is the routing; shared with the prefetch predictor, which takes
    more than k of them.
    """
    scores = F.linear(x.float(), w.weight).sigmoid()
    choice = scores + w.correction_bias
    if spec.n_group > 1:
        n, e = choice.shape
        grouped = choice.view(n, spec.n_group, e // spec.n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        keep = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(e // spec.n_group, dim=1), float("-inf"))
    return scores, choice


def route(x: torch.Tensor, w: RouterWeights, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose experts for tokens x [N, hidden].

    Returns (expert ids [N, k] int64, weights [N, k] fp32). The bias only steers the choice; the
    weights are the unbiased sigmoid scores of the chosen experts, renormalised and scaled.
    """
    scores, choice = choice_scores(x, w, spec)
    ids = torch.topk(choice, k=spec.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * spec.scaling
