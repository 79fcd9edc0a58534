"""The GLM MoE decoder every architecture of the family shares, around its own attention.

Pre-norm decoder: h += attn(input_norm(h)); h += mlp(post_attention_norm(h)); final norm; lm_head.
Layers below `first_k_dense_replace` use a dense SwiGLU MLP, the rest a MoE (sigmoid router,
routed experts through an ExpertBackend, plus shared experts). GLM-4.x (GQA), GLM-4.7-Flash (MLA)
and GLM-5 (MLA + DSA) differ only in the attention block, so an architecture subclasses
`MoeDecoder` with its attention and its cache, and reads its attention weights with
`load_decoder_weights(..., attention=...)`; everything else (norms, FFN, router, experts, the
layer loop, the fused-decode hook) is written here once. The MTP layer at index
`num_hidden_layers` is a one-layer decoder of the same class (models/mtp.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from quant.native import bf16_gemm_rows

from ..config import ModelConfig
from ..layers.experts import ExpertBackend, InMemoryExperts
from ..layers.kv_cache import HostRows, TokenCache
from ..layers.linear import linear
from ..layers.native import RowsProduct
from ..layers.mlp import MLPWeights, swiglu
from ..layers.norm import rms_norm
from ..layers.router import RouterSpec, RouterWeights, route
from .arch import TensorGetter, WeightReader


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    attn: Any  # the architecture's attention weights
    dense_mlp: MLPWeights | None  # layers < first_k_dense_replace
    router: RouterWeights | None  # MoE layers
    shared: MLPWeights | None  # MoE layers with n_shared_experts > 0


@dataclass
class DecoderWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor


def expert_tensor_names(layer: int, expert: int) -> tuple[str, str, str]:
    """Hub names of one routed expert's gate, up and down projections (the same in every GLM)."""
    p = f"model.layers.{layer}.mlp.experts.{expert}"
    return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"


def load_mlp(get: TensorGetter, prefix: str, hidden: int, inter: int) -> MLPWeights:
    """A SwiGLU MLP under `prefix` with gate and up fused into one matrix."""
    gate = get(f"{prefix}.gate_proj.weight", (inter, hidden))
    up = get(f"{prefix}.up_proj.weight", (inter, hidden))
    return MLPWeights(torch.cat([gate, up], 0), get(f"{prefix}.down_proj.weight", (hidden, inter)))


def load_decoder_weights(cfg: ModelConfig, r: WeightReader, attention: Callable[[int], Any]) -> DecoderWeights:
    """Everything except the routed experts; `attention(layer)` reads that layer's attention weights."""
    h = cfg.hidden_size
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        attn = attention(i)
        dense = router = shared = None
        if cfg.is_moe_layer(i):
            bias_name = f"{p}.mlp.gate.e_score_correction_bias"
            bias = r.get_fp32(bias_name, (cfg.n_routed_experts,)) if r.has(bias_name) else None
            weight = r.get_fp32(f"{p}.mlp.gate.weight", (cfg.n_routed_experts, h))
            zeros = torch.zeros(cfg.n_routed_experts, device=weight.device)  # on the router's device (a GPU model has no CPU tensors)
            router = RouterWeights(weight=weight, correction_bias=bias if bias is not None else zeros)
            if cfg.n_shared_experts > 0:
                shared = load_mlp(r.get, f"{p}.mlp.shared_experts", h, cfg.shared_intermediate_size)
        else:
            dense = load_mlp(r.get, f"{p}.mlp", h, cfg.intermediate_size)
        layers.append(
            LayerWeights(
                input_norm=r.get(f"{p}.input_layernorm.weight", (h,)),
                post_attention_norm=r.get(f"{p}.post_attention_layernorm.weight", (h,)),
                attn=attn,
                dense_mlp=dense,
                router=router,
                shared=shared,
            )
        )
    embed = r.get("model.embed_tokens.weight", (cfg.vocab_size, h))
    lm_head = embed if cfg.tie_word_embeddings and not r.has("lm_head.weight") else r.get("lm_head.weight", (cfg.vocab_size, h))
    return DecoderWeights(embed=embed, layers=layers, final_norm=r.get("model.norm.weight", (h,)), lm_head=lm_head)


