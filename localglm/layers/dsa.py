"""DeepSeek sparse attention's lightning indexer, as GLM-5 (`glm_moe_dsa`) uses it.

Before MLA attends, the indexer scores every cached token for each query and keeps the top
`index_topk`; attention then reads only those latent rows, so its cost stops growing with the
context (only this cheap scoring pass does). Per query t and key s <= t:

    score(t, s) = sum_h  w_h(t) * H^-1/2 * relu(q_h(t) . k(s) * D^-1/2)

with q_h = wq_b(q_resid) split into H heads of D (the query latent MLA computes anyway), k =
LayerNorm(wk(x)) (one head, with bias, eps 1e-6), interleaved RoPE on the first qk_rope dims of both,
and w = weights_proj(x) in fp32. The operation order is transformers' `GlmMoeDsaIndexer` (scores in
fp32), so the same ties go the same way in `topk`. GLM-5.2's IndexShare: "shared" layers run no
indexer and reuse the previous "full" layer's selection.

While the context is at most `index_topk` every key is selected: the indexer's keys are still
computed and cached (later tokens need them), but nothing is scored and attention is dense, exactly.

One decoded token on the CPU runs the fused decoder's own native indexer (dsa_indexer.c: the key,
the fp32 scores, torch.topk's choice with its ties; `indexer_keys`, `select_tokens`), as layers/mla.py
does for the attention: the scores' fp32 sums in torch's order and in the kernel's can differ in the
last bit, which is enough to swap two nearly equal keys at the top-k's edge, so the torch decode
and the fused decode share one kernel and pick the same rows.

Equal scores (keys every head's ReLU zeroes) are common in small models, and torch.topk keeps some
of them by where its algorithm meets them, so the row it runs on decides. A prompt chunk picks as
transformers' forward over the chunk does: each query over every key up to the chunk's end, the later
ones masked (the native layers pad their rows the same way). A speculative verification's tokens
(`steps`) pick as their one-token decode steps do, over their own keys, so speculation leaves greedy
output unchanged. The two can differ only on such ties, as transformers' own forward and its cached
decoding do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .kv_cache import HostRows, LatentCache
from .linear import linear
from .native import LayerLib, LgDsa, native
from .rope import apply_rope_interleaved

INDEX_KEY_NORM_EPS = 1e-6  # transformers' nn.LayerNorm(index_head_dim, eps=1e-6)


@dataclass(frozen=True)
class IndexerShape:
    heads: int  # index_n_heads
    head_dim: int  # index_head_dim
    rope_dim: int  # qk_rope_head_dim: the rotated leading dims of each indexer head
    topk: int  # index_topk


@dataclass(frozen=True)
class NativeIndexer:
    """An indexer as the native kernels read it: its LgDsa and the tensors the LgDsa points into."""

    desc: LgDsa
    keep: tuple[object, ...]


@dataclass
class IndexerWeights:
    wq_b: torch.Tensor  # [heads * head_dim, q_lora_rank] (or a QuantTensor)
    wk: torch.Tensor  # [head_dim, hidden] (or a QuantTensor)
    k_norm: torch.Tensor  # LayerNorm weight [head_dim]
    k_norm_bias: torch.Tensor  # [head_dim]
    weights_proj: torch.Tensor  # [heads, hidden], fp32 (transformers keeps it in fp32)
    _native: tuple[IndexerShape, torch.dtype, NativeIndexer | None] | None = field(default=None, init=False, repr=False, compare=False)

    def native_view(self, shape: IndexerShape, dtype: torch.dtype) -> NativeIndexer | None:
        """This indexer for the native kernels of a model of `dtype` (the fused decode's layers and
        one decoded token here), or None where they do not take its weights (another dtype or
        layout, a GPU). Described on first use per shape and dtype and kept."""
        if self._native is None or self._native[:2] != (shape, dtype):
            mats = (LayerLib.describe_matrix(self.wq_b, dtype), LayerLib.describe_matrix(self.wk, dtype),
                    LayerLib.describe_matrix(self.weights_proj, torch.float32))  # fmt: skip
            norms = (self.k_norm, self.k_norm_bias)
            view = None
            if dtype in (torch.float32, torch.bfloat16) and all(m is not None for m in mats) and all(
                isinstance(t, torch.Tensor) and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu" for t in norms
            ):
                desc = LgDsa(
                    heads=shape.heads, head_dim=shape.head_dim, rope=shape.rope_dim, topk=shape.topk,
                    k_norm=self.k_norm.data_ptr(), k_norm_bias=self.k_norm_bias.data_ptr(), wq_b=mats[0], wk=mats[1], weights_proj=mats[2],
                )  # fmt: skip
                view = NativeIndexer(desc, (self.wq_b, self.wk, self.weights_proj, *norms))
            self._native = (shape, dtype, view)
        return self._native[2]


class DsaCache(LatentCache):
    """MLA's latent cache plus the indexer's keys, on the layers that run an indexer only:
    `index_keys` [full layers, batch, T, index_head_dim]. With `host` the latent rows live in host RAM
    and only each step's top-k are brought over; the keys stay on the device, where all are scored."""

    def __init__(
        self,
        layers: int,
        kv_lora_rank: int,
        rope_dim: int,
        index_layers: list[int],
        index_head_dim: int,
        max_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        batch: int = 1,
        host: HostRows | None = None,
    ) -> None:
        super().__init__(layers, kv_lora_rank, rope_dim, max_tokens, dtype, device, batch, host)
        self.index_slot = {layer: i for i, layer in enumerate(index_layers)}
        self.index_keys = torch.zeros((len(index_layers), batch, max_tokens, index_head_dim), dtype=dtype, device=device)

    def token_rows(self) -> list[tuple[torch.Tensor, int]]:
        return [*super().token_rows(), (self.index_keys, 2)]

    def write_index(self, layer: int, start: int, keys: torch.Tensor) -> torch.Tensor:
        """Store indexer keys [B, T, D] at positions start.. and return a view of positions 0..start+T."""
        end = start + keys.shape[1]
        self.check_room(end)
        slot = self.index_slot[layer]
        self.index_keys[slot, :, start:end] = keys
        return self.index_keys[slot, :, :end]


