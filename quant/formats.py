"""localglm's weight-only quantized formats: specs, error-minimising quantizers, packing, dequantization.

Three schemes, all for a 2-D weight W [N, K] used as y = x @ W.T (rows = output features):

- ``q8``  : int8 codes q in [-127, 127] in groups of 32 along K, symmetric: w = rowf * gscale_g * q.
            Each group's scale is searched around amax/127 for the least squared error, then stored as
            fp16 relative to the row's largest scale (rowf, fp32), and the codes re-picked for the
            stored scale: 8 + 16/32 bits per weight + 32 bits per row (8.53 bpw at K=1024). llama.cpp's
            Q8_0 (fp16 d per 32, w = d * q) maps onto it losslessly with rowf = 1, gscale = d.
- ``q4``  : 4-bit codes c in [0, 15] in groups of 32 along K, asymmetric: w = s_g * c + m_g.
- ``q2``  : the same with 2-bit codes c in [0, 3].
            The group scale s_g is stored as an 8-bit logarithmic code (16 steps per octave below the
            row's largest scale), the group offset m_g as int8 relative to the row's largest |m|, and the
            two row factors as fp32: b + 16/32 bits per weight + 64 bits per row
            (q4: 4.56 bpw, q2: 2.56 bpw at K=1024, against llama.cpp's Q4_K 4.5 / Q2_K 2.625).
            Codes and (s, m) are fitted by alternating least squares from several clipped starts
            (the HQQ / K-quant idea: minimise ||W - deq(Q(W))||^2, not round-to-nearest of min/max).

Every quantized tensor is one flat uint8 buffer with a layout fixed by (spec, shape) -- see
`QuantTensor.layout` -- so it can live in a safetensors file as one uint8 tensor, be memory-mapped,
and be moved with one copy. Nothing here knows about models.
"""

from __future__ import annotations

from concurrent.futures import Executor
from functools import cache
from typing import Any

import torch

# The spec and the buffer layout need no torch (quant/spec.py): re-exported here, where they always lived.
from .spec import GROUP, GROUPS, SUPPORTED_BITS, QuantError, QuantSpec, layout, layout_nbytes  # noqa: F401

_LOG_STEPS = 16.0  # scale codes per octave


def _scale_table() -> torch.Tensor:
    """What scale code c means, 2^((c - 255) / 16), as fp32 [256]: with v = c + 1 = 16 e + f,
    2^(f / 16) (from double, rounded once) times the exact power 2^(e - 16). The native kernels
    (quant/native/qkernels.c, init_lut) build the same floats, so both read a tensor alike."""
    frac = torch.tensor([2.0 ** (f / 16) for f in range(16)], dtype=torch.float64).float()
    v = torch.arange(1, 257)
    return torch.ldexp(frac[v & 15], (v >> 4) - 16)


_SCALES = _scale_table()


@cache
def _scales_on(device: torch.device) -> torch.Tensor:
    """The scale table on `device`, copied there once: a per-call copy from pageable memory would make
    the host wait for the GPU's queue each time a CUDA kernel is prepared (every expert-cache miss)."""
    return _SCALES if device.type == "cpu" else _SCALES.to(device)


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] (values < 2**bits) -> packed uint8 [N, K*bits/8]."""
    if bits == 8:
        return codes.contiguous().view(torch.uint8)
    per = 8 // bits
    c = codes.to(torch.uint8).view(codes.shape[0], -1, per)
    out = c[..., 0].clone()
    for j in range(1, per):
        out |= c[..., j] << (bits * j)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [N, K*bits/8] -> uint8 codes [N, K]."""
    if bits == 8:
        return packed
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * j)) & mask for j in range(per)]
    return torch.stack(parts, dim=-1).view(packed.shape[0], k)


# ------------------------------------------------------------------------------------------------
# Quantizers
# ------------------------------------------------------------------------------------------------

# Candidate q8 group scales, as multiples of amax/127. Clipping (< 1) never won at 8 bits in our
# measurements (one clipped weight costs more than 31 finer ones gain); slightly wider scales move the
# rounding grid, and the best of them cuts the squared error 8-18% below Q8_0's amax/127.
_RATIOS_8 = tuple(1.0 + i / 100 for i in range(11))
# Starting ranges (fraction of [min, max] kept, symmetric shrink) for the alternating LS fit.
_STARTS = {2: (1.0, 0.85, 0.7, 0.55), 4: (1.0, 0.9, 0.8)}
_ITERS = {2: 6, 4: 3}
_FP16_TINY = 2.0**-24  # the smallest positive fp16: a group scale never codes to 0
POOL_CHUNKS = 4  # QuantTensor.quantize on a thread pool cuts a tensor into at least this many chunks


