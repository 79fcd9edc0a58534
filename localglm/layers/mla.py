"""Multi-head latent attention (MLA: GLM-4.7-Flash `glm4_moe_lite`, GLM-5 `glm_moe_dsa`).

Keys and values are not cached per head: every token keeps one normalized latent (kv_lora_rank)
and one roped key shared by all heads (qk_rope_head_dim), and `kv_b` expands the latent into each
head's k_nope and v. Two exact rearrangements of the same attention:

- expanded (prefill): apply kv_b to every latent and run ordinary attention, as transformers'
  `Glm4MoeLiteAttention` does, with its operation order, so the tests hold us to it in fp32;
- absorbed (decode): fold kv_b into the query and the output instead (W_UK, W_UV per head), so a
  token reads only the cached latents and never expands the context. One decoded token on the CPU
  runs it through the fused decoder's own native core (mla_attention.c), as layers/attention.py
  does for GQA: the fold, the attention and the unfold are fp32 sums, and torch's bmm orders them
  otherwise, which now and then rounds to another bf16 value; one kernel makes the torch decode
  and the fused decode the same bits. Several new tokens after cached rows on the CPU (an append) fold
  and unfold with torch's batched matmuls and attend through the native latent kernel (one pass over
  the cached rows for every few queries, the scores on bf16 rows as cached). Other calls (prefill
  without a cache, DSA's selections of several tokens, batches, a GPU) run torch's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .kv_cache import LatentCache
from .linear import linear
from .native import native
from .norm import rms_norm
from .rope import apply_rope, apply_rope_interleaved

if TYPE_CHECKING:
    from quant.formats import QuantTensor

    Weight = torch.Tensor | QuantTensor

# Calls of at most this many new tokens, with a cache, take the absorbed form by default.
# Per cached token the expanded form first runs kv_b over the latent, heads*(nope+v)*kv_lora MACs
# (4.6M for GLM-4.7-Flash) per call, and materializes per-head keys/values for the whole context
# (~20 KB a token in bf16); the absorbed form costs heads*(2*kv_lora+rope) MACs (22K) per cached
# token per query and materializes nothing. Counting MACs alone, absorbed wins up to chunks of
# kv_lora*(nope+v) / (2*kv_lora - nope - v) ~ 400 tokens, but it rounds differently from
# transformers, and prefill chunks (512 in the engine) are where we reproduce transformers. So:
# one decoded token, or a few speculative/MTP draft tokens, absorbed; prefill chunks, expanded.
ABSORB_MAX_TOKENS = 16
# ... except a CPU call that adds tokens after cached context (an agent's next turn, a prompt's last
# chunk), which takes the absorbed form while it costs less (`absorbs`): the expanded form runs kv_b
# over the whole context again for every call. Transformers' rounding is kept for a prompt's first
# chunk (nothing cached before it). The weights below are what a MAC of the absorbed form costs in
# units of the expanded form's bf16 GEMM MACs (which run at about twice the fp32 rate on a CPU with
# AVX512-BF16 or AMX). Torch's absorbed form (fp32 bmm over the widened cache; DSA's selected keys) was
# measured on GLM-5's head dimensions at 1,550 cached tokens (2 threads, Zen 4) at 0.59x-0.84x of the
# expanded time at 37-100 new tokens and 1.15x at 200: 1.9 puts its switch at ~150. The native latent
# kernel (`_native_absorbed`: bf16 rows scored as cached, one pass over them for every 4 queries) ties
# with the expanded form at ~300 new tokens there (whole appends, GLM-5 widths: 130 tokens 783-811 ms
# against 958-974 expanded, 200 1,104-1,188 against 1,210-1,228, 300 1,689-1,707 against 1,662-1,713;
# Flash widths 200: 861-862 against 879-915): 1.1.
NATIVE_ABSORBED_COST = 1.1
ABSORBED_PRODUCT_COST = 1.9  # torch's absorbed form, low precision


@dataclass(frozen=True)
class MLAShape:
    """MLA dimensions, plus the numbers transformers derives from the config.

    `scale` is the caller's: transformers uses qk_head_dim**-0.5, times mscale**2 only for
    non-default rope types (`yarn_apply_mscale`). `latent_eps` is the eps of q_a_layernorm and
    kv_a_layernorm, which transformers builds with its RMSNorm default 1e-6, not rms_norm_eps.
    """

    heads: int
    q_lora_rank: int | None  # None: one q_proj straight from the hidden state
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    scale: float
    latent_eps: float
    rope_interleave: bool

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class MLAWeights:
    """One layer's MLA weights; each matrix a dense tensor or a QuantTensor (multiplied through
    `linear`). Only q_a_proj, kv_a_proj_with_mqa and o_proj carry biases (`attention_bias`)."""

    q_b: Weight  # [heads*(nope+rope), q_lora_rank], or q_proj [heads*(nope+rope), hidden]
    kv_a: Weight  # kv_a_proj_with_mqa [kv_lora + rope, hidden]
    kv_a_norm: torch.Tensor  # [kv_lora]
    kv_b: Weight  # [heads*(nope+v), kv_lora]
    o: Weight  # [hidden, heads*v]
    q_a: Weight | None = None  # [q_lora_rank, hidden]; None without q_lora_rank
    q_a_norm: torch.Tensor | None = None  # [q_lora_rank]
    q_a_bias: torch.Tensor | None = None
    kv_a_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    _absorbed: tuple[torch.dtype, torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def absorbed(self, shape: MLAShape, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b split per head: W_UK [heads, nope, kv_lora] and W_UV [heads, v, kv_lora], dense in
        `dtype`; built on first use and kept. A dense kv_b of that dtype is viewed, not copied; a
        QuantTensor is dequantized once (heads*(nope+v)*kv_lora values: 9 MB a layer for
        GLM-4.7-Flash in bf16), since the fold needs per-head slices the packed kernels lack."""
        if self._absorbed is None or self._absorbed[0] != dtype:
            kv_b = self.kv_b if isinstance(self.kv_b, torch.Tensor) else self.kv_b.dequantize(dtype)
            per_head = kv_b.to(dtype).view(shape.heads, shape.qk_nope_head_dim + shape.v_head_dim, shape.kv_lora_rank)
            w_uk, w_uv = per_head.split([shape.qk_nope_head_dim, shape.v_head_dim], dim=1)
            self._absorbed = (dtype, w_uk, w_uv)
        return self._absorbed[1], self._absorbed[2]


