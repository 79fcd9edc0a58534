"""The MTP block's draft step in one native call (localglm/models/native/mtp_draft.c `lg_mtp_draft`).

Why: the block's decoder layer already ran through the fused native layer, but a draft step around
it was ~15 small torch ops and ctypes calls (embedding, enorm / hnorm, a concatenation, eh_proj, the
layer, shared_head.norm, the head's rows, a finiteness check, an argmax, index tensors), as much
time as its arithmetic on a small model. Here the catch-up on the pending (stream, token) pairs and
`depth` chained greedy drafts are one call, with the numbers of models/mtp.py's path bit for bit
(the same norms, the same row products as layers.native.RowsProduct, the same fused layer, the
first maximum as torch.argmax): tests/test_fused_mtp.py compares them.

`FusedMtp.build` returns None where this path does not take the block (no native library, a GPU,
a dtype or weight the kernels do not read, a quantized embedding table: the chained drafts' rows
are read from a dense one); `run` returns None for a call it does not take (a
cache of another kind or in host RAM, routed experts a backend runs, more tokens than the block's
native multi-token limit). The caller then runs the Python path.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from ..layers.kv_cache import TokenCache
from ..layers.native import LayerLib, LgMtp, LgMtpBlock, RowsProduct, native
from ..sampling import NonFiniteLogitsError
from .fused_decode import FusedDecoder, Pinned
from .moe_decoder import native_forward

if TYPE_CHECKING:
    from .mtp import MtpHead


class FusedMtp:
    """An MtpHead's C description (its own tensors, the head rows it drafts from) and the block's
    fused decoder; made for one set of weights and one draft vocabulary (MtpHead rebuilds it when
    either changes)."""

    def __init__(self, head: MtpHead, fused: FusedDecoder, lib: LayerLib, desc: LgMtp, keep: list[object]) -> None:
        self.head, self.fused, self.lib, self.desc = head, fused, lib, desc
        self.keep = keep  # what desc points into
        self.eh_w, self.head_w = head.w.eh_proj, head.block.w.lm_head  # the weights desc was made from
        self._block: tuple[tuple[int, ...], LgMtpBlock] | None = None  # the last call's block view and what it was made of

    @classmethod
    def build(cls, head: MtpHead) -> FusedMtp | None:
        """The fused draft step of this head, or None where the native kernels do not take it."""
        block = head.block
        fused = block._fused_decoder()
        lib = native()
        if fused is None or lib is None:
            return None
        dtype, pin = block.dtype, Pinned(block.dtype)
        embed = block.w.embed
        if not (isinstance(embed, torch.Tensor) and embed.dtype == dtype and embed.device.type == "cpu" and embed.is_contiguous()):
            return None
        if not pin.takes_norms(head.w.enorm, head.w.hnorm, block.w.final_norm):
            return None
        eh = RowsProduct(head.w.eh_proj, dtype).matrix()
        rows = head._sub if head._sub is not None else RowsProduct(block.w.lm_head, dtype)
        mat = rows.matrix()
        if eh is None or mat is None:
            return None
        vocab = None if head.vocab is None else head.vocab.to(torch.int64).contiguous()
        desc = LgMtp(
            hidden=block.cfg.hidden_size, dtype=0 if dtype == torch.float32 else 1, eps=block.cfg.rms_norm_eps, embed=embed.data_ptr(),
            enorm=pin.vec(head.w.enorm), hnorm=pin.vec(head.w.hnorm), head_norm=pin.vec(block.w.final_norm), eh=eh, head=mat,
            vocab=None if vocab is None else vocab.data_ptr(),
        )  # fmt: skip
        return cls(head, fused, lib, desc, [*pin.keep, embed, head.w.eh_proj, rows, vocab])

    def current(self) -> bool:
        """Whether the weights this description was made from are still the head's."""
        return self.eh_w is self.head.w.eh_proj and self.head_w is self.head.block.w.lm_head

    def _block_view(self, cache: TokenCache, tokens: int) -> LgMtpBlock | None:
        """The block's layers and this cache as lg_decode_layers reads them, for calls of up to `tokens`
        tokens; None where the native layers do not run the call."""
        fused = self.fused
        _, whole = fused._experts_in_ram()
        if whole is None or not fused._takes_cache(cache):
            return None
        cos, sin = fused._cos_sin(0, cache.max_tokens, cache.max_tokens)
        k_all, v_all = fused._cache(cache)
        kc, vc = k_all[:, 0], None if v_all is None else v_all[:, 0]
        index_keys, sel = fused._index_keys(cache), fused._selection(cache, tokens)
        key = (id(cache), id(whole), cos.data_ptr(), kc.data_ptr(), 0 if index_keys is None else index_keys.data_ptr())
        if sel is None and self._block is not None and self._block[0] == key:
            return self._block[1]
        view = LgMtpBlock(
            layers=ctypes.cast(fused._descs, ctypes.POINTER(type(fused._descs[0]))), n=len(fused.layers),
            experts=ctypes.cast(whole, ctypes.POINTER(type(whole[0]))), cos=cos.data_ptr(), sin=sin.data_ptr(), rot_stride=cos.stride(0),
            k_base=kc.data_ptr(), v_base=None if vc is None else vc.data_ptr(), stride_layer=kc.stride(0), stride_head=kc.stride(1),
            stride_pos=kc.stride(2), index_base=None if index_keys is None else index_keys.data_ptr(),
            index_stride=0 if index_keys is None else index_keys.stride(0), sel=None if sel is None else sel.data_ptr(),
            sel_stride=0 if sel is None else sel.stride(0),
        )  # fmt: skip
        self._block = (key, view) if sel is None else None  # DSA's selection buffer (the fused decoder's own) may move
        return view

    def takes(self, cache: TokenCache, tokens: int) -> bool:
        """Whether `run` takes a call of this many pairs over this cache."""
        return tokens >= 1 and native_forward(self.head.block, tokens) and self._block_view(cache, tokens) is not None

    def run(self, prev: torch.Tensor, next_ids: list[int], cache: TokenCache, start: int, depth: int) -> tuple[list[int], torch.Tensor] | None:
        """The block over the T pairs (prev [T, H], next_ids) at positions start.., then `depth` greedy
        drafts chained on its own stream (their cache entries written after the pairs'). -> (drafts,
        streams [T + max(depth - 1, 0), H]: the pairs' output streams, then each chained call's); None
        where the native path does not take the call (the caller runs MtpHead's Python path)."""
        T, block = len(next_ids), self.head.block
        if prev.device.type != "cpu" or prev.shape != (T, block.cfg.hidden_size) or T < 1 or not native_forward(block, T):
            return None
        view = self._block_view(cache, T)
        if view is None:
            return None
        cache.check_room(start + T + max(depth - 1, 0))
        prev = prev.to(block.dtype).contiguous()
        ids = torch.tensor(next_ids, dtype=torch.int64)
        drafts = torch.empty(depth, dtype=torch.int64)
        streams = torch.empty(T + max(depth - 1, 0), block.cfg.hidden_size, dtype=block.dtype)
        rc, made = self.lib.mtp_draft(self.desc, view, prev, ids, start, depth, drafts, streams)
        if rc == -2:  # a draft's scores were not finite: the Python path's check says how
            self.head.greedy(streams[T - 1 + made])
            raise NonFiniteLogitsError("the MTP head's draft logits are not finite")
        return drafts.tolist(), streams
