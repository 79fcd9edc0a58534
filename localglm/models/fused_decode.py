"""Decode and prefill on the CPU with one native call per layer (localglm/models/native/decode_layer.c `lg_decode_layer`).

Why: through torch a decoded token is ~60 small ops per layer at ~6 us each, which on the CPU cost
more than the arithmetic of a small or quantized model. The fused call runs the input norm, the
attention (projections, RoPE, the cache write, attention over the cache, o_proj), the residual, the
post-attention norm and then the dense MLP, or the MoE router and shared experts, with the rounding
points of the torch layers. Routed experts in RAM (QuantizedExperts, InMemoryExperts) run inside
the same call, and then the whole forward is one call (`lg_decode_layers`); any other backend
(offloaded, or wrapped, e.g. by the tracer) gets its `hint` / `attended` / `forward` calls per layer
as in the torch path, so it keeps its own placement, statistics and prefetch, and its output is
added at the start of the next layer's call.

A call takes T consecutive tokens of one sequence (a prompt chunk, a speculative verification of
k drafts, or one decoded token): each token gets exactly the arithmetic of a one-token call, token t
writing its cache row and attending up to itself, while quantized weights are read once for several
tokens and each routed expert runs once for the tokens routed to it. So a prompt or a verification
through here is bit-identical to decoding its tokens one by one (tests/test_fused_prefill.py), and
greedy speculation is plain decoding. The torch layers keep prefill where this path does not take
the model, and for chunks above `MoeDecoder.fused_prefill_max` tokens, where their GEMMs are faster
(`fused_prefill` False sends every multi-token forward there).

This driver is every GLM MoE architecture's, as the C decoder skeleton is: an architecture
subclasses FusedDecoder with what its attention is (glm4_moe/fused_decode.py: grouped-query
attention over a KVCache; glm4_moe_lite/fused_decode.py: multi-head latent attention over a
LatentCache; glm_moe_dsa/fused_decode.py: MLA over the top-k of its sparse-attention indexer, over a
DsaCache), i.e. the attention fields of each layer's LgLayer and the cache the native layer reads.
DSA's layers pass each token's pick on through a selection buffer this driver keeps for the call,
in the whole-forward call and between the per-layer calls alike.

`FusedDecoder.build` returns None where the kernels do not take the model (no C compiler, a GPU,
dtypes other than fp32/bf16, weights in a layout the kernel does not read); the model then runs
through the torch ops.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from quant.native import LgMat

from ..layers.experts import InMemoryExperts, LayerOffset, QuantizedExperts
from ..layers.kv_cache import TokenCache
from ..layers.native import LayerLib, LgExperts, LgLayer, RowsProduct, native
from ..layers.norm import rms_norm

if TYPE_CHECKING:
    from .moe_decoder import LayerWeights, MoeDecoder


class Pinned:
    """The C views of one layer's tensors, and everything they point into, kept alive together."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.keep: list[object] = []

    def mat(self, w: object, bias: torch.Tensor | None = None) -> LgMat | None:
        """A weight (dense or quantized) and its bias as an LgMat, or None where the kernels do not take it."""
        b = None if bias is None else bias.detach().float().contiguous()
        mat = LayerLib.describe_matrix(w, self.dtype, b)  # type: ignore[arg-type]
        self.keep.extend((w, b, mat))  # mat too: a stack's parts live in a table it holds
        return mat

    def vec(self, t: torch.Tensor | None, want: torch.dtype | None = None) -> int | None:
        """A vector's address as `want` (the model dtype by default); None for an absent one."""
        if t is None:
            return None
        t = t.detach().to(want or self.dtype).contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def takes_norms(self, *weights: torch.Tensor | None) -> bool:
        """Whether these norm weights (None: absent) are CPU tensors of the model dtype, as the kernel rounds them."""
        return all(t is None or (isinstance(t, torch.Tensor) and t.dtype == self.dtype and t.device.type == "cpu") for t in weights)


@dataclass
class _FusedLayer:
    """A layer's C description and everything its pointers point into (kept alive here)."""

    desc: LgLayer
    keep: list[object]
    moe: bool
    has_mlp: bool


