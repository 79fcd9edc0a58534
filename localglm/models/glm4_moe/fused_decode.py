"""Decode on the CPU with one native call per layer (localglm/models/native/decode_layer.c `lg_decode_layer`).

Why: through torch a decoded token is ~60 small ops per layer at ~6 us each, which on the CPU cost
more than the arithmetic of a small or quantized model. The fused call runs norm, q/k/v, q/k norm,
RoPE, the cache write, attention, o_proj, the residual, the post-attention norm and then the dense
MLP, or the MoE router and shared experts, with the rounding points of layers.py. Routed experts
in RAM (QuantizedExperts, InMemoryExperts) run inside the same call, and then the whole token is
one call (`lg_decode_layers`); any other backend (offloaded, or wrapped, e.g. by the tracer) gets
its `hint` / `forward` calls per layer as in the torch path, so it keeps its own placement,
statistics and prefetch, and its output is added at the start of the next layer's call.

`FusedDecoder.build` returns None where the kernels do not take the model (no C compiler, a GPU,
dtypes other than fp32/bf16, weights in a layout the kernel does not read); the model then decodes
through the torch ops, as prefill always does.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from quant.native import LgMat

from ...layers.experts import InMemoryExperts, QuantizedExperts
from ...layers.kv_cache import KVCache
from ...layers.native import LayerLib, LgExperts, LgLayer, native
from ...layers.norm import rms_norm

if TYPE_CHECKING:
    from ..moe_decoder import LayerWeights
    from .model import Glm4MoeModel


@dataclass
class _FusedLayer:
    """A layer's C description and everything its pointers point into (kept alive here)."""

    desc: LgLayer
    keep: list[object]
    moe: bool
    has_mlp: bool


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous()