def _kernel(x: torch.Tensor, w: IndexerWeights, shape: IndexerShape) -> tuple[LayerLib, LgDsa] | None:
    """The native library and this indexer's LgDsa when x is one decoded token on the CPU and the
    kernels take the weights; None otherwise (torch's ops then run)."""
    if x.shape[:2] != (1, 1) or x.device.type != "cpu":
        return None
    lib = native()
    view = w.native_view(shape, x.dtype) if lib is not None else None
    return None if view is None else (lib, view.desc)


def indexer_keys(x: torch.Tensor, w: IndexerWeights, shape: IndexerShape, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The indexer's key of each token of x [B, T, hidden]: LayerNorm(wk(x)), RoPE on the leading dims -> [B, T, D]."""
    kernel = _kernel(x, w, shape)
    key = kernel[0].dsa_index_key(kernel[1], x, cos, sin) if kernel is not None else None
    if key is not None:  # one decoded token: the fused decode's own kernel
        return key
    k = F.layer_norm(linear(x, w.wk), (shape.head_dim,), w.k_norm, w.k_norm_bias, INDEX_KEY_NORM_EPS)
    k_rot, k_pass = k.split([shape.rope_dim, shape.head_dim - shape.rope_dim], dim=-1)
    return torch.cat([apply_rope_interleaved(k_rot, cos, sin), k_pass], dim=-1)


def index_scores(
    x: torch.Tensor, q_resid: torch.Tensor, keys: torch.Tensor, w: IndexerWeights, shape: IndexerShape, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Scores [B, T, keys] (fp32) of every query of x against `keys` [B, keys, D], before causal masking."""
    bsz, seqlen, _ = x.shape
    q = linear(q_resid, w.wq_b).view(bsz, seqlen, shape.heads, shape.head_dim)
    q_rot, q_pass = q.split([shape.rope_dim, shape.head_dim - shape.rope_dim], dim=-1)
    # [B, T, H, rope] with the position tables broadcast over heads (transformers' unsqueeze_dim=2)
    q_rot = apply_rope_interleaved(q_rot.transpose(1, 2), cos, sin).transpose(1, 2)
    q = torch.cat([q_rot, q_pass], dim=-1)
    scores = F.relu(torch.matmul(q.float(), keys.transpose(-1, -2).float().unsqueeze(1)) * shape.head_dim**-0.5)
    weights = linear(x.to(w.weights_proj.dtype), w.weights_proj).float() * shape.heads**-0.5
    return torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)


def select_topk(scores: torch.Tensor, start: int, topk: int) -> torch.Tensor:
    """Causal top-k of scores [B, T, keys] for queries at positions start..: key positions [B, T, k]."""
    seqlen, total = scores.shape[1], scores.shape[2]
    qpos = torch.arange(start, start + seqlen, device=scores.device)[:, None]
    causal = torch.arange(total, device=scores.device)[None, :] <= qpos
    scores = scores.masked_fill(~causal, float("-inf"))
    return scores.topk(min(topk, total), dim=-1).indices


def select_tokens(
    x: torch.Tensor,
    q_resid: torch.Tensor,
    keys: torch.Tensor,
    w: IndexerWeights,
    shape: IndexerShape,
    cos: torch.Tensor,
    sin: torch.Tensor,
    start: int,
    *,
    steps: bool = False,
) -> torch.Tensor:
    """The top-k key positions [B, T, k] of each query of x (at positions start..) among `keys`
    [B, keys, D]: `index_scores` then `select_topk` (transformers' forward over a chunk: equal scores
    go as torch.topk sends them over the chunk's masked rows), or, for one decoded token on the CPU,
    the fused decode's own kernel (the same math and torch.topk's choice, positions in ascending order).
    `steps` (a speculative verification, one sequence): each query past the top-k picks as its one-token
    decode step does, over its own keys, so that equal scores go the same way as in plain decoding."""
    kernel = _kernel(x, w, shape)
    picked = kernel[0].dsa_topk(kernel[1], x, q_resid, keys, cos, sin) if kernel is not None else None
    if picked is not None:
        return picked
    if not (steps and x.shape[0] == 1 and x.shape[1] > 1):
        return select_topk(index_scores(x, q_resid, keys, w, shape, cos, sin), start, shape.topk)
    fit = min(x.shape[1], max(0, shape.topk - start))  # the first tokens: every earlier key fits, the causal top-k is exact
    parts = [select_topk(index_scores(x[:, :fit], q_resid[:, :fit], keys, w, shape, cos[:fit], sin[:fit]), start, shape.topk)] if fit else []
    for t in range(fit, x.shape[1]):  # the others each as its decode step, scored once (not also in a batch for nothing)
        one = (x[:, t : t + 1], q_resid[:, t : t + 1], keys[:, : start + t + 1], w, shape, cos[t : t + 1], sin[t : t + 1], start + t)
        parts.append(select_tokens(*one).long())
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