class FusedDecoder:
    """The forward of one sequence's tokens through the fused native layers: `hidden_states` as MoeDecoder's. An
    architecture's subclass says what its attention is (`cache_type`, `_attention`, `_cache`)."""

    cache_type: ClassVar[type[TokenCache]]  # the cache the native attention reads

    def __init__(self, model: MoeDecoder, lib: LayerLib, layers: list[_FusedLayer]) -> None:
        self.model = model
        self.lib = lib
        self.layers = layers
        self._descs = (LgLayer * len(layers))(*(layer.desc for layer in layers))  # for the one-call-per-forward path
        self._tables: tuple | None = None  # (backend, its experts per layer, the whole-token array, a LayerOffset's inner) last seen
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos / sin of every cache position
        self._index_slot: list[int | None] = []  # a DSA full layer's slot in the indexer-key cache: the full layers in order
        # the one-sequence views of the cache forward_stream last ran on (weakly held: a dropped cache's memory is freed)
        self._views_of: tuple[weakref.ref[TokenCache], torch.Tensor, torch.Tensor | None] | None = None
        for layer in layers:
            self._index_slot.append(sum(slot is not None for slot in self._index_slot) if layer.desc.dsa else None)

    # ---- the architecture's part ----------------------------------------------------------------
    @classmethod
    def _attention(cls, model: Any, attn: Any, pin: Pinned) -> dict[str, Any] | None:
        """The attention fields of a layer's LgLayer (attn_kind, heads, rot, o, and the kind's own),
        their tensors pinned in `pin`; None where the kernel does not take these weights."""
        raise NotImplementedError

    @staticmethod
    def _cache(cache: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cache as the native attention reads it: k and v [layers, batch, kv_heads, T, row]
        (views), v None where one tensor holds both."""
        raise NotImplementedError

    @staticmethod
    def _index_keys(cache: Any) -> torch.Tensor | None:
        """DSA's indexer-key cache as the native layer reads it, [full layers, T, index_head_dim] of
        the one sequence (a view); None for attention without an indexer."""
        return None

    def _selection(self, cache: Any, tokens: int) -> torch.Tensor | None:
        """DSA: the buffer (int32 [tokens, room], a layer_ops.h `lg_selection` per token) through
        which each token's full-layer pick reaches the shared layers after it, with room for a pick
        from this cache; None for attention without one."""
        return None

    # ---- shared ---------------------------------------------------------------------------------
    def _cos_sin(self, pos: int, n: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary table rows [n, rot] of positions pos..pos+n-1: the model's own table
        (`MoeDecoder.rope`), computed once for the whole cache instead of ~6 ops per token."""
        if self._rope is None or self._rope[0].shape[0] < max_tokens:
            self._rope = self.model.rope(torch.arange(max_tokens), self.model.dtype)
        return self._rope[0][pos : pos + n], self._rope[1][pos : pos + n]

    def _experts_in_ram(self) -> tuple[list[LgExperts | None], ctypes.Array | None]:
        """Per layer, the routed experts the native call runs itself (QuantizedExperts or
        InMemoryExperts, not a wrapper: a wrapper must see each call; None where the backend runs
        them), and, when that is every MoE layer, `decode_layers`' array of them. Looked up once
        per backend object."""
        experts = self.model.experts
        inner_now = experts.inner if type(experts) is LayerOffset else None  # the loader may swap a LayerOffset's backend (offloading)
        if self._tables is None or self._tables[0] is not experts or self._tables[3] is not inner_now:
            # an MTP block's experts are its backend's layer N (LayerOffset): in RAM, they run inside too
            renamed = experts.in_ram() if type(experts) is LayerOffset else None
            inner, offset = renamed if renamed is not None else (experts, 0)
            inside = type(inner) in (QuantizedExperts, InMemoryExperts)
            per_layer = [inner.fused_experts(i + offset) if inside and layer.moe else None for i, layer in enumerate(self.layers)]
            every = all(t is not None for t, layer in zip(per_layer, self.layers) if layer.moe)
            whole = (LgExperts * len(per_layer))(*(t if t is not None else LgExperts() for t in per_layer)) if every else None
            self._tables = (experts, per_layer, whole, inner_now)
        return self._tables[1], self._tables[2]

    @classmethod
    def build(cls, model: MoeDecoder) -> FusedDecoder | None:
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

    @classmethod
    def _describe(cls, model: MoeDecoder, lw: LayerWeights) -> _FusedLayer | None:
        cfg, dtype = model.cfg, model.dtype
        pin = Pinned(dtype)
        attn = cls._attention(model, lw.attn, pin)
        mlp = lw.dense_mlp if lw.dense_mlp is not None else lw.shared
        mats = [pin.mat(mlp.gate_up), pin.mat(mlp.down)] if mlp is not None else [LgMat(), LgMat()]
        if attn is None or any(m is None for m in mats) or not pin.takes_norms(lw.input_norm, lw.post_attention_norm):
            return None
        moe = lw.router is not None
        desc = LgLayer(
            hidden=cfg.hidden_size, dtype=0 if dtype == torch.float32 else 1, eps=cfg.rms_norm_eps,
            moe=int(moe), has_mlp=int(mlp is not None),
            n_experts=cfg.n_routed_experts if moe else 0, top_k=cfg.num_experts_per_tok,
            n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk=int(cfg.norm_topk_prob),
            scaling=cfg.routed_scaling_factor,
            input_norm=pin.vec(lw.input_norm), post_norm=pin.vec(lw.post_attention_norm),
            router_w=pin.vec(lw.router.weight, torch.float32) if moe else None,
            router_bias=pin.vec(lw.router.correction_bias, torch.float32) if moe else None,
            gate_up=mats[0], down=mats[1], **attn,
        )  # fmt: skip
        return _FusedLayer(desc, pin.keep, moe, mlp is not None)

    def takes(self, input_ids: torch.Tensor, cache: TokenCache | None) -> bool:
        """Whether this call is one the fused path runs: consecutive tokens of one sequence
        (input_ids [1, T]), a CPU cache of the attention's type and the model dtype."""
        return input_ids.dim() == 2 and input_ids.shape[0] == 1 and input_ids.shape[1] >= 1 and self._takes_cache(cache)

    def takes_stream(self, x: torch.Tensor, cache: TokenCache | None) -> bool:
        """Whether `forward_stream` runs this input stream x [1, T, H] (an MTP block's: the model
        dtype on the CPU) over this cache."""
        m = self.model
        return (x.dim() == 3 and x.shape[0] == 1 and x.shape[1] >= 1 and x.shape[2] == m.cfg.hidden_size and x.dtype == m.dtype
                and x.device.type == "cpu" and self._takes_cache(cache))

    def _takes_cache(self, cache: TokenCache | None) -> bool:
        if not isinstance(cache, self.cache_type) or getattr(cache, "host", None) is not None:
            return False  # rows kept apart in host RAM are brought over by `read`, which the kernel does not do
        k, _ = self._cache(cache)
        return k.shape[1] == 1 and k.dtype == self.model.dtype and k.device.type == "cpu"

    def hidden_states(self, input_ids: torch.Tensor, cache: TokenCache, start: int) -> torch.Tensor:
        """Final-normed hidden states [1, T, H] of the tokens at positions start.., their keys written to the cache."""
        m = self.model
        return rms_norm(self.residual(input_ids, cache, start), m.w.final_norm, m.cfg.rms_norm_eps)

    def residual(self, input_ids: torch.Tensor, cache: TokenCache, start: int, picks_end: int | None = None) -> torch.Tensor:
        """The residual stream [1, T, H] after the last layer, before the final norm (what an MTP head
        reads), of the T = input_ids.shape[1] tokens at positions start..start+T-1: each token's
        numbers are those of T one-token calls, token t attending up to itself (DSA's picks: `forward_stream`)."""
        m = self.model
        return self.forward_stream(F.embedding(input_ids, m.w.embed), cache, start, picks_end)

    def token_logits(self, token: int, cache: TokenCache, start: int, head: RowsProduct) -> torch.Tensor | None:
        """`residual`, the final norm and the lm_head for one token: logits [vocab] in the model dtype, the numbers
        of `hidden_states` then `MoeDecoder.lm_head`, without the general path's wrappers around the same native
        calls (model-level dispatch, the norm's and the head's Python; ~6-9% of the packaged model's decoded
        token). None where it does not take the call (a cache or a head the kernels do not take); nothing has
        run then."""
        m = self.model
        mat = head.matrix()
        norm = m.w.final_norm
        if mat is None or norm.dtype != m.dtype or not norm.is_contiguous() or not self._takes_cache(cache):
            return None
        embed = m.w.embed
        if type(embed) is torch.Tensor and 0 <= token < embed.shape[0]:
            x = embed[token : token + 1]  # F.embedding's row without its dispatch (forward_stream copies it)
        else:
            x = F.embedding(torch.tensor([token]), embed)  # a quantized table's lookup (or its IndexError)
        stream = self.forward_stream(x.view(1, 1, -1), cache, start)
        h = self.lib.rms_norm(stream.view(1, -1), norm, m.cfg.rms_norm_eps)
        assert h is not None, "checked above: the norm's weight is the model dtype and contiguous"
        return self.lib.rows_linear(mat, h, m.dtype)[0].to(m.dtype)

    def _views(self, cache: TokenCache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cache's k / v of its one sequence, [layers, kv_heads, T, row] views, kept while the same cache
        comes back (every decoded token)."""
        kept = self._views_of
        if kept is None or kept[0]() is not cache:
            k_all, v_all = self._cache(cache)
            kept = self._views_of = (weakref.ref(cache), k_all[:, 0], None if v_all is None else v_all[:, 0])
        return kept[1], kept[2]

    def forward_stream(self, x: torch.Tensor, cache: TokenCache, start: int, picks_end: int | None = None) -> torch.Tensor:
        """Every layer over the input stream x [1, T, H] at positions start..start+T-1 (`residual`'s
        embedded tokens, or an MTP block's eh_proj output); the stream after the last layer, [1, T, H].
        DSA's top-k ties are broken as torch.topk breaks them over rows of `picks_end` keys (None: this
        call's end, a prompt chunk's rows as the torch layers see them; 0: each token's own keys, as its
        one-token decode step's, which a speculative verification needs)."""
        m, cfg = self.model, self.model.cfg
        T = x.shape[1]
        picks_end = start + T if picks_end is None else picks_end
        cache.check_room(start + T)
        x = x.reshape(T, cfg.hidden_size).to(m.dtype, copy=True).contiguous()  # a copy: the native layers update it in place
        cos, sin = self._cos_sin(start, T, cache.max_tokens)
        kc, vc = self._views(cache)
        threads, k, hidden = torch.get_num_threads(), cfg.num_experts_per_tok, cfg.hidden_size
        index_keys, sel = self._index_keys(cache), self._selection(cache, T)
        per_layer, whole = self._experts_in_ram()
        if whole is not None:  # every layer of the tokens in one native call
            self.lib.decode_layers(self._descs, x, cos, sin, kc, vc, start, whole, threads, index_keys, sel, picks_end)
            return x.view(1, T, hidden)
        # Experts in RAM run inside the layer call; any other backend (a wrapper such as
        # the tracer included) gets its hint and forward calls as in the torch path.
        add: tuple[torch.Tensor, torch.Tensor | None] | None = None
        for i, layer in enumerate(self.layers):
            h = torch.empty(T, hidden, dtype=m.dtype)
            ids = torch.empty(T, k, dtype=torch.int64)
            wts = torch.empty(T, k, dtype=torch.float32)
            shared = torch.empty(T, hidden, dtype=m.dtype) if layer.moe and layer.has_mlp else None
            tables = per_layer[i]
            routed = torch.empty(T, hidden, dtype=m.dtype) if tables is not None else None
            if layer.moe and tables is None:  # the backend gets the layer's input before it runs
                if add is not None:
                    self.lib.residual_add(x, *add)
                    add = None
                m.experts.hint(i, x.view(1, T, hidden))
            slot = self._index_slot[i]
            self.lib.decode_layer(layer.desc, x, add, cos, sin, kc[i], None if vc is None else vc[i], start, h, ids, wts, shared,
                                  threads, tables, routed, None if slot is None else index_keys[slot], sel, picks_end)
            add = None
            if layer.moe and tables is None:
                m.experts.attended(i, x.view(1, T, hidden))  # x: the layer's input plus its attention
                routed = m.experts.forward(i, h, ids, wts)
                add = (routed.reshape(T, hidden).to(m.dtype).contiguous(), shared)
        if add is not None:
            self.lib.residual_add(x, *add)
        return x.view(1, T, hidden)