def load_in_memory_experts(cfg: ModelConfig, get: TensorGetter, progress: Callable[[int], None] | None = None) -> InMemoryExperts:
    """Stack every routed expert of every MoE layer into [E, 2I, H] / [E, H, I] tensors."""
    h, inter, n = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    gate_up: dict[int, torch.Tensor] = {}
    down: dict[int, torch.Tensor] = {}
    for i in cfg.moe_layers:
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


def router_spec_of(cfg: ModelConfig) -> RouterSpec:
    return RouterSpec(
        top_k=cfg.num_experts_per_tok,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        norm_topk_prob=cfg.norm_topk_prob,
        scaling=cfg.routed_scaling_factor,
    )


class MoeRouting:
    """What expert prediction needs of a model, available before the model is built: each MoE
    layer's post-attention norm and router, the routing rule, the norm eps (offload.prefetch)."""

    def __init__(self, cfg: ModelConfig, weights: DecoderWeights) -> None:
        self.cfg = cfg
        self.w = weights
        self.router_spec = router_spec_of(cfg)

    def moe_routers(self) -> dict[int, tuple[torch.Tensor, RouterWeights]]:
        """Per MoE layer, its post-attention norm weight and router: what expert prediction applies."""
        return {i: (lw.post_attention_norm, lw.router) for i, lw in enumerate(self.w.layers) if lw.router is not None}


# The narrowest model whose prompt chunks of quant.native.BF16_GEMM_ROWS tokens or more leave the fused layers
# for the bf16 GEMM where the CPU has one: at smaller widths the torch ops' per-call cost eats the gain.
# Zen 4, 1 thread, 128-token prompt, CPU s fused -> torch layers with the bf16 GEMM: the ~0.9B model
# (1024 wide) q2 0.74 -> 0.59, q4 0.77 -> 0.65, q8 0.74 -> 0.61; GLM-4.5-Air widths (4096) q4 3.2 -> 2.3-2.7;
# the packaged 256-wide model 0.024 either way.
BF16_PREFILL_MIN_HIDDEN = 1024


def native_forward(model: MoeDecoder, tokens: int) -> bool:
    """Whether a forward of this many tokens should try the fused native layers (MoeDecoder's flags)."""
    if tokens == 1:
        return model.fused_decode
    return model.fused_prefill and tokens <= model.fused_prefill_max