def query_latent(x: torch.Tensor, w: MLAWeights, shape: MLAShape) -> torch.Tensor:
    """q_a_layernorm(q_a_proj(x)): the compressed query (needs q_lora_rank)."""
    return rms_norm(linear(x, w.q_a, w.q_a_bias), w.q_a_norm, shape.latent_eps)


def mla_attention(
    x: torch.Tensor,
    w: MLAWeights,
    shape: MLAShape,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: LatentCache | None = None,
    layer: int = 0,
    start: int = 0,
    allowed: torch.Tensor | None = None,
    absorbed: bool | None = None,
    q_resid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal MLA over x [B, T, hidden] at positions start..start+T-1 -> [B, T, hidden].

    With a cache, the new tokens' latents and rope keys are written at those positions and
    attention reads every cached position before them; without one, the call is a self-contained
    full forward (start 0). cos/sin are [T, qk_rope_head_dim] for these positions.

    `allowed` restricts which key positions each query may read, on top of causality (DSA's top-k
    selection): a bool mask [B, T, keys] (True: may read) or integer key positions [B, T, k].
    Every query must keep at least one key. `absorbed` picks the form; None lets `absorbs` pick (with a
    cache: the absorbed one for a few tokens, or where it costs less after cached context).
    `q_resid`: the query latent q_a_layernorm(q_a_proj(x)) when the caller computed it already (DSA's
    indexer reads it too: `query_latent`).
    """
    bsz, seqlen, _ = x.shape
    nope, rope = shape.qk_nope_head_dim, shape.qk_rope_head_dim
    if w.q_a is None:
        q = linear(x, w.q_b)
    else:
        q = linear(q_resid if q_resid is not None else query_latent(x, w, shape), w.q_b)
    q = q.view(bsz, seqlen, shape.heads, shape.qk_head_dim).transpose(1, 2)
    q_nope, q_rope = q.split([nope, rope], dim=-1)

    compressed = linear(x, w.kv_a, w.kv_a_bias)
    latent, k_rope = compressed.split([shape.kv_lora_rank, rope], dim=-1)
    latent = rms_norm(latent, w.kv_a_norm, shape.latent_eps)
    k_rope = k_rope.view(bsz, 1, seqlen, rope)  # one key shared by every head
    rotate = apply_rope_interleaved if shape.rope_interleave else apply_rope
    q_rope, k_rope = rotate(q_rope, cos, sin), rotate(k_rope, cos, sin)
    k_rope = k_rope.view(bsz, seqlen, rope)
    if cache is not None:
        cache.write(layer, start, latent, k_rope)
        latent, k_rope, allowed = cache.read(layer, start + seqlen, allowed)

    if absorbed is None:
        absorbed = cache is not None and absorbs(shape, seqlen, latent.shape[1], q_nope, latent_kernel=allowed is None and native() is not None)
    out = _native_absorbed(q_nope, q_rope, latent, k_rope, w, shape, allowed) if absorbed and cache is not None else None
    if out is None:
        form = _absorbed_attention if absorbed else _expanded_attention
        out = form(q_nope, q_rope, latent, k_rope, w, shape, _key_mask(bsz, seqlen, latent.shape[1], allowed, x.device))
    return linear(out.transpose(1, 2).reshape(bsz, seqlen, shape.heads * shape.v_head_dim), w.o, w.o_bias)


def absorbs(shape: MLAShape, seqlen: int, total: int, q: torch.Tensor, latent_kernel: bool = False) -> bool:
    """Whether `seqlen` new queries over `total` keys (a cache's) take the absorbed form: always up to
    ABSORB_MAX_TOKENS; on a CPU, after cached context, where its products cost less. Per head, the
    expanded form costs kv_b over every key, total*kv_lora*(nope+v), plus attention with head dims
    nope+rope and v, seqlen*total*(nope+rope+v); the absorbed form folds each query and output,
    seqlen*kv_lora*(nope+v), plus attention in the latent space, seqlen*total*(2*kv_lora+rope).
    `latent_kernel`: the native kernels are built and the queries read every row up to each (no DSA
    selection), so a bf16 batch of one goes through the native latent kernel (`_native_absorbed`), whose
    MACs cost less than torch's absorbed form's."""
    if seqlen <= ABSORB_MAX_TOKENS:
        return True
    if total <= seqlen or q.device.type != "cpu":
        return False
    lora, nope, rope, v = shape.kv_lora_rank, shape.qk_nope_head_dim, shape.qk_rope_head_dim, shape.v_head_dim
    weight = 1.0
    if q.dtype in (torch.bfloat16, torch.float16):
        native_rows = latent_kernel and q.dtype == torch.bfloat16 and q.shape[0] == 1
        weight = NATIVE_ABSORBED_COST if native_rows else ABSORBED_PRODUCT_COST
    expanded = total * lora * (nope + v) + seqlen * total * (nope + rope + v)
    absorbed = weight * (seqlen * lora * (nope + v) + seqlen * total * (2 * lora + rope))
    return absorbed < expanded


def _native_absorbed(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    w: MLAWeights,
    shape: MLAShape,
    allowed: torch.Tensor | None,
) -> torch.Tensor | None:
    """The absorbed form natively, the queries the last of the cached rows; [1, heads, T, v], or None where the
    kernels do not take the inputs (a GPU, a batch, rows not cached as latent | rope key, several queries with
    DSA's selections: then the torch form runs).

    One query goes through the fused decoder's native core (`LayerLib.mla_decode_attention`), so this path and
    the fused one agree bit for bit. Several, each reading every row up to itself, fold and unfold with torch's
    batched matmuls and attend through the native latent kernel (`LayerLib.mla_latent_attention`: one pass over
    the rows for every few queries, the scores on bf16 rows as cached)."""
    lib = native() if q_nope.device.type == "cpu" and q_nope.shape[0] == 1 else None
    if lib is None or (q_nope.shape[2] > 1 and allowed is not None):
        return None
    w_uk, w_uv = w.absorbed(shape, q_nope.dtype)
    if q_nope.shape[2] == 1:
        positions = None
        if allowed is not None:  # DSA's selection: the key positions themselves, or a mask of them
            positions = allowed.reshape(-1).nonzero().flatten() if allowed.dtype == torch.bool else allowed
        return lib.mla_decode_attention(q_nope, q_rope, latent, k_rope, w_uk, w_uv, shape.scale, positions)
    q_lat = torch.matmul(q_nope, w_uk)  # [1, H, T, kv_lora]
    ql = torch.cat((q_lat, q_rope.to(q_lat.dtype)), dim=-1).transpose(1, 2).contiguous()  # [1, T, H, kv_lora + rope]
    out_lat = lib.mla_latent_attention(ql, latent, k_rope, shape.scale)
    return None if out_lat is None else torch.matmul(out_lat.transpose(1, 2), w_uv.transpose(1, 2))


def _key_mask(bsz: int, seqlen: int, total: int, allowed: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Which keys each query reads, [T, keys] or [B, T, keys], or None for plain causal from
    position 0 over exactly the new tokens. The queries are always the last T of the keys."""
    if allowed is None and total == seqlen:
        return None
    qpos = torch.arange(total - seqlen, total, device=device)[:, None]
    mask = torch.arange(total, device=device)[None, :] <= qpos
    if allowed is None:
        return mask
    if allowed.dtype != torch.bool:  # key positions -> mask
        allowed = torch.zeros(bsz, seqlen, total, dtype=torch.bool, device=device).scatter_(-1, allowed.long(), True)
    return mask & allowed


def _expanded_attention(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    w: MLAWeights,
    shape: MLAShape,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """kv_b over every latent, then ordinary attention with head dims nope+rope (keys) and v;
    transformers' `expand_kv` + attention. Returns [B, heads, T, v]."""
    bsz, total, _ = latent.shape
    kv = linear(latent, w.kv_b).view(bsz, total, shape.heads, -1).transpose(1, 2)
    k_nope, v = kv.split([shape.qk_nope_head_dim, shape.v_head_dim], dim=-1)
    k = torch.cat((k_nope, k_rope[:, None].expand(-1, shape.heads, -1, -1)), dim=-1)
    q = torch.cat((q_nope, q_rope), dim=-1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=shape.scale)
    mask = mask[:, None] if mask.dim() == 3 else mask  # [B, 1, T, keys]: the same for every head
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=shape.scale)


def _absorbed_attention(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    w: MLAWeights,
    shape: MLAShape,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """kv_b folded into the query and the output: attention runs in the latent space, reading the
    cached rows (latent, rope key) once for all heads. Returns [B, heads, T, v].

    Per head h, query t and key s, with fp32 accumulation in every product (torch's bf16 matmuls
    accumulate in fp32 and round once) and dtype the compute dtype (rounding to it is a no-op in
    fp32). A native kernel should round exactly here:
      1. q_lat[h,t]  = round_dtype(q_nope[h,t] @ W_UK[h])                   [kv_lora]
      2. score[h,t,s] = fp32(q_lat[h,t] . latent[s] + q_rope[h,t] . k_rope[s]) * scale,
         -inf where the mask forbids s (causal, `allowed`)
      3. p[h,t,:]    = softmax(score[h,t,:]) in fp32, never rounded
      4. o_lat[h,t]  = round_dtype(sum_s p[h,t,s] * latent[s])               [kv_lora]
      5. out[h,t]    = round_dtype(o_lat[h,t] @ W_UV[h].T)                    [v]
    Steps 2-4 read the cache in fp32 (bf16 widens exactly), so the scores are not rounded to bf16
    as transformers' eager bf16 path rounds them: the same math, one rounding fewer.
    """
    bsz, heads, seqlen, _ = q_nope.shape
    total = latent.shape[1]
    w_uk, w_uv = w.absorbed(shape, q_nope.dtype)
    q_lat = torch.matmul(q_nope, w_uk)  # [B, H, T, kv_lora]
    lat, kr = latent.float(), k_rope.float()  # [B, S, kv_lora], [B, S, rope]; no copy in fp32
    scores = torch.bmm(q_lat.float().reshape(bsz, heads * seqlen, -1), lat.transpose(1, 2))
    scores = scores.baddbmm_(q_rope.float().reshape(bsz, heads * seqlen, -1), kr.transpose(1, 2))
    scores = scores.view(bsz, heads, seqlen, total) * shape.scale
    if mask is None and seqlen > 1:
        mask = torch.ones(seqlen, total, dtype=torch.bool, device=scores.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~(mask[:, None] if mask.dim() == 3 else mask), float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(bsz, heads * seqlen, total)
    out_lat = torch.bmm(probs, lat).to(q_nope.dtype).view(bsz, heads, seqlen, -1)
    return torch.matmul(out_lat, w_uv.transpose(1, 2))  # [B, H, T, v]
