"""GLM-4.5 / 4.5-Air / 4.6 / 4.7 (`glm4_moe`): weights and forward pass.

Pre-norm decoder: h += attn(input_norm(h)); h += mlp(post_attention_norm(h)); final norm; lm_head.
Layers below `first_k_dense_replace` use a dense SwiGLU MLP, the rest a MoE (sigmoid router,
routed experts through an ExpertBackend, plus shared experts). The MTP layer at index
`num_hidden_layers` is not loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..layers.experts import ExpertBackend, InMemoryExperts
from ..fused_decode import FusedDecoder
from ..layers.kv_cache import KVCache
from ..layers import AttentionShape, AttentionWeights, MLPWeights, Rotary, attention, linear, rms_norm, swiglu
from ..layers.router import RouterSpec, RouterWeights, route

# get(name, shape) -> tensor in the model dtype on the model device
TensorGetter = Callable[[str, tuple[int, ...]], torch.Tensor]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    attn: AttentionWeights
    dense_mlp: MLPWeights | None  # layers < first_k_dense_replace
    router: RouterWeights | None  # MoE layers
    shared: MLPWeights | None  # MoE layers with n_shared_experts > 0


@dataclass
class Glm4MoeWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor


def expert_tensor_names(layer: int, expert: int) -> tuple[str, str, str]:
    """Hub names of one routed expert's gate, up and down projections."""
    p = f"model.layers.{layer}.mlp.experts.{expert}"
    return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"