class MoeDecoder(MoeRouting):
    """The forward pass. Stateless apart from its weights; the cache is passed in.

    Subclasses give the attention (`attention`), the cache layout (`new_cache`), the rotary tables
    (`rope`), and may give a native CPU path (`build_fused_decoder`)."""

    def __init__(
        self, cfg: ModelConfig, weights: DecoderWeights, experts: ExpertBackend, device: torch.device, kv_host: HostRows | None = None
    ) -> None:
        super().__init__(cfg, weights)
        self.experts = experts
        self.device = device
        self.kv_host = kv_host  # the latent cache's rows in host RAM (the plan's choice for DSA at long context)
        self.dtype = weights.embed.dtype
        # Decode on the CPU through native calls where the architecture has them; False forces the torch ops.
        self.fused_decode = True
        # Forwards of several tokens (prompt chunks, speculative verification) through the same native
        # calls, each token's numbers those of a one-token step; False runs them through the torch ops.
        self.fused_prefill = True
        # ... up to this many tokens a call: the native layers loop tokens over attention and read a
        # weight row for 4 tokens at a time, which beats torch's ops up to ~128 tokens and loses to its
        # GEMMs beyond (default model, 1-2 threads: 1.3-12x at 8-128 tokens, 0.64x at 256).
        self.fused_prefill_max = 128
        rows = bf16_gemm_rows()
        if rows is not None and self.dtype == torch.bfloat16 and device.type == "cpu" and cfg.hidden_size >= BF16_PREFILL_MIN_HIDDEN:
            # A CPU with a native bf16 GEMM (AVX512-BF16, AMX) at real widths: longer chunks go to the torch
            # layers, whose products run through it (quant.native.bf16_tiled_linear: ~2x the int8 tiles there)
            # from the same row count on
            self.fused_prefill_max = rows - 1
        self._fused: Any = False  # False: not built yet; None: the native path does not take this model
        self._head: RowsProduct | None = None  # the lm_head's few-row product, made at first use

    # ---- the architecture's part ---------------------------------------------------------------
    def new_cache(self, max_tokens: int, batch: int = 1) -> TokenCache:
        raise NotImplementedError

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin tables [T, rot] for these positions."""
        raise NotImplementedError

    def attention(
        self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: TokenCache | None, start: int, step: dict[str, Any]
    ) -> torch.Tensor:
        """Layer `layer`'s attention over the normed input h. `step` lives for one forward call: what a
        layer leaves there the later layers of the same call read (GLM-5.2's shared top-k); "steps" says
        the call is a speculative verification (`residual`)."""
        raise NotImplementedError

    def build_fused_decoder(self) -> Any:
        """The native decoder for this model (one token, or several of one sequence), or None (the torch ops then run)."""
        return None

    # ---- shared ---------------------------------------------------------------------------------
    def _moe(self, layer: int, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        ids, weights = route(flat, lw.router, self.router_spec)
        out = self.experts.forward(layer, flat, ids, weights)
        if lw.shared is not None:
            out = out + swiglu(flat, lw.shared)
        return out.view(shape)

    def hidden_states(self, input_ids: torch.Tensor, cache: TokenCache | None = None, start: int = 0, *, steps: bool = False) -> torch.Tensor:
        """Final-normed hidden states [B, T, H] for input_ids at positions start..start+T-1 (`steps`: `residual`'s)."""
        return rms_norm(self.residual(input_ids, cache, start, steps=steps), self.w.final_norm, self.cfg.rms_norm_eps)

    def residual(self, input_ids: torch.Tensor, cache: TokenCache | None = None, start: int = 0, *, steps: bool = False) -> torch.Tensor:
        """The residual stream [B, T, H] after the last layer, before the final norm: what the MTP
        head (models/mtp.py) reads beside the next token. One sequence with a cache goes through the fused
        native layers in pieces of `native_piece` tokens where that is not 0 (each token's numbers its
        one-token step's, whatever the pieces). `steps`: the tokens are a speculative verification, so
        where an architecture's forward over a chunk differs from its tokens decoded one by one (DSA's
        top-k ties, broken over the chunk's masked rows as transformers' forward breaks them) each token
        takes its decode step's choice, and the verified output is the plain decode's."""
        T = input_ids.shape[-1]
        piece = self.native_piece(T, start) if cache is not None and input_ids.dim() == 2 and input_ids.shape[0] == 1 else 0
        if piece:
            fused = self._fused_decoder()
            if fused is not None and fused.takes(input_ids, cache):
                ends = 0 if steps else start + T  # the pieces' picks as the whole call's
                pieces = [fused.residual(input_ids[:, s : s + piece], cache, start + s, ends) for s in range(0, T, piece)]
                return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        return self.run_layers(F.embedding(input_ids, self.w.embed), cache, start, steps=steps)

    def native_piece(self, tokens: int, start: int) -> int:
        """Tokens a call of the fused native layers takes when `tokens` new ones at `start` go through them, or 0
        where the torch layers run the forward: all of them up to `fused_prefill_max` (`native_forward`)."""
        return tokens if native_forward(self, tokens) else 0

    def run_layers(self, x: torch.Tensor, cache: TokenCache | None, start: int, *, steps: bool = False) -> torch.Tensor:
        """Every layer over the input stream x [B, T, H] at positions start..; the stream after the last.
        One sequence's stream on the CPU (an MTP block's drafts and verification) runs through the
        native layers where they take the model, as `residual`'s tokens do (`steps` as there)."""
        if cache is not None and native_forward(self, x.shape[1]):
            fused = self._fused_decoder()
            if fused is not None and fused.takes_stream(x, cache):
                return fused.forward_stream(x, cache, start, 0 if steps else None)
        cfg = self.cfg
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        cos, sin = self.rope(positions, x.dtype)
        step: dict[str, Any] = {"steps": steps}
        for i, lw in enumerate(self.w.layers):
            if lw.dense_mlp is None:
                self.experts.hint(i, x)  # the layer's input: a backend may start copies for it now
            h = rms_norm(x, lw.input_norm, cfg.rms_norm_eps)
            x = x + self.attention(i, h, cos, sin, cache, start, step)
            h = rms_norm(x, lw.post_attention_norm, cfg.rms_norm_eps)
            if lw.dense_mlp is not None:
                x = x + swiglu(h, lw.dense_mlp)
            else:
                self.experts.attended(i, x)
                x = x + self._moe(i, lw, h)
        return x

    def _fused_decoder(self) -> Any:
        """Built at the first decoded token (the weights are final by then), None where it cannot be."""
        if self._fused is False:
            self._fused = self.build_fused_decoder()
        return self._fused

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of normed hidden states [..., H]. Where the native layers take the model, a few rows on
        the CPU (a decode step, a speculative verification) go through the native one-row products,
        whose rows do not depend on how many there are (layers.native.RowsProduct); more (a perplexity
        over a whole text) through torch's GEMM; and so do all rows where `fused_decode` is off."""
        if hidden.device.type == "cpu" and self.fused_decode and self._fused_decoder() is not None:
            return self._head_product()(hidden, self.fused_prefill_max)
        return linear(hidden, self.w.lm_head)

    def _head_product(self) -> RowsProduct:
        if self._head is None or self._head.w is not self.w.lm_head:
            self._head = RowsProduct(self.w.lm_head, self.dtype)
        return self._head

    def next_token_logits(self, token: int, cache: TokenCache, start: int) -> torch.Tensor:
        """Logits [vocab] of `token` decoded at position `start` (its keys written to the cache): the plain
        decode loop's step, the numbers of `lm_head(hidden_states(...))`. On the CPU the fused decoder runs
        it as three native calls without the general path's per-call Python (`FusedDecoder.token_logits`)."""
        if self.device.type == "cpu" and native_forward(self, 1):
            fused = self._fused_decoder()
            out = fused.token_logits(token, cache, start, self._head_product()) if fused is not None else None
            if out is not None:
                return out
        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
        return self.lm_head(self.hidden_states(ids, cache, start)[0, -1])


class MoeBuilder:
    """The registry's `model` piece for a GLM MoE architecture: set `model_class` and read one layer's
    attention in `load_attention`; the rest of the weights and the routing are the shared decoder's."""

    model_class: type[MoeDecoder] = MoeDecoder

    def load_attention(self, cfg: Any, reader: WeightReader, layer: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must read its attention weights")

    def load_weights(self, cfg: ModelConfig, reader: WeightReader) -> DecoderWeights:
        return load_decoder_weights(cfg, reader, lambda i: self.load_attention(cfg, reader, i))

    def build(
        self, cfg: ModelConfig, weights: DecoderWeights, experts: ExpertBackend, device: torch.device, kv_host: HostRows | None = None
    ) -> MoeDecoder:
        return self.model_class(cfg, weights, experts, device, kv_host)

    def routing(self, cfg: ModelConfig, weights: DecoderWeights) -> MoeRouting:
        return MoeRouting(cfg, weights)