# The quantizers below are memory-bound passes over the weights: each result is computed in place
# where torch allows (the same float operations, in the same order, as the out-of-place form: the
# codes do not depend on it), which saves an allocation and a page-in per operation.


def _round8(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Symmetric 8-bit codes of w for scales s (broadcast), as floats in [-127, 127]."""
    return torch.div(w, s).round_().clamp_(-127, 127)


def _sq_err(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """sum over the group of (q * s - w)^2, [..., 1]."""
    return torch.mul(q, s).sub_(w).pow_(2).sum(-1, keepdim=True)


def _quant8(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """w [N, K] fp32 -> q8 sections: per group the least-squares scale among amax/127 * _RATIOS_8,
    then one least-squares refit for its codes (kept where it lowers the error), coded as fp16
    relative to the row's largest scale; the codes are re-picked for the coded scale."""
    n, k = w.shape
    wg = w.view(n, k // group, group)
    amax = wg.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    cand = amax * (torch.tensor(_RATIOS_8, dtype=w.dtype, device=w.device) / 127.0)  # [N, ng, C]
    s, err = cand[..., :1], _sq_err(wg, _round8(wg, cand[..., :1]), cand[..., :1])  # [N, ng, 1]
    for i in range(1, cand.shape[-1]):  # one candidate at a time (cache-sized temporaries); ties keep the first
        si = cand[..., i : i + 1]
        ei = _sq_err(wg, _round8(wg, si), si)
        better = (ei < err) | (ei.isnan() & ~err.isnan())  # argmin's choice: the first least, a NaN before all
        s, err = torch.where(better, si, s), torch.where(better, ei, err)
    q = _round8(wg, s)
    s_ls = torch.mul(q, wg).sum(-1, keepdim=True) / torch.mul(q, q).sum(-1, keepdim=True).clamp_min(1e-30)
    s_ls = torch.where(s_ls > 0, s_ls, s)
    s = torch.where(_sq_err(wg, _round8(wg, s_ls), s_ls) < err, s_ls, s).squeeze(-1)  # err: s's own error
    rowf = s.amax(1, keepdim=True)
    gscale = (s / rowf).clamp_min(_FP16_TINY).to(torch.float16)
    q = _round8(wg, (rowf * gscale.float()).unsqueeze(-1)).view(n, k)
    return {"rowf": rowf, "data": q.to(torch.int8).view(torch.uint8), "gscale": gscale}


def _ls_fit(w: torch.Tensor, c: torch.Tensor, s: torch.Tensor, m: torch.Tensor, sw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (s, m) per group for fixed codes (sw: w's group sums); keeps the old pair where degenerate."""
    g = w.shape[-1]
    sc = c.sum(-1, keepdim=True)
    t = torch.mul(c, c)
    scc = t.sum(-1, keepdim=True)
    scw = torch.mul(c, w, out=t).sum(-1, keepdim=True)
    det = g * scc - sc * sc
    ok = det > 0.5
    s_new = (g * scw - sc * sw) / torch.where(ok, det, torch.ones_like(det))
    ok &= s_new > 0
    s_new = torch.where(ok, s_new, s)
    m_new = torch.where(ok, (sw - s_new * sc) / g, m)
    return s_new, m_new


def _assign(w: torch.Tensor, s: torch.Tensor, m: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.sub(w, m).div_(s).round_().clamp_(0, qmax)


def _fit_groups(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [R, G] fp32 -> (codes, s, m) minimising the squared error, best of several starts."""
    qmax = (1 << bits) - 1
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    mid, half = (lo + hi) / 2, ((hi - lo) / 2).clamp_min(1e-30)
    sw = w.sum(-1, keepdim=True)
    best = None
    for shrink in _STARTS[bits]:
        m = mid - half * shrink
        s = 2 * half * shrink / qmax
        for _ in range(_ITERS[bits]):
            c = _assign(w, s, m, qmax)
            s, m = _ls_fit(w, c, s, m, sw)
        c = _assign(w, s, m, qmax)
        err = torch.mul(c, s).add_(m).sub_(w).pow_(2).sum(-1, keepdim=True)
        if best is None:
            best = [err, c, s, m]
        else:
            better = err < best[0]
            for i, v in enumerate((err, c, s, m)):
                best[i] = torch.where(better, v, best[i])
    return best[1], best[2], best[3]


def _code_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group scales s [N, ng] -> (log code, row max [N], coded scales [N, ng])."""
    s_max = s.amax(1, keepdim=True).clamp_min(1e-30)
    scode = torch.clamp(torch.round(255 + _LOG_STEPS * torch.log2(s.clamp_min(1e-38) / s_max)), 0, 255)
    s_q = s_max * _scales_on(s.device)[scode.long()]
    return scode, s_max.squeeze(1), s_q


def _quant_grouped(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    n, k = w.shape
    g, bits = spec.group, spec.bits
    qmax = (1 << bits) - 1
    wg = w.view(n, k // g, g)
    c, s, m = _fit_groups(wg, bits)
    scode, s_max, s_q = _code_scales(s.squeeze(-1))
    s_q = s_q.unsqueeze(-1)
    # Refit the offsets for the coded scales, then code them, then re-pick the codes: each step can
    # only lower the error for the parameters already fixed.
    for _ in range(2):
        t = torch.mul(s_q, c)
        m = torch.sub(wg, t, out=t).mean(-1, keepdim=True)
        c = _assign(wg, s_q, m, qmax)
    m = m.squeeze(-1)
    m_max = m.abs().amax(1, keepdim=True).clamp_min(1e-30)
    mcode = torch.clamp(torch.round(m / m_max * 127), -127, 127)
    m_q = (mcode * (m_max / 127)).unsqueeze(-1)
    c = _assign(wg, s_q, m_q, qmax).view(n, k)
    return {
        "rowf": torch.stack([s_max, m_max.squeeze(1)], 1).float(),
        "data": pack_codes(c.to(torch.uint8), bits),
        "scode": scode.to(torch.uint8),
        "mcode": mcode.to(torch.int8),
    }


# ------------------------------------------------------------------------------------------------
# The tensor
# ------------------------------------------------------------------------------------------------


class QuantTensor:
    """A quantized 2-D weight: spec, logical shape [N, K], and its flat uint8 buffer.

    `dtype` is the compute dtype results come back in. `matmul(x)` = x @ W.T through the fastest
    kernel for the buffer's device (prepared once, cached). It also answers `torch.cat` along dim 0,
    `F.linear` and `F.embedding` (via __torch_function__), so model code written for plain tensors
    takes it unchanged.
    """

    def __init__(self, spec: QuantSpec, shape: tuple[int, int], buf: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> None:
        spec.check_shape(tuple(shape))
        need = layout_nbytes(spec, tuple(shape), aligned=False)
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < need:
            raise QuantError(f"buffer for {spec.name} {list(shape)} must be uint8 with at least {need} bytes, got {buf.dtype} {list(buf.shape)}")
        self.spec = spec
        self.shape = torch.Size(shape)
        self.buf = buf
        self.dtype = dtype
        self._kernel: Any = None

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def quantize(
        cls, w: torch.Tensor, spec: QuantSpec, dtype: torch.dtype | None = None, chunk_rows: int | None = None, pool: Executor | None = None
    ) -> QuantTensor:
        """w [N, K] quantized to `spec`, in chunks of rows (~1 MB of fp32 each: bounded temporary
        memory, cache-friendly). Rows are quantized independently, so the chunks may run on `pool`'s
        threads (at least POOL_CHUNKS of them, to share the work out) with the same result."""
        spec.check_shape(tuple(w.shape))
        n, k = w.shape
        if chunk_rows is None:
            chunks = -(-n * k // (1 << 18))
            chunk_rows = -(-n // max(chunks, POOL_CHUNKS if pool is not None else 1))

        def one(r: int) -> dict[str, torch.Tensor]:
            wf = w[r : r + chunk_rows].float()
            return _quant8(wf, spec.group) if spec.bits == 8 else _quant_grouped(wf, spec)

        starts = range(0, n, chunk_rows)
        parts = list(pool.map(one, starts)) if pool is not None else [one(r) for r in starts]
        sections = {key: torch.cat([sec[key] for sec in parts], 0) for key in parts[0]}
        return cls.from_sections(spec, (n, k), sections, dtype or (w.dtype if w.dtype.is_floating_point and w.dtype != torch.float64 else torch.float32))

    @classmethod
    def from_sections(cls, spec: QuantSpec, shape: tuple[int, int], sections: dict[str, torch.Tensor], dtype: torch.dtype) -> QuantTensor:
        lay = layout(spec, shape)
        device = next(iter(sections.values())).device  # rows() / cat_rows() of a CUDA tensor stay on its GPU
        buf = torch.zeros(layout_nbytes(spec, shape), dtype=torch.uint8, device=device)
        for key, (off, size) in lay.items():
            src = sections[key].contiguous().view(torch.uint8).reshape(-1)
            if src.numel() != size:
                raise QuantError(f"section {key}: {src.numel()} bytes, layout wants {size}")
            buf[off : off + size] = src
        return cls(spec, shape, buf, dtype)

    # -- sections (views into buf) ---------------------------------------------------------
    def section(self, key: str) -> torch.Tensor:
        off, size = layout(self.spec, tuple(self.shape))[key]
        raw = self.buf[off : off + size]
        n, k = self.shape
        ng = k // self.spec.group
        if key == "rowf":
            return raw.view(torch.float32).view(n, -1)
        if key == "data":
            return raw.view(n, -1)
        if key == "gscale":
            return raw.view(torch.float16).view(n, ng)
        if key == "scode":
            return raw.view(n, ng)
        return raw.view(torch.int8).view(n, ng)

    def codes(self) -> torch.Tensor:
        """Unpacked codes [N, K]: int8 values for q8, uint8 in [0, 2**bits) for q2/q4."""
        self._no_blocks("codes")
        data = self.section("data")
        if self.spec.bits == 8:
            return data.view(torch.int8)
        return unpack_codes(data, self.spec.bits, self.shape[1])

    def group_params(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (s, m) [N, K/G] with w = s * c + m (q8: s = rowf * gscale, m = 0)."""
        self._no_blocks("group_params")
        rowf = self.section("rowf").float()
        if self.spec.bits == 8:
            s = rowf * self.section("gscale").float()
            return s.to(dtype), torch.zeros_like(s, dtype=dtype)
        s = rowf[:, :1] * _scales_on(rowf.device)[self.section("scode").long()]
        m = self.section("mcode").float() * (rowf[:, 1:2] / 127)
        return s.to(dtype), m.to(dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        n, k = self.shape
        if self.spec.raw_blocks:
            from .kquants import dequantize

            return dequantize(self.section("data"), self.spec, (n, k)).to(dtype)  # type: ignore[arg-type]
        g = self.spec.group
        s, m = self.group_params()
        w = self.codes().float().view(n, k // g, g) * s.unsqueeze(-1)
        if self.spec.bits != 8:  # q8 has no offsets (and -0.0 stays -0.0, bit-exact with Q8_0)
            w = w + m.unsqueeze(-1)
        return w.view(n, k).to(dtype)

    def _no_blocks(self, what: str) -> None:
        if self.spec.raw_blocks:
            raise QuantError(f"{what}: a {self.spec.name} tensor is GGUF blocks (sub-block scales), not codes and group scales")

    # -- properties ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.buf.device

    @property
    def nbytes(self) -> int:
        return self.buf.numel()

    @property
    def bits_per_weight(self) -> float:
        return self.spec.bits_per_weight(tuple(self.shape))

    def dim(self) -> int:
        return 2

    def size(self, i: int | None = None) -> Any:
        return self.shape if i is None else self.shape[i]

    def __repr__(self) -> str:
        return f"QuantTensor({self.spec.name}, shape={list(self.shape)}, {self.nbytes} bytes, dtype={self.dtype}, device={self.device})"

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None, **_: Any) -> QuantTensor:
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        buf = self.buf if device is None else self.buf.to(device)
        if buf is self.buf and (dtype is None or dtype == self.dtype):
            return self
        return QuantTensor(self.spec, tuple(self.shape), buf, dtype or self.dtype)

    def float(self) -> torch.Tensor:  # explicit, for callers that really want the dense weight
        return self.dequantize(torch.float32)

    # -- compute ---------------------------------------------------------------------------
    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] -> x @ W.T (+ bias) [..., N] in x's dtype."""
        if self._kernel is None:
            self._kernel = prepare(self)
        return self._kernel(x, bias)

    def prepare(self, drop_buffer: bool = False) -> QuantTensor:
        """Build the device kernel's form now (instead of on the first matmul); optionally free the
        canonical buffer afterwards (then dequantize/cat/save are no longer possible)."""
        if self._kernel is None:
            self._kernel = prepare(self)
        if drop_buffer:
            self.buf = torch.empty(0, dtype=torch.uint8)
        return self

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W, dequantized (an embedding table lookup)."""
        flat = ids.reshape(-1)
        if flat.numel() <= 16 and self.device.type == "cpu":
            # A decoded token: the native kernels dequantize the row in place (the same fp32 math
            # as dequantize()) instead of copying it out through a dozen torch ops.
            from .native import native_lib

            lib = native_lib()
            if lib is not None and lib.supports(self):
                return lib.dequantize_rows(self, flat).to(self.dtype).view(*ids.shape, self.shape[1])
        sub = self.rows(flat)
        return sub.dequantize(self.dtype).view(*ids.shape, self.shape[1])

    def rows(self, index: torch.Tensor) -> QuantTensor:
        """A new QuantTensor of the selected rows (a copy)."""
        n, k = self.shape
        idx = index.to(self.device)
        sec = {key: self.section(key).view(torch.uint8).view(n, -1)[idx] for key in layout(self.spec, (n, k))}
        return QuantTensor.from_sections(self.spec, (idx.numel(), k), sec, self.dtype)

    @staticmethod
    def cat_rows(parts: list[QuantTensor]) -> QuantTensor:
        """Stack tensors of one spec and K along the rows (fusing q/k/v or gate/up)."""
        spec, k = parts[0].spec, parts[0].shape[1]
        if any(p.spec != spec or p.shape[1] != k for p in parts):
            raise QuantError("cat_rows: every part needs the same spec and K")
        n = sum(p.shape[0] for p in parts)
        keys = layout(spec, (parts[0].shape[0], k))
        sec = {key: torch.cat([p.section(key).view(torch.uint8).view(p.shape[0], -1) for p in parts], 0) for key in keys}
        return QuantTensor.from_sections(spec, (n, k), sec, parts[0].dtype)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        import torch.nn.functional as F

        if func is torch.cat:
            tensors = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            from .stack import QuantStack

            if dim != 0 or not all(isinstance(t, (QuantTensor, QuantStack, torch.Tensor)) for t in tensors):
                raise QuantError("a QuantTensor can only be concatenated with 2-D weights along dim 0")
            if not all(isinstance(t, QuantTensor) for t in tensors) or len({t.spec for t in tensors}) > 1:
                return QuantStack(list(tensors))  # formats differ (a GGUF mix): each part multiplied as stored
            return cls.cat_rows(list(tensors))
        if func is F.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            return w.matmul(x, b)
        if func is F.embedding:
            ids, w = args[0], args[1]
            return w.embedding(ids)
        raise QuantError(f"{getattr(func, '__name__', func)} is not supported on a QuantTensor (dequantize() it first)")


def prepare(qt: QuantTensor) -> Any:
    """The kernel for qt's device: a callable (x, bias) -> y."""
    if qt.spec.raw_blocks:
        from .kquants import prepare_ggml

        return prepare_ggml(qt)
    if qt.device.type == "cuda":
        from .cuda_kernels import prepare_cuda

        return prepare_cuda(qt)
    from .cpu_kernels import prepare_cpu

    return prepare_cpu(qt)


def relative_error(w: torch.Tensor, qt: QuantTensor) -> float:
    """||W - deq(Q(W))|| / ||W|| (Frobenius)."""
    wf = w.float()
    return float((qt.dequantize(torch.float32) - wf).norm() / wf.norm().clamp_min(1e-30))


def nbits_total(shape: tuple[int, int], spec: QuantSpec) -> int:
    return 8 * layout_nbytes(spec, shape, aligned=False)


__all__ = [
    "SUPPORTED_BITS",
    "GROUP",
    "QuantError",
    "QuantSpec",
    "QuantTensor",
    "layout",
    "layout_nbytes",
    "pack_codes",
    "unpack_codes",
    "relative_error",
]