def load_dense_weights(cfg: ModelConfig, get: TensorGetter, get_fp32: TensorGetter, has: Callable[[str], bool]) -> Glm4MoeWeights:
    """Everything except the routed experts, read through `get` (the caller picks dtype/device)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd

    def mlp(prefix: str, inter: int) -> MLPWeights:
        gate = get(f"{prefix}.gate_proj.weight", (inter, h))
        up = get(f"{prefix}.up_proj.weight", (inter, h))
        return MLPWeights(torch.cat([gate, up], 0), get(f"{prefix}.down_proj.weight", (h, inter)))

    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        qkv_w = torch.cat([get(f"{a}.q_proj.weight", (q, h)), get(f"{a}.k_proj.weight", (kv, h)), get(f"{a}.v_proj.weight", (kv, h))], 0)
        qkv_b = None
        if cfg.attention_bias:
            qkv_b = torch.cat([get(f"{a}.q_proj.bias", (q,)), get(f"{a}.k_proj.bias", (kv,)), get(f"{a}.v_proj.bias", (kv,))], 0)
        attn = AttentionWeights(
            qkv_weight=qkv_w,
            qkv_bias=qkv_b,
            o_weight=get(f"{a}.o_proj.weight", (h, q)),
            q_norm=get(f"{a}.q_norm.weight", (hd,)) if cfg.use_qk_norm else None,
            k_norm=get(f"{a}.k_norm.weight", (hd,)) if cfg.use_qk_norm else None,
        )
        dense = router = shared = None
        if cfg.is_moe_layer(i):
            bias_name = f"{p}.mlp.gate.e_score_correction_bias"
            bias = get_fp32(bias_name, (cfg.n_routed_experts,)) if has(bias_name) else None
            router = RouterWeights(
                weight=get_fp32(f"{p}.mlp.gate.weight", (cfg.n_routed_experts, h)),
                correction_bias=bias if bias is not None else torch.zeros(cfg.n_routed_experts),
            )
            if cfg.n_shared_experts > 0:
                shared = mlp(f"{p}.mlp.shared_experts", cfg.shared_intermediate_size)
        else:
            dense = mlp(f"{p}.mlp", cfg.intermediate_size)
        layers.append(
            LayerWeights(
                input_norm=get(f"{p}.input_layernorm.weight", (h,)),
                post_attention_norm=get(f"{p}.post_attention_layernorm.weight", (h,)),
                attn=attn,
                dense_mlp=dense,
                router=router,
                shared=shared,
            )
        )
    embed = get("model.embed_tokens.weight", (cfg.vocab_size, h))
    lm_head = embed if cfg.tie_word_embeddings and not has("lm_head.weight") else get("lm_head.weight", (cfg.vocab_size, h))
    return Glm4MoeWeights(embed=embed, layers=layers, final_norm=get("model.norm.weight", (h,)), lm_head=lm_head)


def load_in_memory_experts(cfg: ModelConfig, get: TensorGetter, progress: Callable[[int], None] | None = None) -> InMemoryExperts:
    """Stack every routed expert of every MoE layer into [E, 2I, H] / [E, H, I] tensors."""
    h, inter, n = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    gate_up: dict[int, torch.Tensor] = {}
    down: dict[int, torch.Tensor] = {}
    for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        first = get(expert_tensor_names(i, 0)[0], (inter, h))
        gu = torch.empty((n, 2 * inter, h), dtype=first.dtype, device=first.device)
        dn = torch.empty((n, h, inter), dtype=first.dtype, device=first.device)
        for e in range(n):
            g_name, u_name, d_name = expert_tensor_names(i, e)
            gu[e, :inter] = first if e == 0 else get(g_name, (inter, h))
            gu[e, inter:] = get(u_name, (inter, h))
            dn[e] = get(d_name, (h, inter))
        gate_up[i], down[i] = gu, dn
        if progress:
            progress(i)
    return InMemoryExperts(gate_up, down)


class Glm4MoeModel:
    """The forward pass. Stateless apart from its weights; the KV cache is passed in."""

    def __init__(self, cfg: ModelConfig, weights: Glm4MoeWeights, experts: ExpertBackend, device: torch.device) -> None:
        self.cfg = cfg
        self.w = weights
        self.experts = experts
        self.device = device
        self.dtype = weights.embed.dtype
        self.rotary = Rotary(cfg.rotary_dim, cfg.rope_theta, device)
        self.attn_shape = AttentionShape(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps)
        self.router_spec = RouterSpec(
            top_k=cfg.num_experts_per_tok,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob,
            scaling=cfg.routed_scaling_factor,
        )
        # Decode on the CPU through one native call per layer (fused_decode.py); False forces the torch ops.
        self.fused_decode = True
        self._fused: FusedDecoder | None | bool = False  # False: not built yet

    def new_cache(self, max_tokens: int, batch: int = 1) -> KVCache:
        c = self.cfg
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, max_tokens, self.dtype, self.device, batch)

    def _moe(self, layer: int, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        ids, weights = route(flat, lw.router, self.router_spec)
        out = self.experts.forward(layer, flat, ids, weights)
        if lw.shared is not None:
            out = out + swiglu(flat, lw.shared)
        return out.view(shape)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Final-normed hidden states [B, T, H] for input_ids at positions start..start+T-1."""
        cfg = self.cfg
        if self.fused_decode and cache is not None and input_ids.shape == (1, 1):
            fused = self._fused_decoder()
            if fused is not None and fused.takes(input_ids, cache):
                return fused.hidden_states(input_ids, cache, start)
        x = F.embedding(input_ids, self.w.embed)
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for i, lw in enumerate(self.w.layers):
            if lw.dense_mlp is None:
                self.experts.hint(i, x)  # the layer's input: a backend may start copies for it now
            h = rms_norm(x, lw.input_norm, cfg.rms_norm_eps)
            x = x + attention(h, lw.attn, self.attn_shape, cos, sin, cache, i, start)
            h = rms_norm(x, lw.post_attention_norm, cfg.rms_norm_eps)
            if lw.dense_mlp is not None:
                x = x + swiglu(h, lw.dense_mlp)
            else:
                self.experts.attended(i, x)
                x = x + self._moe(i, lw, h)
        return rms_norm(x, self.w.final_norm, cfg.rms_norm_eps)

    def _fused_decoder(self) -> FusedDecoder | None:
        """Built at the first decoded token (the weights are final by then), None where it cannot be."""
        if self._fused is False:
            self._fused = FusedDecoder.build(self)
        return self._fused  # type: ignore[return-value]

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.w.lm_head)
