"""The native CPU kernels (quant/native/qkernels.c): built with the machine's C compiler at first use,
cached, and called through ctypes.

Why built here and not shipped: `-march=native` picks the user's vector units (AVX2, F16C...), and
a plain C file needs no torch headers (compiles in about a second). Without a C compiler, or with
LOCALGLM_NATIVE=0, `native_lib()` returns None and quant/cpu_kernels.py keeps torch's kernels; the
reason is in `native_status()` (shown in `generate --stats-json` under `backend.kernels`). The same
library also holds the per-token layer ops the model code calls on the CPU (RMSNorm, RoPE, decode
attention: see localglm/layers/).

    lib = native_lib()
    if lib is not None and NativeLib.supports(qt):
        y = NativeLinear(lib, qt)(x)                    # x [..., K] -> [..., N]: what QuantTensor.matmul uses
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .formats import QuantTensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "qkernels.c"
# -ffp-contract=off: a product and a sum stay two roundings (no fused multiply-add the C source does
# not ask for), as in torch's elementwise ops: experts summed here equal experts summed by torch.
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11", "-fno-math-errno", "-ffp-contract=off")
BLOCK = 32  # activation block of the kernels: K of every native tensor is a multiple of it


class _QTensor(ctypes.Structure):
    _fields_ = [
        ("rowf", ctypes.c_void_p),
        ("data", ctypes.c_void_p),
        ("gs", ctypes.c_void_p),
        ("gm", ctypes.c_void_p),
        ("bits", ctypes.c_int32),
        ("group", ctypes.c_int32),
        ("n", ctypes.c_int32),
        ("k", ctypes.c_int32),
    ]


class LgMat(ctypes.Structure):
    """A weight matrix for the fused decode layer: quantized (kind 0) or dense bf16 (1) / fp32 (2)."""

    _fields_ = [
        ("kind", ctypes.c_int32),
        ("n", ctypes.c_int32),
        ("k", ctypes.c_int32),
        ("w", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("q", _QTensor),
    ]


class LgExperts(ctypes.Structure):
    """A MoE layer's routed experts for the fused decode (qkernels.c `lg_experts`): quantized tables
    (lg_moe's) or dense ones (an LgMat per expert); all NULL: the caller runs them."""

    _fields_ = [
        ("q_gate_up", ctypes.POINTER(_QTensor)),
        ("q_down", ctypes.POINTER(_QTensor)),
        ("d_gate_up", ctypes.POINTER(LgMat)),
        ("d_down", ctypes.POINTER(LgMat)),
        ("inter", ctypes.c_int32),
    ]


class LgLayer(ctypes.Structure):
    """One decoder layer as `lg_decode_layer` reads it (see qkernels.c)."""

    _fields_ = [
        *((name, ctypes.c_int32) for name in ("hidden", "heads", "kv_heads", "hd", "rot", "dtype")),
        ("eps", ctypes.c_float),
        *((name, ctypes.c_int32) for name in ("moe", "has_mlp", "n_experts", "top_k", "n_group", "topk_group", "norm_topk")),
        ("scaling", ctypes.c_float),
        *((name, ctypes.c_void_p) for name in ("input_norm", "post_norm", "q_norm", "k_norm", "router_w", "router_bias")),
        *((name, LgMat) for name in ("qkv", "o", "gate_up", "down")),
    ]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "localglm" / "native"


def _compiler() -> str | None:
    for cc in (os.environ.get("LOCALGLM_CC"), os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_identity() -> str:
    """What -march=native depends on: a cached library built on another CPU must not be reused."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(lines)))


def build(cc: str, flags: tuple[str, ...] = CFLAGS, directory: Path | None = None) -> Path:
    """Compile qkernels.c (once per source, compiler, flags and CPU) into `directory` (default: the
    user cache); returns the library's path."""
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(src + repr((version, flags, sys.platform, _cpu_identity())).encode()).hexdigest()[:16]
    out = (directory or cache_dir()) / f"qkernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
        os.replace(tmp, out)  # atomic: a concurrent build or a crash never leaves a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


class NativeLib:
    """The loaded kernels with typed entry points taking torch tensors."""

    def __init__(self, path: Path) -> None:
        import torch  # noqa: F401  (torch's OpenMP runtime must be loaded first: the library shares it)

        self.path = path
        self._lib = ctypes.CDLL(str(path))
        p, i = ctypes.c_void_p, ctypes.c_int
        self._lib.lg_linear.argtypes = [ctypes.POINTER(_QTensor), i, p, i, p, p, i, i]
        self._lib.lg_linear.restype = i
        self._lib.lg_moe.argtypes = [i, i, i, p, i, i, p, p, ctypes.POINTER(_QTensor), ctypes.POINTER(_QTensor), i, p, i]
        self._lib.lg_moe.restype = i
        self._lib.lg_rms_norm.argtypes = [p, i, i, i, p, ctypes.c_float, p]
        self._lib.lg_rms_norm.restype = None
        self._lib.lg_rope.argtypes = [p, i, i, i, i, p, p, p]
        self._lib.lg_rope.restype = None
        lg = ctypes.c_long
        self._lib.lg_decode_attention.argtypes = [p, p, p, i, i, i, i, i, lg, lg, ctypes.c_float, p, i]
        self._lib.lg_decode_attention.restype = i
        ex = ctypes.POINTER(LgExperts)
        self._lib.lg_decode_layer.argtypes = [ctypes.POINTER(LgLayer), p, p, p, p, p, p, p, lg, lg, i, p, p, p, p, ex, p, i]
        self._lib.lg_decode_layer.restype = i
        self._lib.lg_decode_layers.argtypes = [ctypes.POINTER(LgLayer), i, p, p, p, p, p, lg, lg, lg, i, ex, i]
        self._lib.lg_decode_layers.restype = i
        self._lib.lg_dense_expert.argtypes = [ctypes.POINTER(LgMat), ctypes.POINTER(LgMat), i, p, i, p, i]
        self._lib.lg_dense_expert.restype = i
        self._lib.lg_residual_add.argtypes = [p, p, p, i, i]
        self._lib.lg_residual_add.restype = None
        self._lib.lg_dequant.argtypes = [ctypes.POINTER(_QTensor), p, i]
        self._lib.lg_dequant.restype = None
        self._lib.lg_dequant_rows.argtypes = [ctypes.POINTER(_QTensor), p, i, p]
        self._lib.lg_dequant_rows.restype = None
        self.avx2 = bool(self._lib.lg_has_avx2())

    @staticmethod
    def supports(qt: QuantTensor) -> bool:
        """Whether the kernels take this tensor (CPU, a live buffer, K a multiple of the block)."""
        return qt.device.type == "cpu" and qt.buf.numel() > 0 and qt.shape[1] % BLOCK == 0 and qt.spec.group % BLOCK == 0 and qt.spec.group > 0

    @staticmethod
    def describe(qt: QuantTensor) -> _QTensor:
        """The C view of a QuantTensor (pointers into its buffer: keep qt alive while it is used)."""
        n, k = qt.shape
        if qt.spec.bits == 8:
            gs, gm = qt.section("gscale").data_ptr(), None
        else:
            gs, gm = qt.section("scode").data_ptr(), qt.section("mcode").data_ptr()
        return _QTensor(qt.section("rowf").data_ptr(), qt.section("data").data_ptr(), gs, gm, qt.spec.bits, qt.spec.group, n, k)

    def linear(self, desc: _QTensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, K] (fp32 or bf16; others computed in fp32) -> x @ W.T (+ fp32 bias) [T, N], x's dtype."""
        x = _io(x)
        y = torch.empty(x.shape[0], desc.n, dtype=x.dtype)
        code = _DTYPES[x.dtype]
        rc = self._lib.lg_linear(ctypes.byref(desc), x.shape[0], x.data_ptr(), code, None if bias is None else bias.data_ptr(), y.data_ptr(), code, torch.get_num_threads())
        if rc:
            raise MemoryError("native linear kernel: out of memory")
        return y

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
        """RMSNorm over the last dim (see layers.rms_norm for the math), or None for inputs the
        kernel does not take (non-contiguous, other dtypes, weight of another dtype or shape)."""
        code = _DTYPES.get(x.dtype)
        n = x.shape[-1]
        if code is None or weight.dtype != x.dtype or weight.shape != (n,) or not (x.is_contiguous() and weight.is_contiguous()) or x.device.type != "cpu":
            return None
        out = torch.empty_like(x)
        self._lib.lg_rms_norm(x.data_ptr(), code, x.numel() // n, n, weight.data_ptr(), eps, out.data_ptr())
        return out

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        """Rotary embedding of x [..., hd] at one position (cos/sin [1, rot]: see layers.apply_rope);
        None for inputs the kernel does not take."""
        code = _DTYPES.get(x.dtype)
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
        code = _DTYPES.get(q.dtype)
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

    @classmethod
    def describe_matrix(cls, w: torch.Tensor | QuantTensor, dtype: torch.dtype, bias: torch.Tensor | None = None) -> LgMat | None:
        """The fused decode layer's view of a weight (kept alive by the caller, with the bias, which
        must be fp32), or None when the kernels do not take it: a dense weight of another dtype or
        layout, a quantized one they do not support."""
        if isinstance(w, QuantTensor):
            if not cls.supports(w):
                return None
            return LgMat(0, w.shape[0], w.shape[1], None, None if bias is None else bias.data_ptr(), cls.describe(w))
        if (not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype != dtype or dtype not in _DTYPES
                or not w.is_contiguous() or w.device.type != "cpu"):
            return None
        return LgMat(2 if dtype == torch.float32 else 1, w.shape[0], w.shape[1], w.data_ptr(), None if bias is None else bias.data_ptr())

    def decode_layer(self, layer: LgLayer, x: torch.Tensor, add: tuple[torch.Tensor, torch.Tensor | None] | None,
                     cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int,
                     h_out: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor, mlp_out: torch.Tensor | None, threads: int,
                     experts: LgExperts | None = None, routed_out: torch.Tensor | None = None) -> None:
        """One token through one layer (qkernels.c `lg_decode_layer`): x updated in place; the
        caller has checked every shape and dtype (localglm/fused_decode.py). With `experts` (the
        layer's expert tables) the routed experts run in the same call, into `routed_out`, and x
        comes back with the whole layer added."""
        a = b = None
        if add is not None:
            a, b = add[0].data_ptr(), None if add[1] is None else add[1].data_ptr()
        rc = self._lib.lg_decode_layer(ctypes.byref(layer), x.data_ptr(), a, b, cos.data_ptr(), sin.data_ptr(),
                                       k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), pos,
                                       h_out.data_ptr(), ids.data_ptr(), wts.data_ptr(),
                                       None if mlp_out is None else mlp_out.data_ptr(),
                                       None if experts is None else ctypes.byref(experts),
                                       None if routed_out is None else routed_out.data_ptr(), threads)
        if rc:
            raise MemoryError("native decode layer: out of memory")

    def decode_layers(self, layers: ctypes.Array, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, pos: int, experts: ctypes.Array, threads: int) -> None:
        """Every layer of one token in one call (qkernels.c `lg_decode_layers`), for models whose
        routed experts all sit in RAM. k_cache / v_cache [layers, kv_heads, T, hd] (one sequence);
        experts: an LgExperts per layer (empty for dense layers)."""
        rc = self._lib.lg_decode_layers(layers, len(layers), x.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
                                        v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), pos, experts, threads)
        if rc:
            raise MemoryError("native decode layers: out of memory")

    @staticmethod
    def quantized_experts(tables: tuple[ctypes.Array, ctypes.Array, int]) -> LgExperts:
        """A layer's LgExperts from its quantized (gate_up, down, inter) tables (kept alive by the caller)."""
        ptr = ctypes.POINTER(_QTensor)
        return LgExperts(ctypes.cast(tables[0], ptr), ctypes.cast(tables[1], ptr), None, None, tables[2])

    @staticmethod
    def dense_experts(gate_up: ctypes.Array, down: ctypes.Array, inter: int) -> LgExperts:
        """A layer's LgExperts from an LgMat per expert for gate_up [2I, H] and down [H, I] (kept alive by the caller)."""
        ptr = ctypes.POINTER(LgMat)
        return LgExperts(None, None, ctypes.cast(gate_up, ptr), ctypes.cast(down, ptr), inter)

    def dense_expert(self, gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """One dense expert on x [T, H]: down(silu(gate(x)) * up(x)) in x's dtype, rounded as the torch
        ops round; None where the kernel does not take these tensors."""
        gu, dn = self.describe_matrix(gate_up, x.dtype), self.describe_matrix(down, x.dtype)
        if gu is None or dn is None or x.dim() != 2 or not x.is_contiguous() or x.device.type != "cpu":
            return None
        y = torch.empty(x.shape[0], dn.n, dtype=x.dtype)
        if self._lib.lg_dense_expert(ctypes.byref(gu), ctypes.byref(dn), x.shape[0], x.data_ptr(), _DTYPES[x.dtype], y.data_ptr(), torch.get_num_threads()):
            raise MemoryError("native dense expert: out of memory")
        return y

    def residual_add(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None) -> None:
        """x += a + b in place, rounded as `x + (a + b)` in x's dtype (all contiguous, one dtype)."""
        self._lib.lg_residual_add(x.data_ptr(), a.data_ptr(), None if b is None else b.data_ptr(), _DTYPES[x.dtype], x.numel())

    def dequantize(self, desc: _QTensor) -> torch.Tensor:
        """The whole weight as fp32 [N, K] (for big batches, multiplied by a float GEMM)."""
        out = torch.empty(desc.n, desc.k, dtype=torch.float32)
        self._lib.lg_dequant(ctypes.byref(desc), out.data_ptr(), torch.get_num_threads())
        return out

    def dequantize_rows(self, qt: QuantTensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` of qt as fp32 [len(rows), K], dequantized where they lie (an embedding lookup)."""
        rows = rows.to(torch.int64).contiguous()
        if rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < qt.shape[0]):
            raise IndexError(f"row index outside [0, {qt.shape[0]})")
        out = torch.empty(rows.numel(), qt.shape[1], dtype=torch.float32)
        self._lib.lg_dequant_rows(ctypes.byref(self.describe(qt)), rows.data_ptr(), rows.numel(), out.data_ptr())
        return out

    def moe(self, gate_up: ctypes.Array, down: ctypes.Array, inter: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One MoE layer's routed experts: x [T, H] (fp32 or bf16), ids int64 / weights fp32 [T, k] -> [T, H] in x's dtype."""
        x = _io(x)
        ids = ids.to(torch.int64).contiguous()
        weights = weights.to(torch.float32).contiguous()
        t, h = x.shape
        out = torch.empty(t, h, dtype=x.dtype)
        rc = self._lib.lg_moe(t, h, inter, x.data_ptr(), _DTYPES[x.dtype], ids.shape[1], ids.data_ptr(), weights.data_ptr(), gate_up, down, len(gate_up), out.data_ptr(), torch.get_num_threads())
        if rc == -2:
            raise IndexError(f"expert id outside [0, {len(gate_up)})")
        if rc:
            raise MemoryError("native MoE kernel: out of memory")
        return out


_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernels read and write these directly


def _io(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels take it: fp32 or bf16, contiguous, on the CPU."""
    if x.dtype not in _DTYPES:
        x = x.float()
    return x if x.is_contiguous() else x.contiguous()


# Above this many rows (tokens) a dequantized fp32 GEMM (MKL) beats the integer dots, which take
# tokens four at a time (measured on 3584x1024, 2 AVX2 threads: q4 native 1.7 / 3.4 / 6.8 ms at
# 32 / 64 / 128 rows against 5.6 / 6.7 / 8.9 ms; q8 equal at 128; GEMM ahead from 256).
NATIVE_MAX_ROWS = 128


class NativeLinear:
    """A quantized linear layer through the native kernel (decode, small batches), with the weight
    dequantized to fp32 per call for big batches (prefill), where MKL's GEMM wins."""

    def __init__(self, lib: NativeLib, qt: QuantTensor) -> None:
        self.lib, self.qt = lib, qt
        self.desc = lib.describe(qt)
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (the caller's bias, its fp32 copy)

    def _fp32_bias(self, bias: torch.Tensor) -> torch.Tensor:
        if self._bias is None or self._bias[0] is not bias:
            self._bias = (bias, bias.float().contiguous())
        return self._bias[1]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        b = None if bias is None else self._fp32_bias(bias)
        if x2.shape[0] <= NATIVE_MAX_ROWS:
            y = self.lib.linear(self.desc, x2, b)
        else:
            y = torch.nn.functional.linear(x2.float(), self.lib.dequantize(self.desc), b)
        return y.to(x.dtype).view(*shape[:-1], y.shape[-1])


class NativeExpert:
    """One routed expert (gate_up [2I, H], down [H, I]) through the native kernels: the MoE kernel
    with a single expert, so an expert computed alone (an offloaded one) gets exactly the numbers it
    gets inside `NativeLib.moe`. Big batches go through each part's NativeLinear (dequantize + GEMM)."""

    def __init__(self, lib: NativeLib, gate_up: QuantTensor, down: QuantTensor) -> None:
        self.lib = lib
        self.gate_up, self.down = gate_up, down
        self.gu = lib.describe(gate_up)
        self.dn = lib.describe(down)
        self._one = ((_QTensor * 1)(self.gu), (_QTensor * 1)(self.dn))  # the MoE kernel's expert tables, E = 1
        self._route: tuple[torch.Tensor, torch.Tensor] = (torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1))

    def _routing(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row to expert 0 with weight 1 (kept: this runs per offloaded expert and token)."""
        if self._route[0].shape[0] < rows:
            self._route = (torch.zeros(rows, 1, dtype=torch.int64), torch.ones(rows, 1))
        return self._route[0][:rows], self._route[1][:rows]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H] in fp32: the caller sums experts in fp32, as the MoE kernel does inside."""
        if x.shape[0] > NATIVE_MAX_ROWS:
            gate, up = self.gate_up.matmul(x.float()).chunk(2, dim=-1)
            return self.down.matmul(torch.nn.functional.silu(gate) * up)
        ids, weights = self._routing(x.shape[0])
        return self.lib.moe(*self._one, self.down.shape[1], x.float(), ids, weights)


@functools.cache
def _load() -> tuple[NativeLib | None, str]:
    """Build and load once per process (the library is immutable once loaded); logs why not."""
    if os.environ.get("LOCALGLM_NATIVE", "1") == "0":
        return None, "torch kernels (native ones disabled by LOCALGLM_NATIVE=0)"
    cc = _compiler()
    if cc is None:
        why = "torch kernels (no C compiler found to build the native ones; set CC)"
    else:
        try:
            lib = NativeLib(build(cc))
            return lib, f"native kernels ({'AVX2' if lib.avx2 else 'portable C'})"
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            why = f"torch kernels (native ones failed to build: {e})"
    log.warning("localglm: CPU kernels: %s", why)
    return None, why


def native_lib() -> NativeLib | None:
    """The native kernels, built on first use; None when they cannot be (see native_status)."""
    return _load()[0]


def native_status() -> str:
    """One line: which CPU kernels quantized weights use, and why."""
    return _load()[1]
