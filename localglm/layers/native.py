"""The model side's native CPU library: per-token layer ops and the fused decoder layer, built at
first use beside quant's kernels and called through ctypes.

    localglm/layers/native/layer_ops.c      RMSNorm, RoPE, decode attention, the GLM router, the
                                            residual add (alone: layers/norm.py, rope.py, attention.py)
    localglm/layers/native/layer_ops.h      what the files share: lg_layer, lg_mla, lg_dsa, lg_experts
                                            (mirrored here by LgLayer, LgMla, LgDsa, LgExperts), the
                                            ops' prototypes
    localglm/models/native/decode_layer.c   lg_decode_layer / lg_decode_layers: T tokens through a
                                            layer / every layer in one call (models/fused_decode.py)
    localglm/models/native/mla_attention.c  the layer's multi-head latent attention (glm4_moe_lite,
                                            glm_moe_dsa), alone for layers/mla.py's decode
    localglm/models/native/dsa_indexer.c    GLM-5's sparse-attention indexer: key, scores, top-k
                                            (glm_moe_dsa), alone for layers/dsa.py's decode
    localglm/models/native/mtp_draft.c      lg_mtp_draft: an MTP block's forward and greedy drafts
                                            in one call (models/fused_mtp.py)

Why a library of its own: quant/ knows formats and kernels, nothing of models, so the GLM layer's C
lives here and calls quant's kernels (lg_matvec, lg_swiglu_vec, lg_moe) through
quant/native/lg_kernels.h, the header both libraries compile against with the same flags.

How it finds quant's library: quant's .so has its file name (qkernels-KEY.so) as SONAME, and this
one is linked against that file by path, so it records exactly that build as a dependency; it is
built into the same directory and carries `-Wl,-rpath,$ORIGIN`, so the dynamic loader finds the
dependency beside it whatever loads first. `native()` loads quant's first (quant.native.native_lib)
and the loader, matching the SONAME, reuses that copy: one copy of quant's code and tables in the
process. The build key covers quant's .so itself, so a rebuilt quant library means a relinked one
here. `-Wl,-z,defs` makes an entry point missing on quant's side a build error, not a load error.

`native()` returns None where either library cannot be built (no C compiler, LOCALGLM_NATIVE=0):
the layers then run their torch ops.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
from functools import cache
from pathlib import Path

import torch

from quant.formats import QuantTensor
from quant.native import CFLAGS, DTYPES, HEADER, LgMat, NativeLib, _compiler, _QTensor, build, check_struct_sizes, native_lib

from .linear import linear

log = logging.getLogger(__name__)

_PACKAGE = Path(__file__).parent.parent
LAYER_OPS = _PACKAGE / "layers" / "native" / "layer_ops.c"
SOURCES = (LAYER_OPS, *(_PACKAGE / "models" / "native" / f"{name}.c" for name in ("decode_layer", "mla_attention", "dsa_indexer", "mtp_draft")))
HEADERS = (LAYER_OPS.with_suffix(".h"), HEADER)


class LgExperts(ctypes.Structure):
    """A MoE layer's routed experts for the fused decode (layer_ops.h `lg_experts`): quantized tables
    (lg_moe's) or dense ones (an LgMat per expert); all NULL: the caller runs them."""

    _fields_ = [
        ("q_gate_up", ctypes.POINTER(_QTensor)),
        ("q_down", ctypes.POINTER(_QTensor)),
        ("d_gate_up", ctypes.POINTER(LgMat)),
        ("d_down", ctypes.POINTER(LgMat)),
        ("inter", ctypes.c_int32),
        ("fp32", ctypes.c_int32),
    ]


ATTN_GQA, ATTN_MLA, ATTN_DSA = 0, 1, 2  # LgLayer.attn_kind (layer_ops.h LG_ATTN_*)


class LgMla(ctypes.Structure):
    """A layer's multi-head latent attention (layer_ops.h `lg_mla`): shapes, latent norms, W_UK / W_UV
    (head h at h * head_stride values) and the q_a, q_b (or q_proj), kv_a projections."""

    _fields_ = [
        *((name, ctypes.c_int32) for name in ("q_lora", "kv_lora", "nope", "rope", "v", "interleave")),
        *((name, ctypes.c_float) for name in ("latent_eps", "scale")),
        *((name, ctypes.c_void_p) for name in ("q_a_norm", "kv_a_norm", "w_uk", "w_uv")),
        ("head_stride", ctypes.c_int64),
        *((name, LgMat) for name in ("q_a", "q_b", "kv_a")),
    ]


class LgDsa(ctypes.Structure):
    """A full layer's DSA indexer (layer_ops.h `lg_dsa`): shapes, the key LayerNorm's weight and bias
    (model dtype), wq_b and wk (dense or quantized), weights_proj (fp32 dense)."""

    _fields_ = [
        *((name, ctypes.c_int32) for name in ("heads", "head_dim", "rope", "topk")),
        *((name, ctypes.c_void_p) for name in ("k_norm", "k_norm_bias")),
        *((name, LgMat) for name in ("wq_b", "wk", "weights_proj")),
    ]


class LgLayer(ctypes.Structure):
    """One decoder layer as `lg_decode_layer` reads it (layer_ops.h `lg_layer`); `attn_kind` picks
    the attention, GQA from the q/k/v fields, MLA from `mla`, DSA from `mla` and `dsa` (NULL on a
    shared layer)."""

    _fields_ = [
        *((name, ctypes.c_int32) for name in ("hidden", "heads", "kv_heads", "hd", "rot", "dtype")),
        ("eps", ctypes.c_float),
        *((name, ctypes.c_int32) for name in ("moe", "has_mlp", "n_experts", "top_k", "n_group", "topk_group", "norm_topk")),
        ("scaling", ctypes.c_float),
        *((name, ctypes.c_void_p) for name in ("input_norm", "post_norm", "q_norm", "k_norm", "router_w", "router_bias")),
        *((name, LgMat) for name in ("qkv", "o", "gate_up", "down")),
        ("attn_kind", ctypes.c_int32),
        ("mla", ctypes.POINTER(LgMla)),
        ("dsa", ctypes.POINTER(LgDsa)),
    ]


_STRUCTS = (("lg_layer", LgLayer), ("lg_experts", LgExperts), ("lg_mla", LgMla), ("lg_dsa", LgDsa))  # in lg_layers_sizeof's order


class LgMtp(ctypes.Structure):
    """An MTP block's own tensors and its drafting head (mtp_draft.c `lg_mtp`): embedding, enorm,
    hnorm, shared_head.norm (model dtype), eh_proj, the head's scored rows and their token ids (NULL:
    row r is token r)."""

    _fields_ = [
        *((name, ctypes.c_int32) for name in ("hidden", "dtype")),
        ("eps", ctypes.c_float),
        *((name, ctypes.c_void_p) for name in ("embed", "enorm", "hnorm", "head_norm")),
        *((name, LgMat) for name in ("eh", "head")),
        ("vocab", ctypes.c_void_p),
    ]


class LgMtpBlock(ctypes.Structure):
    """The block's decoder layers and cache as lg_decode_layers reads them (mtp_draft.c `lg_mtp_block`):
    cos / sin are position 0's rotary rows."""

    _fields_ = [
        ("layers", ctypes.POINTER(LgLayer)),
        ("n", ctypes.c_int32),
        ("experts", ctypes.POINTER(LgExperts)),
        *((name, ctypes.c_void_p) for name in ("cos", "sin")),
        ("rot_stride", ctypes.c_long),
        *((name, ctypes.c_void_p) for name in ("k_base", "v_base")),
        *((name, ctypes.c_long) for name in ("stride_layer", "stride_head", "stride_pos")),
        ("index_base", ctypes.c_void_p),
        ("index_stride", ctypes.c_long),
        ("sel", ctypes.c_void_p),
        ("sel_stride", ctypes.c_long),
    ]


def build_layers(cc: str, quant: Path, flags: tuple[str, ...] = CFLAGS) -> Path:
    """Compile the model side's library against quant's built library `quant` (same flags), into
    quant's directory; returns its path (cached like quant's, see quant.native.build)."""
    includes = tuple(f"-I{h.parent}" for h in HEADERS)
    return build(cc, flags, quant.parent, name="lglayers", sources=SOURCES, depends=(*HEADERS, quant),
                 extra=(*includes, str(quant), "-Wl,-rpath,$ORIGIN", "-Wl,-z,defs"))


class LayerLib:
    """The loaded model-side library with typed entry points taking torch tensors; the quant-format
    methods the layer code needs (describe_matrix, dense_expert) are quant's NativeLib's, reached
    through this object so callers keep one."""

    def __init__(self, path: Path, quant: NativeLib) -> None:
        self.path = path
        self.quant = quant
        self._lib = ctypes.CDLL(str(path))
        check_struct_sizes(self._lib, "lg_layers_sizeof", _STRUCTS)
        check_struct_sizes(self._lib, "lg_mtp_sizeof", (("lg_mtp", LgMtp), ("lg_mtp_block", LgMtpBlock)))
        p, i, lg = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
        self._lib.lg_rms_norm.argtypes = [p, i, i, i, p, ctypes.c_float, p]
        self._lib.lg_rms_norm.restype = None
        self._lib.lg_rope.argtypes = [p, i, i, i, i, p, p, p]
        self._lib.lg_rope.restype = None
        self._lib.lg_decode_attention.argtypes = [p, p, p, i, i, i, i, i, lg, lg, ctypes.c_float, p, i]
        self._lib.lg_decode_attention.restype = i
        self._lib.lg_mla_decode_attention.argtypes = [p, lg, p, lg, i, i, i, i, i, i, p, p, lg, ctypes.c_float, p, lg, i, p, p, i]
        self._lib.lg_mla_decode_attention.restype = i
        self._lib.lg_mla_latent_attention.argtypes = [p, i, i, i, i, i, p, lg, i, ctypes.c_float, p, i]
        self._lib.lg_mla_latent_attention.restype = i
        dsa = ctypes.POINTER(LgDsa)
        self._lib.lg_dsa_index_key.argtypes = [dsa, p, i, p, p, p, i]
        self._lib.lg_dsa_index_key.restype = i
        self._lib.lg_dsa_topk.argtypes = [dsa, p, p, i, p, p, p, i, p, i]
        self._lib.lg_dsa_topk.restype = i
        ex = ctypes.POINTER(LgExperts)
        self._lib.lg_decode_layer.argtypes = [ctypes.POINTER(LgLayer), i, p, p, p, p, p, lg, p, p, lg, lg, i, p, p, lg, i, p, p, p, p, ex, p, i]
        self._lib.lg_decode_layer.restype = i
        self._lib.lg_decode_layers.argtypes = [ctypes.POINTER(LgLayer), i, i, p, p, p, lg, p, p, lg, lg, lg, i, p, lg, p, lg, i, ex, i]
        self._lib.lg_decode_layers.restype = i
        self._lib.lg_residual_add.argtypes = [p, p, p, i, i]
        self._lib.lg_residual_add.restype = None
        self._lib.lg_rows_linear.argtypes = [ctypes.POINTER(LgMat), i, p, i, p, i]
        self._lib.lg_rows_linear.restype = i
        self._lib.lg_mtp_draft.argtypes = [ctypes.POINTER(LgMtp), ctypes.POINTER(LgMtpBlock), i, p, p, i, i, p, p, ctypes.POINTER(ctypes.c_int), i]
        self._lib.lg_mtp_draft.restype = i

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
        """RMSNorm over the last dim (see layers.rms_norm for the math), or None for inputs the
        kernel does not take (non-contiguous, other dtypes, weight of another dtype or shape)."""
        code = DTYPES.get(x.dtype)
        n = x.shape[-1]
        if code is None or weight.dtype != x.dtype or weight.shape != (n,) or not (x.is_contiguous() and weight.is_contiguous()) or x.device.type != "cpu":
            return None
        out = torch.empty_like(x)
        self._lib.lg_rms_norm(x.data_ptr(), code, x.numel() // n, n, weight.data_ptr(), eps, out.data_ptr())
        return out

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        """Rotary embedding of x [..., hd] at one position (cos/sin [1, rot]: see layers.apply_rope);
        None for inputs the kernel does not take."""
        code = DTYPES.get(x.dtype)
        if (code is None or cos.dtype != x.dtype or sin.dtype != x.dtype or cos.dim() != 2 or cos.shape[0] != 1
                or not (x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()) or x.device.type != "cpu"):
            return None
        hd = x.shape[-1]
        out = torch.empty_like(x)
        self._lib.lg_rope(x.data_ptr(), code, x.numel() // hd, hd, cos.shape[1], cos.data_ptr(), sin.data_ptr(), out.data_ptr())
        return out

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
        """One query token against the cache: q [1, heads, 1, hd], k/v [1, kv_heads, T, hd] (views
        into the cache: rows contiguous, any head/position strides) -> [1, heads, 1, hd]; None for
        inputs the kernel does not take (batch > 1, mixed or other dtypes, other layouts)."""
        code = DTYPES.get(q.dtype)
        if (code is None or q.shape[0] != 1 or k.dtype != q.dtype or v.dtype != q.dtype or not q.is_contiguous()
                or k.stride() != v.stride() or k.stride(-1) != 1 or k.device.type != "cpu"):
            return None
        _, heads, _, hd = q.shape
        out = torch.empty_like(q)
        rc = self._lib.lg_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), code, heads, k.shape[1], k.shape[2], hd,
                                           k.stride(1), k.stride(2), scale, out.data_ptr(), torch.get_num_threads())
        if rc:
            raise MemoryError("native attention kernel: out of memory")
        return out

    def mla_decode_attention(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, w_uk: torch.Tensor,
                             w_uv: torch.Tensor, scale: float, positions: torch.Tensor | None = None) -> torch.Tensor | None:
        """MLA's absorbed attention of one query token (mla_attention.c `lg_mla_decode_attention`: the
        fused layer's own core, so layers/mla.py's decode gives its bits). q_nope [1, heads, 1, nope],
        q_rope [1, heads, 1, rope] (roped); the cached rows as latent [1, T, kv_lora] and k_rope
        [1, T, rope], views of one row latent | rope key a position; W_UK [heads, nope, kv_lora] and
        W_UV [heads, v, kv_lora] with one head stride (MLAWeights.absorbed). `positions` (integers,
        read in their order) restricts the rows to those. -> [1, heads, 1, v], before o_proj; None for
        inputs the kernel does not take (batch > 1, mixed or other dtypes, other layouts)."""
        code = DTYPES.get(q_nope.dtype)
        lat = latent.shape[-1]
        if (code is None or q_nope.shape[0] != 1 or q_nope.shape[2] != 1 or any(t.dtype != q_nope.dtype for t in (q_rope, latent, k_rope, w_uk, w_uv))
                or any(t.device.type != "cpu" for t in (q_nope, q_rope, latent, w_uk)) or q_nope.stride(-1) != 1 or q_rope.stride(-1) != 1
                or latent.stride(-1) != 1 or k_rope.stride() != latent.stride() or k_rope.data_ptr() != latent.data_ptr() + lat * latent.element_size()
                or w_uk.stride() != w_uv.stride() or w_uk.stride()[1:] != (lat, 1)):
            return None
        heads, nope, rope, v = q_nope.shape[1], q_nope.shape[-1], q_rope.shape[-1], w_uv.shape[1]
        if positions is not None:
            positions = positions.reshape(-1).to(torch.int32).contiguous()
        out = torch.empty(1, heads, 1, v, dtype=q_nope.dtype)
        rc = self._lib.lg_mla_decode_attention(q_nope.data_ptr(), q_nope.stride(1), q_rope.data_ptr(), q_rope.stride(1), code, heads, lat, nope,
                                               rope, v, w_uk.data_ptr(), w_uv.data_ptr(), w_uk.stride(0), scale, latent.data_ptr(), latent.stride(1),
                                               latent.shape[1] if positions is None else positions.numel(),
                                               None if positions is None else positions.data_ptr(), out.data_ptr(), torch.get_num_threads())
        if rc:
            raise MemoryError("native MLA attention: out of memory")
        return out

    def mla_latent_attention(self, ql: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, scale: float) -> torch.Tensor | None:
        """Attention in MLA's latent space of T > 1 query tokens, the last T of the cached rows, each reading the
        rows up to itself (mla_attention.c `lg_mla_latent_attention`): ql [1, T, heads, kv_lora + rope] (the
        folded queries | their roped rope parts, contiguous), the rows as latent [1, S, kv_lora] and k_rope [1, S,
        rope], views of one row a position. -> o_lat [1, T, heads, kv_lora]; None for inputs it does not take."""
        code = DTYPES.get(ql.dtype)
        lat, T = latent.shape[-1], ql.shape[1]
        if (code is None or ql.dim() != 4 or ql.shape[0] != 1 or not 1 < T <= latent.shape[1] or not ql.is_contiguous()
                or ql.shape[-1] != lat + k_rope.shape[-1] or any(t.dtype != ql.dtype or t.device.type != "cpu" for t in (latent, k_rope))
                or latent.stride(-1) != 1 or k_rope.stride() != latent.stride() or k_rope.data_ptr() != latent.data_ptr() + lat * latent.element_size()):
            return None
        heads = ql.shape[2]
        out = torch.empty(1, T, heads, lat, dtype=ql.dtype)
        rc = self._lib.lg_mla_latent_attention(ql.data_ptr(), code, T, heads, lat, k_rope.shape[-1], latent.data_ptr(), latent.stride(1),
                                               latent.shape[1], scale, out.data_ptr(), torch.get_num_threads())
        if rc:
            raise MemoryError("native MLA attention: out of memory")
        return out

    @staticmethod
    def _takes_token(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """Whether x is one token [1, 1, n] and cos / sin its rotary rows [1, rot], all contiguous CPU tensors of one kernel dtype."""
        return (x.dtype in DTYPES and x.shape[:2] == (1, 1) and x.device.type == "cpu" and x.is_contiguous() and cos.dim() == 2 and cos.shape[0] == 1
                and all(t.dtype == x.dtype and t.is_contiguous() for t in (cos, sin)))

    def dsa_index_key(self, desc: LgDsa, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        """The DSA indexer's key [1, 1, head_dim] of one token x [1, 1, hidden] (the input-normed hidden
        state; dsa_indexer.c `lg_dsa_index_key`, the fused layer's own); None for inputs the kernel does not take."""
        if not self._takes_token(x, cos, sin):
            return None
        out = torch.empty(1, 1, desc.head_dim, dtype=x.dtype)
        if self._lib.lg_dsa_index_key(ctypes.byref(desc), x.data_ptr(), DTYPES[x.dtype], cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
                                      torch.get_num_threads()):
            raise MemoryError("native DSA indexer: out of memory")
        return out

    def dsa_topk(self, desc: LgDsa, x: torch.Tensor, q_resid: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor | None:
        """The DSA indexer's top-k for one token (dsa_indexer.c `lg_dsa_topk`, the fused layer's own):
        x [1, 1, hidden], its query latent q_resid [1, 1, q_lora], the cached indexer keys [1, T, D]
        -> key positions [1, 1, k] (int32, ascending), chosen as torch.topk chooses; None for inputs
        the kernel does not take."""
        if (not self._takes_token(x, cos, sin) or q_resid.dtype != x.dtype or not q_resid.is_contiguous() or keys.dtype != x.dtype
                or keys.shape[0] != 1 or keys.stride()[1:] != (desc.head_dim, 1) or keys.device.type != "cpu"):
            return None
        sel = torch.empty(1 + min(desc.topk, keys.shape[1]), dtype=torch.int32)
        if self._lib.lg_dsa_topk(ctypes.byref(desc), x.data_ptr(), q_resid.data_ptr(), DTYPES[x.dtype], cos.data_ptr(), sin.data_ptr(),
                                 keys.data_ptr(), keys.shape[1], sel.data_ptr(), torch.get_num_threads()):
            raise MemoryError("native DSA indexer: out of memory")
        return sel[1 : 1 + int(sel[0])].view(1, 1, -1)

    def residual_add(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None) -> None:
        """x += a + b in place, rounded as `x + (a + b)` in x's dtype (all contiguous, one dtype)."""
        self._lib.lg_residual_add(x.data_ptr(), a.data_ptr(), None if b is None else b.data_ptr(), DTYPES[x.dtype], x.numel())

    def rows_linear(self, mat: LgMat, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """mat . x for the rows of x [T, K] (fp32), each row's numbers lg_matvec's whatever T (decode_layer.c
        `lg_rows_linear`): fp32 [T, N] holding values rounded to `dtype`."""
        x = x.float().contiguous()
        y = torch.empty(x.shape[0], mat.n, dtype=torch.float32)
        if self._lib.lg_rows_linear(ctypes.byref(mat), x.shape[0], x.data_ptr(), DTYPES[dtype], y.data_ptr(), torch.get_num_threads()):
            raise MemoryError("native linear: out of memory")
        return y

    def decode_layer(self, layer: LgLayer, x: torch.Tensor, add: tuple[torch.Tensor, torch.Tensor | None] | None,
                     cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None, pos: int,
                     h_out: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor, mlp_out: torch.Tensor | None, threads: int,
                     experts: LgExperts | None = None, routed_out: torch.Tensor | None = None,
                     index_keys: torch.Tensor | None = None, selection: torch.Tensor | None = None, picks_end: int = 0) -> None:
        """T consecutive tokens x [T, hidden] at positions pos.. through one layer (decode_layer.c
        `lg_decode_layer`; each token's numbers those of a one-token call): x updated in place; the
        caller has checked every shape and dtype (models/fused_decode.py). cos / sin [T, rot]: the
        tokens' rotary rows. k_cache / v_cache: the layer's cache as [kv_heads, positions, row]
        (MLA: k_cache [1, positions, latent + rope], v_cache None). add, h_out, mlp_out, routed_out
        [T, hidden]; ids, wts [T, top_k]. With `experts` (the layer's expert tables) the routed
        experts run in the same call, into `routed_out`, and x comes back with the whole layer
        added. DSA: `selection` (int32 [T, 1 + top-k], kept by the caller across the layers) carries
        each token's full-layer pick to the shared layers after it; `index_keys` [positions,
        index_head_dim] is a full layer's indexer-key cache; `picks_end` the keys of the rows the picks'
        ties are broken over (a prompt chunk's end; 0: each token's own, a decode step's; dsa_indexer.c)."""
        a = b = None
        if add is not None:
            a, b = add[0].data_ptr(), None if add[1] is None else add[1].data_ptr()
        rc = self._lib.lg_decode_layer(ctypes.byref(layer), x.shape[0], x.data_ptr(), a, b, cos.data_ptr(), sin.data_ptr(), cos.stride(0),
                                       k_cache.data_ptr(), None if v_cache is None else v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
                                       pos, None if index_keys is None else index_keys.data_ptr(),
                                       None if selection is None else selection.data_ptr(), 0 if selection is None else selection.stride(0),
                                       picks_end, h_out.data_ptr(), ids.data_ptr(), wts.data_ptr(),
                                       None if mlp_out is None else mlp_out.data_ptr(),
                                       None if experts is None else ctypes.byref(experts),
                                       None if routed_out is None else routed_out.data_ptr(), threads)
        if rc:
            raise MemoryError("native decode layer: out of memory")

    def decode_layers(self, layers: ctypes.Array, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor | None, pos: int, experts: ctypes.Array, threads: int,
                      index_keys: torch.Tensor | None = None, selection: torch.Tensor | None = None, picks_end: int = 0) -> None:
        """Every layer of T consecutive tokens x [T, hidden] in one call (decode_layer.c
        `lg_decode_layers`), for models whose routed experts all sit in RAM. cos / sin [T, rot];
        k_cache / v_cache [layers, kv_heads, positions, row] (one sequence; v_cache None for MLA);
        experts: an LgExperts per layer (empty for dense layers). DSA: index_keys [full layers,
        positions, index_head_dim] (DsaCache's slots, the full layers in order) and the
        `selection` buffer [T, 1 + top-k] and `picks_end` as in decode_layer."""
        rc = self._lib.lg_decode_layers(layers, len(layers), x.shape[0], x.data_ptr(), cos.data_ptr(), sin.data_ptr(), cos.stride(0),
                                        k_cache.data_ptr(), None if v_cache is None else v_cache.data_ptr(), k_cache.stride(0),
                                        k_cache.stride(1), k_cache.stride(2), pos, None if index_keys is None else index_keys.data_ptr(),
                                        0 if index_keys is None else index_keys.stride(0), None if selection is None else selection.data_ptr(),
                                        0 if selection is None else selection.stride(0), picks_end, experts, threads)
        if rc:
            raise MemoryError("native decode layers: out of memory")

    def mtp_draft(self, mtp: LgMtp, block: LgMtpBlock, prev: torch.Tensor, next_ids: torch.Tensor, pos: int, depth: int,
                  drafts: torch.Tensor, streams: torch.Tensor) -> tuple[int, int]:
        """An MTP block over T (stream, token) pairs at pos.., then `depth` greedy drafts chained on its
        own stream (mtp_draft.c `lg_mtp_draft`): prev [T, hidden] (model dtype, may be `streams`),
        next_ids int64 [T], drafts int64 [depth], streams [T + max(depth - 1, 0), hidden] (the catch-up's
        output streams, then each chained call's). -> (0, or -2 where a draft's scores were not finite,
        drafts made)."""
        made = ctypes.c_int(0)
        rc = self._lib.lg_mtp_draft(ctypes.byref(mtp), ctypes.byref(block), prev.shape[0], prev.data_ptr(), next_ids.data_ptr(), pos, depth,
                                    drafts.data_ptr(), streams.data_ptr(), ctypes.byref(made), torch.get_num_threads())
        if rc == -1:
            raise MemoryError("native MTP draft: out of memory")
        return rc, made.value

    @staticmethod
    def quantized_experts(tables: tuple[ctypes.Array, ctypes.Array, int]) -> LgExperts:
        """A layer's LgExperts from its quantized (gate_up, down, inter) tables (kept alive by the caller)."""
        ptr = ctypes.POINTER(_QTensor)
        return LgExperts(ctypes.cast(tables[0], ptr), ctypes.cast(tables[1], ptr), None, None, tables[2])

    @staticmethod
    def dense_experts(gate_up: ctypes.Array, down: ctypes.Array, inter: int, fp32: bool = False) -> LgExperts:
        """A layer's LgExperts from an LgMat per expert for gate_up [2I, H] and down [H, I] (kept alive by
        the caller). fp32: the experts compute in fp32 (GGUF blocks: PreparedExpert's numbers), else in
        the model dtype (dense experts: expert_swiglu's)."""
        ptr = ctypes.POINTER(LgMat)
        return LgExperts(None, None, ctypes.cast(gate_up, ptr), ctypes.cast(down, ptr), inter, int(fp32))

    @staticmethod
    def describe_matrix(w: torch.Tensor | QuantTensor, dtype: torch.dtype, bias: torch.Tensor | None = None) -> LgMat | None:
        """quant's C view of a weight (NativeLib.describe_matrix), for LgLayer and LgExperts."""
        return NativeLib.describe_matrix(w, dtype, bias)

    def dense_expert(self, gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """One dense expert on x [T, H] through quant's kernel (NativeLib.dense_expert)."""
        return self.quant.dense_expert(gate_up, down, x)


@cache
def native() -> LayerLib | None:
    """The model side's library, built and loaded once per process (a hot path: ~50 norms and 24
    RoPE calls a token); None, with a warning logged, where it or quant's cannot be built."""
    quant = native_lib()
    cc = _compiler()
    if quant is None or cc is None:  # quant.native has said why
        return None
    try:
        return LayerLib(build_layers(cc, quant.path), quant)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("localglm: native layer ops failed to build (%s); the layers run torch ops", e)
        return None


class RowsProduct:
    """x . w^T for a weight used a few rows at a time (an lm_head, an MTP block's eh_proj and its draft
    vocabulary's rows): up to `max_rows` rows (the call's) on the CPU through the native one-row products
    (`LayerLib.rows_linear`: each row's numbers do not depend on how many rows there are, so a
    speculative verification's logits are a decode step's bit for bit, and the weight is read once
    per 4 rows; torch's bf16 GEMV costs 3-4x as much for one row); more rows, another device, a
    weight the kernels do not take, or a product that needs a gradient (training) go through torch's
    linear. The C view is made at first use."""

    def __init__(self, w: torch.Tensor | QuantTensor, dtype: torch.dtype) -> None:
        self.w, self.dtype = w, dtype
        self._mat: LgMat | None | bool = False  # False: not described yet; None: the kernels do not take w

    @property
    def in_kernels(self) -> bool:
        """Whether the native products have taken w (known after the first call on the CPU)."""
        return isinstance(self._mat, LgMat)

    def matrix(self) -> LgMat | None:
        """The C view of w (made at first use), None where the kernels do not take it."""
        if self._mat is False:
            self._mat = LayerLib.describe_matrix(self.w, self.dtype)
        return self._mat if isinstance(self._mat, LgMat) else None

    def __call__(self, x: torch.Tensor, max_rows: int) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        grad = torch.is_grad_enabled() and (x.requires_grad or bool(getattr(self.w, "requires_grad", False)))
        lib = native() if x.device.type == "cpu" and rows <= max_rows and not grad else None
        mat = self.matrix() if lib is not None else None
        if lib is None or mat is None:
            return linear(x, self.w)
        y = lib.rows_linear(mat, x.reshape(rows, x.shape[-1]), self.dtype).to(self.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])
