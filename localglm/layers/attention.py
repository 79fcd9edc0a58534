"""Grouped-query attention (glm4_moe), reproducing transformers' `modeling_glm4_moe` operation
order (casts included), because the tests hold our logits to theirs at 1e-4 of the logit scale."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quant.cpu_kernels import cpu_bf16_gemm_is_slow

from .kv_cache import KVCache
from .linear import linear
from .native import native
from .norm import rms_norm
from .rope import apply_rope


@dataclass
class AttentionWeights:
    """One layer's attention; q, k and v are fused into one matrix so a token costs one matmul."""

    qkv_weight: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor  # [hidden, heads * head_dim]
    q_norm: torch.Tensor | None  # [head_dim]
    k_norm: torch.Tensor | None


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int
    eps: float


def attention(
    x: torch.Tensor,
    w: AttentionWeights,
    shape: AttentionShape,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: KVCache | None = None,
    layer: int = 0,
    start: int = 0,
) -> torch.Tensor:
    """Causal GQA self-attention over x [B, T, hidden] at positions start..start+T-1.

    With a cache, k/v are written at those positions and attention reads every cached position
    before them; without one, the call is a self-contained full forward (start must be 0).
    """
    bsz, seqlen, _ = x.shape
    hd = shape.head_dim
    q_size, kv_size = shape.heads * hd, shape.kv_heads * hd
    qkv = linear(x, w.qkv_weight, w.qkv_bias)
    q = qkv[..., :q_size].view(bsz, seqlen, shape.heads, hd)
    k = qkv[..., q_size : q_size + kv_size].view(bsz, seqlen, shape.kv_heads, hd)
    v = qkv[..., q_size + kv_size :].view(bsz, seqlen, shape.kv_heads, hd)
    if w.q_norm is not None:
        q = rms_norm(q, w.q_norm, shape.eps)
        k = rms_norm(k, w.k_norm, shape.eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
        k, v = cache.write(layer, start, k, v)
    total = k.shape[2]
    gqa = shape.heads != shape.kv_heads
    if seqlen == 1 and x.device.type == "cpu":
        out = _decode_attention(q, k, v, hd**-0.5)
    elif seqlen == 1:
        out = F.scaled_dot_product_attention(q, k, v, scale=hd**-0.5, enable_gqa=gqa)
    elif total == seqlen:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd**-0.5, enable_gqa=gqa)
    else:
        # Chunked prefill after cached tokens: query i sees keys 0..start+i.
        qpos = torch.arange(start, start + seqlen, device=x.device)[:, None]
        mask = torch.arange(total, device=x.device)[None, :] <= qpos
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd**-0.5, enable_gqa=gqa)
    out = out.transpose(1, 2).reshape(bsz, seqlen, q_size)
    return linear(out, w.o_weight)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token against the cache, heads grouped per kv head: two small matmuls.

    The CPU flash-attention kernel costs ~0.7 ms a call in bf16 at any length; this costs ~0.05 ms
    at short contexts. Softmax in fp32, as transformers' eager path does.
    """
    lib = native()
    out = lib.decode_attention(q, k, v, scale) if lib is not None else None
    if out is not None:  # one native call instead of ~11 torch ops and fp32 copies of the cache
        return out
    bsz, heads, _, hd = q.shape
    kv_heads = k.shape[1]
    dtype = q.dtype
    if dtype == torch.bfloat16 and cpu_bf16_gemm_is_slow():  # a [group, T] product is a GEMM, not a GEMV
        q, k, v = q.float(), k.float(), v.float()
    qg = q.view(bsz, kv_heads, heads // kv_heads, hd)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(bsz, heads, 1, hd).to(dtype)
