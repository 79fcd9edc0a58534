"""glm_moe_dsa's part of the fused native decode (the driver: localglm/models/fused_decode.py):
GLM-4.7-Flash's multi-head latent attention (glm4_moe_lite/fused_decode.py) over the rows GLM-5's
sparse-attention indexer picks, over a DsaCache.

Every layer is of kind ATTN_DSA. A "full" layer's LgLayer carries its indexer (an LgDsa: wq_b, wk,
the key LayerNorm, weights_proj, the top-k): it writes the token's indexer key to its slot of the
indexer-key cache and, once the context outgrows the top-k, scores every cached key and picks the
top-k into the driver's selection buffer (while the context fits, it marks the buffer "every
position": dense attention, exactly). A "shared" layer (GLM-5.2's IndexShare) has no indexer and
attends to what the buffer holds, the pick of the last full layer before it -- inside the
whole-token call and across the per-layer calls alike, since the buffer is the driver's. The C is
mla_attention.c and dsa_indexer.c; the torch decode path calls the same kernels for one token
(layers/mla.py, layers/dsa.py), so both paths pick the same rows and round the same way.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import torch

from ...layers.dsa import DsaCache
from ...layers.native import ATTN_DSA
from ..fused_decode import Pinned
from ..glm4_moe_lite import fused_decode as lite

if TYPE_CHECKING:
    from ...layers.native import LayerLib
    from ..fused_decode import _FusedLayer
    from .model import DsaAttentionWeights, GlmMoeDsaModel


class FusedDecoder(lite.FusedDecoder):
    """glm_moe_dsa's fused decoder: MLA over the DSA indexer's top-k."""

    cache_type = DsaCache

    def __init__(self, model: GlmMoeDsaModel, lib: LayerLib, layers: list[_FusedLayer]) -> None:
        super().__init__(model, lib, layers)
        self.index_shape = model.index_shape  # the shapes and top-k the layers were described with
        self._sel = torch.zeros(0, 0, dtype=torch.int32)

    @classmethod
    def _attention(cls, model: GlmMoeDsaModel, attn: DsaAttentionWeights, pin: Pinned) -> dict[str, Any] | None:
        fields = super()._attention(model, attn.mla, pin)
        if fields is None:
            return None
        if attn.indexer is not None:  # a full layer
            view = attn.indexer.native_view(model.index_shape, pin.dtype)
            if view is None:
                return None
            pin.keep.append(view)
            fields["dsa"] = ctypes.pointer(view.desc)
        return {**fields, "attn_kind": ATTN_DSA}

    @staticmethod
    def _index_keys(cache: DsaCache) -> torch.Tensor:
        return cache.index_keys[:, 0]

    def _selection(self, cache: DsaCache, tokens: int) -> torch.Tensor:
        # per token a count, then at most min(top-k, context) positions: a top-k set above any context (dense) costs nothing
        n = 1 + min(self.index_shape.topk, cache.max_tokens)
        if self._sel.shape[0] < tokens or self._sel.shape[1] != n:
            self._sel = torch.zeros(tokens, n, dtype=torch.int32)
        return self._sel[:tokens]

    def takes(self, input_ids: torch.Tensor, cache: Any) -> bool:
        """As the driver's, and only while the model's indexer shape is the one the layers were
        described with (a changed top-k decodes through the torch path, which reads it per call)."""
        return self.model.index_shape == self.index_shape and super().takes(input_ids, cache)