class FusedDecoder:
    """One-token forward through the fused native layers: `hidden_states` as Glm4MoeModel's."""

    def __init__(self, model: Glm4MoeModel, lib: LayerLib, layers: list[_FusedLayer]) -> None:
        self.model = model
        self.lib = lib
        self.layers = layers
        self._descs = (LgLayer * len(layers))(*(layer.desc for layer in layers))  # for the one-call-per-token path
        self._tables: tuple | None = None  # (backend, its experts per layer, the whole-token array) last seen
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos / sin of every cache position

    def _cos_sin(self, pos: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This position's rotary table rows [1, rot]: the same values as Rotary.cos_sin (checked
        elementwise), computed once for the whole cache instead of ~6 ops per token."""
        if self._rope is None or self._rope[0].shape[0] < max_tokens:
            self._rope = self.model.rotary.cos_sin(torch.arange(max_tokens), self.model.dtype)
        return self._rope[0][pos : pos + 1], self._rope[1][pos : pos + 1]

    def _experts_in_ram(self) -> tuple[list[LgExperts | None], ctypes.Array | None]:
        """Per layer, the routed experts the native call runs itself (QuantizedExperts or
        InMemoryExperts, not a wrapper: a wrapper must see each call; None where the backend runs
        them), and, when that is every MoE layer, `decode_layers`' array of them. Looked up once
        per backend object."""
        experts = self.model.experts
        if self._tables is None or self._tables[0] is not experts:
            inside = type(experts) in (QuantizedExperts, InMemoryExperts)
            per_layer = [experts.fused_experts(i) if inside and layer.moe else None for i, layer in enumerate(self.layers)]
            every = all(t is not None for t, layer in zip(per_layer, self.layers) if layer.moe)
            whole = (LgExperts * len(per_layer))(*(t if t is not None else LgExperts() for t in per_layer)) if every else None
            self._tables = (experts, per_layer, whole)
        return self._tables[1], self._tables[2]

    @classmethod
    def build(cls, model: Glm4MoeModel) -> FusedDecoder | None:
        """The fused decoder for this model, or None where the native kernels do not take it."""
        if model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16):
            return None
        lib = native()
        if lib is None:
            return None
        layers = []
        for lw in model.w.layers:
            layer = cls._describe(model, lw)
            if layer is None:
                return None
            layers.append(layer)
        return cls(model, lib, layers)

    @staticmethod
    def _describe(model: Glm4MoeModel, lw: LayerWeights) -> _FusedLayer | None:
        cfg, dtype = model.cfg, model.dtype
        keep: list[object] = []

        def mat(w: object, bias: torch.Tensor | None = None) -> LgMat | None:
            b = _fp32(bias)
            keep.extend((w, b))
            return LayerLib.describe_matrix(w, dtype, b)  # type: ignore[arg-type]

        def vec(t: torch.Tensor | None, want: torch.dtype) -> int | None:
            if t is None:
                return None
            t = t.detach().to(want).contiguous()
            keep.append(t)
            return t.data_ptr()

        a = lw.attn
        mlp = lw.dense_mlp if lw.dense_mlp is not None else lw.shared
        mats = [mat(a.qkv_weight, a.qkv_bias), mat(a.o_weight)]
        if mlp is not None:
            mats += [mat(mlp.gate_up), mat(mlp.down)]
        if any(m is None for m in mats):
            return None
        for t in (lw.input_norm, lw.post_attention_norm, a.q_norm, a.k_norm):
            if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != dtype or t.device.type != "cpu"):
                return None
        moe = lw.router is not None
        desc = LgLayer(
            hidden=cfg.hidden_size, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, hd=cfg.head_dim,
            rot=cfg.rotary_dim, dtype=0 if dtype == torch.float32 else 1, eps=cfg.rms_norm_eps,
            moe=int(moe), has_mlp=int(mlp is not None),
            n_experts=cfg.n_routed_experts if moe else 0, top_k=cfg.num_experts_per_tok,
            n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk=int(cfg.norm_topk_prob),
            scaling=cfg.routed_scaling_factor,
            input_norm=vec(lw.input_norm, dtype), post_norm=vec(lw.post_attention_norm, dtype),
            q_norm=vec(a.q_norm, dtype), k_norm=vec(a.k_norm, dtype),
            router_w=vec(lw.router.weight, torch.float32) if moe else None,
            router_bias=vec(lw.router.correction_bias, torch.float32) if moe else None,
            qkv=mats[0], o=mats[1], gate_up=mats[2] if mlp is not None else LgMat(), down=mats[3] if mlp is not None else LgMat(),
        )  # fmt: skip
        return _FusedLayer(desc, keep, moe, mlp is not None)

    def takes(self, input_ids: torch.Tensor, cache: KVCache | None) -> bool:
        """Whether this call is one the fused path runs: one token of one sequence, a CPU cache of the model dtype."""
        return (
            cache is not None
            and input_ids.shape == (1, 1)
            and cache.k.shape[1] == 1
            and cache.k.dtype == self.model.dtype
            and cache.k.device.type == "cpu"
        )

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Final-normed hidden state [1, 1, H] of one token at position `start`, its k/v written to the cache."""
        m, cfg = self.model, self.model.cfg
        if start + 1 > cache.max_tokens:
            raise ValueError(f"KV cache overflow: position {start + 1} > context {cache.max_tokens}")
        x = F.embedding(input_ids, m.w.embed).reshape(cfg.hidden_size).to(m.dtype).contiguous()
        cos, sin = self._cos_sin(start, cache.max_tokens)
        threads, k, hidden = torch.get_num_threads(), cfg.num_experts_per_tok, cfg.hidden_size
        per_layer, whole = self._experts_in_ram()
        if whole is not None:  # the whole token in one native call
            self.lib.decode_layers(self._descs, x, cos, sin, cache.k[:, 0], cache.v[:, 0], start, whole, threads)
            return rms_norm(x.view(1, 1, hidden), m.w.final_norm, cfg.rms_norm_eps)
        # Experts in RAM run inside the layer call; any other backend (a wrapper such as
        # the tracer included) gets its hint and forward calls as in the torch path.
        add: tuple[torch.Tensor, torch.Tensor | None] | None = None
        for i, layer in enumerate(self.layers):
            h = torch.empty(1, 1, hidden, dtype=m.dtype)
            ids = torch.empty(1, k, dtype=torch.int64)
            wts = torch.empty(1, k, dtype=torch.float32)
            shared = torch.empty(hidden, dtype=m.dtype) if layer.moe and layer.has_mlp else None
            native = per_layer[i]
            routed = torch.empty(hidden, dtype=m.dtype) if native is not None else None
            if layer.moe and native is None:  # the backend gets the layer's input before it runs
                if add is not None:
                    self.lib.residual_add(x, *add)
                    add = None
                m.experts.hint(i, x.view(1, 1, hidden))
            self.lib.decode_layer(layer.desc, x, add, cos, sin, cache.k[i, 0], cache.v[i, 0], start, h, ids, wts, shared, threads, native, routed)
            add = None
            if layer.moe and native is None:
                m.experts.attended(i, x.view(1, 1, hidden))  # x: the layer's input plus its attention
                routed = m.experts.forward(i, h.view(1, hidden), ids, wts)
                add = (routed.reshape(hidden).to(m.dtype).contiguous(), shared)
        if add is not None:
            self.lib.residual_add(x, *add)
        return rms_norm(x.view(1, 1, hidden), m.w.final_norm, cfg.rms_norm_eps)
