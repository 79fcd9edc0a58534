"""glm4_moe_lite's part of the fused native decode (the driver: localglm/models/fused_decode.py): its
multi-head latent attention as the native layer reads it (an LgMla: the projections, the latent
norms, kv_b split per head into W_UK / W_UV for the absorbed form), over a LatentCache.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import torch

from quant.native import LgMat

from ...layers.kv_cache import LatentCache
from ...layers.mla import MLAWeights
from ...layers.native import ATTN_MLA, LgMla
from .. import fused_decode
from ..fused_decode import Pinned

if TYPE_CHECKING:
    from .model import Glm4MoeLiteModel


class FusedDecoder(fused_decode.FusedDecoder):
    """glm4_moe_lite's fused decoder: the shared driver with multi-head latent attention."""

    cache_type = LatentCache

    @classmethod
    def _attention(cls, model: Glm4MoeLiteModel, attn: MLAWeights, pin: Pinned) -> dict[str, Any] | None:
        s = model.mla_shape
        q_a = pin.mat(attn.q_a, attn.q_a_bias) if attn.q_a is not None else LgMat()
        mats = q_a, pin.mat(attn.q_b), pin.mat(attn.kv_a, attn.kv_a_bias), pin.mat(attn.o, attn.o_bias)
        if any(m is None for m in mats) or not pin.takes_norms(attn.q_a_norm, attn.kv_a_norm):
            return None
        w_uk, w_uv = attn.absorbed(s, pin.dtype)  # views of one [heads, nope + v, kv_lora] tensor: rows kv_lora apart
        if w_uk.stride() != w_uv.stride() or w_uk.stride()[1:] != (s.kv_lora_rank, 1) or w_uk.device.type != "cpu":
            return None
        pin.keep += [w_uk, w_uv]
        mla = LgMla(
            q_lora=s.q_lora_rank or 0, kv_lora=s.kv_lora_rank, nope=s.qk_nope_head_dim, rope=s.qk_rope_head_dim,
            v=s.v_head_dim, interleave=int(s.rope_interleave), latent_eps=s.latent_eps, scale=s.scale,
            q_a_norm=pin.vec(attn.q_a_norm), kv_a_norm=pin.vec(attn.kv_a_norm),
            w_uk=w_uk.data_ptr(), w_uv=w_uv.data_ptr(), head_stride=w_uk.stride(0),
            q_a=mats[0], q_b=mats[1], kv_a=mats[2],
        )  # fmt: skip
        pin.keep.append(mla)
        return dict(attn_kind=ATTN_MLA, heads=s.heads, kv_heads=1, rot=s.qk_rope_head_dim, o=mats[3], mla=ctypes.pointer(mla))

    @staticmethod
    def _cache(cache: LatentCache) -> tuple[torch.Tensor, torch.Tensor | None]:
        return cache.kv.unsqueeze(2), None  # one "kv head": the row latent | rope key
