"""Dense building blocks of the GLM decoder: RMSNorm, partial NeoX RoPE, GQA attention, SwiGLU.

Each function reproduces the operation order of transformers' `modeling_glm4_moe` (casts
included), because the tests hold our logits to theirs at 1e-4 of the logit scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from .kv_cache import KVCache


@cache
def _cpu_bf16_gemm_is_slow() -> bool:
    """True on CPUs without native bf16 (no AVX512-BF16 / AMX), where bf16 GEMM runs ~7x below fp32."""
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, but batched bf16 on such CPUs upcasts to fp32 per call (weights stay bf16 in RAM).

    A matrix-vector product is memory-bound and stays in bf16; a matrix-matrix product (prefill,
    experts hit by several tokens) is compute-bound, where the upcast costs far less than it saves.
    """
    if not isinstance(w, torch.Tensor):  # a quant.QuantTensor: its own packed kernels
        return w.matmul(x, b)
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() > x.shape[-1] and _cpu_bf16_gemm_is_slow():
        return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    return F.linear(x, w, b)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, cast back, then scaled (the cast comes before the weight, as in
    transformers). On the CPU one native call (quant/native.py) where the kernels are built: a
    norm is otherwise six torch ops of ~6 us each, ~50 norms per decoded token."""
    if x.device.type == "cpu":
        lib = _native()
        out = lib.rms_norm(x, weight, eps) if lib is not None else None
        if out is not None:
            return out
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


@cache
def _native():  # noqa: ANN202  (quant.native.NativeLib | None; imported late: quant imports this module)
    """The native CPU kernels, looked up once (a hot path: ~50 norms and 24 RoPE calls a token)."""
    from quant.native import native_lib

    return native_lib()


class Rotary:
    """Partial rotary embedding: only the first `rotary_dim` dims of a head rotate, halves paired."""

    def __init__(self, rotary_dim: int, theta: float, device: torch.device | str = "cpu") -> None:
        self.rotary_dim = rotary_dim
        steps = torch.arange(0, rotary_dim, 2, dtype=torch.float, device=device)
        self.inv_freq = 1.0 / (theta ** (steps / rotary_dim))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape [T, rotary_dim] for integer positions [T]."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the leading `cos.shape[-1]` dims of x [B, heads, T, head_dim]; the rest pass through."""
    if x.shape[-2] == 1 and x.device.type == "cpu":  # decode: one native call instead of ~10 ops
        lib = _native()
        out = lib.rope(x, cos, sin) if lib is not None else None
        if out is not None:
            return out
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    out = x_rot * cos + _rotate_half(x_rot) * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


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
    lib = _native()
    out = lib.decode_attention(q, k, v, scale) if lib is not None else None
    if out is not None:  # one native call instead of ~11 torch ops and fp32 copies of the cache
        return out
    bsz, heads, _, hd = q.shape
    kv_heads = k.shape[1]
    dtype = q.dtype
    if dtype == torch.bfloat16 and _cpu_bf16_gemm_is_slow():  # a [group, T] product is a GEMM, not a GEMV
        q, k, v = q.float(), k.float(), v.float()
    qg = q.view(bsz, kv_heads, heads // kv_heads, hd)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(bsz, heads, 1, hd).to(dtype)


@dataclass
class MLPWeights:
    """A SwiGLU MLP with gate and up fused: gate_up [2 * inter, hidden], down [hidden, inter]."""

    gate_up: torch.Tensor
    down: torch.Tensor


def swiglu(x: torch.Tensor, w: MLPWeights) -> torch.Tensor:
    """down(silu(gate(x)) * up(x))."""
    gate, up = linear(x, w.gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w.down)
