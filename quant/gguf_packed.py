"""GGUF quantized tensors taken into our formats as they are stored, without dequantizing.

llama.cpp's Q8_0 stores a row as blocks of 34 bytes: fp16 d, then 32 int8 q; w = d * q. That is our
q8 layout (group 32) with rowf = 1 and gscale = d bit for bit, so the conversion only moves bytes
and `dequantize()` of the result equals `gguf.quants.dequantize` of the blocks exactly.

The K-quant, legacy and i-quant types of quant/kquants.py (Q2_K..Q6_K, Q4_0..Q5_1, IQ1_S..IQ4_XS) are held as their
blocks themselves (a QuantTensor with a GGMLSpec): `gguf_to_quant` copies the bytes and nothing else.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .formats import QuantError, QuantSpec, QuantTensor
from .kquants import GGML_TYPES, GGMLSpec

Q8_0_BLOCK, Q8_0_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]  # 32 weights in 34 bytes
Q8_SPEC = QuantSpec(8, Q8_0_BLOCK)
# GGUF types this module converts, and the spec they become.
PACKED_SPECS: dict[str, QuantSpec] = {GGMLQuantizationType.Q8_0.name: Q8_SPEC, **{t: GGMLSpec.of(t) for t in GGML_TYPES}}


def _as_torch(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(raw, np.ndarray):
        with warnings.catch_warnings():  # a read-only map of the file: only read here (callers copy)
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            raw = torch.from_numpy(raw)
    return raw


def gguf_to_quant(raw: np.ndarray | torch.Tensor, ggml_type: str, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16,
                  copy: bool = True) -> QuantTensor:
    """Raw bytes of a [N, K] tensor of a type in PACKED_SPECS (as the GGUF stores them) -> a QuantTensor:
    a copy, or with copy=False for the block types a view of `raw` (read-only where raw is a mapped file:
    for a caller that copies it on, such as ExpertBlobLayout.pack; Q8_0 is rearranged, so always a copy)."""
    spec = PACKED_SPECS.get(ggml_type)
    if spec is None:
        raise QuantError(f"GGUF type {ggml_type} is not taken as stored (taken: {', '.join(PACKED_SPECS)})")
    if not isinstance(spec, GGMLSpec):
        return q8_0_to_quant(raw, shape, dtype)
    spec.check_shape(shape)
    raw = _as_torch(raw)
    need = shape[0] * spec.row_bytes(shape[1])
    if raw.dtype != torch.uint8 or raw.numel() != need:
        raise QuantError(f"{ggml_type} {list(shape)} needs {need} uint8 bytes, got {raw.dtype} {list(raw.shape)}")
    flat = raw.reshape(-1)
    return QuantTensor(spec, shape, flat.clone() if copy else flat, dtype)


def q8_0_to_quant(raw: np.ndarray | torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> QuantTensor:
    """Raw Q8_0 bytes of a [N, K] tensor (as the GGUF stores them) -> a q8 QuantTensor (a copy)."""
    n, k = shape
    if k % Q8_0_BLOCK:
        raise QuantError(f"Q8_0 rows of {k} weights do not split into blocks of {Q8_0_BLOCK}")
    raw = _as_torch(raw)  # from_sections copies
    if raw.dtype != torch.uint8 or raw.numel() != n * k // Q8_0_BLOCK * Q8_0_BYTES:
        raise QuantError(f"Q8_0 {list(shape)} needs {n * k // Q8_0_BLOCK * Q8_0_BYTES} uint8 bytes, got {raw.dtype} {list(raw.shape)}")
    blocks = raw.reshape(n, k // Q8_0_BLOCK, Q8_0_BYTES)
    sections = {
        "rowf": torch.ones(n, 1, dtype=torch.float32),
        "data": blocks[..., 2:].reshape(n, k),
        "gscale": blocks[..., :2].contiguous(),  # fp16 d, byte for byte
    }
    return QuantTensor.from_sections(Q8_SPEC, (n, k), sections, dtype)
