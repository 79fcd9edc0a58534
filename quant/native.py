"""The native CPU kernels for quantized weights: built with the machine's C compiler at first use,
cached, and called through ctypes.

Why built here and not shipped: `-march=native` picks the user's vector units (AVX2, F16C...), and
a plain C file needs no torch headers (compiles in about a second). Without a C compiler, or with
LOCALGLM_NATIVE=0, `native_lib()` returns None and quant/cpu_kernels.py keeps torch's kernels; the
reason is in `native_status()` (shown in `generate --stats-json` under `backend.kernels`).

The C files, and why two libraries:

    quant/native/qkernels.c                 formats and kernels: activation quantization, q2/q4/q8 dot
                                            products, lg_linear, lg_moe, lg_dequant*, any lg_mat (dense,
                                            quantized, GGUF blocks, stacks: lg_matvec, lg_mat_rows,
                                            lg_swiglu_vec, lg_dense_expert)
    quant/native/kquants.c                  GGUF blocks as stored (quant/kquants.py): kq_matmul_q8 ...
    quant/native/lg_kernels.h               their interface: the structs (lg_qtensor, lg_mat, qact),
                                            the inline conversions both libraries use, the entry points
    localglm/layers/native/layer_ops.c      per-token layer ops: RMSNorm, RoPE, decode attention, router
    localglm/models/native/decode_layer.c   the fused GLM MoE decoder layer

quant knows formats and kernels, nothing of models, so this module builds the first library from
quant's files alone (`build`). The model side's two files form a second library, linked against
this one and loaded by localglm/layers/native.py, which reuses `build` to compile it.

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
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .formats import QuantTensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "qkernels.c"
KQ_SOURCE = SOURCE.with_name("kquants.c")  # GGUF blocks as stored (quant/kquants.py): in the same library, lg_matvec calls them
AMX_SOURCE = SOURCE.with_name("amx.c")  # bf16 products on AMX tiles where the CPU and kernel allow (lg_set_amx)
HEADER = SOURCE.with_name("lg_kernels.h")  # what the model side's library includes to call these kernels
IQ_GRIDS = SOURCE.with_name("iq_grids.h")  # kquants.c's i-quant tables (quant/iq_tables.py)
# -ffp-contract=off: a product and a sum stay two roundings (no fused multiply-add the C source does
# not ask for), as in torch's elementwise ops: experts summed here equal experts summed by torch.
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11", "-fno-math-errno", "-ffp-contract=off")
BLOCK = 32  # activation block of the kernels: K of every native tensor is a multiple of it


class _QTensor(ctypes.Structure):
    """A quantized weight as the kernels read it (lg_kernels.h `lg_qtensor`): pointers into a QuantTensor's buffer."""

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
    """A weight matrix (lg_kernels.h `lg_mat`): quantized (kind 0), dense bf16 (1) / fp32 (2), GGUF
    blocks as stored (3, `sub` the kquants.c type), or a stack of parts along the rows (4, `sub` parts
    at `w`)."""

    _fields_ = [
        ("kind", ctypes.c_int32),
        ("n", ctypes.c_int32),
        ("k", ctypes.c_int32),
        ("sub", ctypes.c_int32),
        ("w", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("q", _QTensor),
    ]


MAT_Q, MAT_BF16, MAT_F32, MAT_GGML, MAT_STACK = range(5)  # LgMat.kind (lg_kernels.h LG_MAT_*)


_STRUCTS = (("lg_qtensor", _QTensor), ("lg_mat", LgMat))  # in lg_quant_sizeof's order


class StructLayoutError(Exception):
    """A ctypes struct whose size is not its C struct's: the two went out of step. A programming
    error, not a build problem, so it is raised rather than falling back to torch's kernels."""


def check_struct_sizes(lib: ctypes.CDLL, symbol: str, structs: tuple[tuple[str, type[ctypes.Structure]], ...]) -> None:
    """Compare the library's `symbol(i)` (sizeof of the i-th C struct it shares with ctypes, 0 past
    the last) with ctypes.sizeof of structs[i] = (C name, ctypes class); raise StructLayoutError
    naming the first that differs."""
    sizeof = getattr(lib, symbol)
    sizeof.argtypes, sizeof.restype = [ctypes.c_int], ctypes.c_size_t
    for i, (c_name, struct) in enumerate(structs):
        if sizeof(i) != ctypes.sizeof(struct):
            raise StructLayoutError(f"ctypes {struct.__name__} is {ctypes.sizeof(struct)} bytes, C {c_name} {sizeof(i)} ({symbol}): "
                                    "the ctypes mirror and the C struct went out of step")
    if sizeof(len(structs)):
        raise StructLayoutError(f"{symbol} answers for more structs than {', '.join(s.__name__ for _, s in structs)}: a ctypes mirror is missing")


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


def build(cc: str, flags: tuple[str, ...] = CFLAGS, directory: Path | None = None, *, name: str = "qkernels",
          sources: tuple[Path, ...] = (SOURCE, KQ_SOURCE, AMX_SOURCE), depends: tuple[Path, ...] = (HEADER, IQ_GRIDS), extra: tuple[str, ...] = ()) -> Path:
    """Compile `sources` (default: quant's kernels) into `directory` (default: the user cache) as
    `name`-KEY.so, KEY a hash of the sources, `depends` (headers, a library linked against), the
    compiler, flags, `extra` (include dirs, link arguments: after the sources) and CPU, so each
    combination is built once. The library's SONAME is its file name: a library linked against it
    records exactly this build. Returns the library's path."""
    src = b"".join(p.read_bytes() for p in (*sources, *depends))
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(src + repr((version, flags, extra, sys.platform, _cpu_identity())).encode()).hexdigest()[:16]
    out = (directory or cache_dir()) / f"{name}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, *flags, f"-Wl,-soname,{out.name}", "-o", tmp, *map(str, sources), *extra, "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            lines = res.stderr.strip().splitlines()
            raise RuntimeError(f"{cc} failed: {next((ln for ln in lines if 'error' in ln), lines[-1]) if lines else res.returncode}")
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
        check_struct_sizes(self._lib, "lg_quant_sizeof", _STRUCTS)
        p, i = ctypes.c_void_p, ctypes.c_int
        self._lib.lg_linear.argtypes = [ctypes.POINTER(_QTensor), i, p, i, p, p, i, i]
        self._lib.lg_linear.restype = i
        self._lib.lg_moe.argtypes = [i, i, i, p, i, i, p, p, ctypes.POINTER(_QTensor), ctypes.POINTER(_QTensor), i, p, i]
        self._lib.lg_moe.restype = i
        self._lib.lg_dense_expert.argtypes = [ctypes.POINTER(LgMat), ctypes.POINTER(LgMat), i, p, i, p, i]
        self._lib.lg_dense_expert.restype = i
        self._lib.lg_dequant.argtypes = [ctypes.POINTER(_QTensor), p, i]
        self._lib.lg_dequant.restype = None
        self._lib.lg_dequant_rows.argtypes = [ctypes.POINTER(_QTensor), p, i, p]
        self._lib.lg_dequant_rows.restype = None
        self._lib.lg_dequant_bf16.argtypes = [ctypes.POINTER(_QTensor), i, i, p, i]
        self._lib.lg_dequant_bf16.restype = None
        self.avx2 = bool(self._lib.lg_has_avx2())
        self._lib.lg_set_amx.argtypes, self._lib.lg_set_amx.restype = [i], i
        self.amx = self.set_amx(os.environ.get("LOCALGLM_AMX", "1") != "0")
        self._lib.lg_set_interleaved_rows.argtypes, self._lib.lg_set_interleaved_rows.restype = [i], i
        self.interleaved_rows = self.set_interleaved_rows(None)

    def set_interleaved_rows(self, on: bool | None) -> bool:
        """A decoded token's dense (bf16 / fp32) rows several at a time, interleaved, or one after another
        (None: the CPU's default, one after another on AMD: qkernels.c). The same numbers either way;
        process-wide, as set_amx. Returns the setting."""
        self.interleaved_rows = bool(self._lib.lg_set_interleaved_rows(-1 if on is None else int(on)))
        return self.interleaved_rows

    def set_amx(self, on: bool) -> bool:
        """Run bf16 products on AMX tiles (amx.c) where the CPU and the OS allow, or not (LOCALGLM_AMX=0 at
        start-up). Process-wide, as a thread count is; returns whether the tiles are now used."""
        self.amx = bool(self._lib.lg_set_amx(int(on)))
        return self.amx

    @staticmethod
    def supports(qt: QuantTensor) -> bool:
        """Whether the kernels take this tensor (CPU, a live buffer, K a multiple of the block)."""
        if qt.spec.raw_blocks:  # GGUF blocks held as stored: their own kernels (quant/kquants.py)
            return False
        return qt.device.type == "cpu" and qt.buf.numel() > 0 and qt.shape[1] % BLOCK == 0 and qt.spec.group % BLOCK == 0 and qt.spec.group > 0

    @staticmethod
    def describe(qt: QuantTensor) -> _QTensor:
        """The C view of a QuantTensor (pointers into its buffer: keep qt alive while it is used). Its
        sections' addresses are kept on qt (plain ints, for its buffer's address: a copy or a new buffer
        finds them again): a decoded token's embedding row asks for the view every step, and finding the
        sections was 12 of its 37 us."""
        address = qt.buf.data_ptr()
        kept = qt.__dict__.get("_section_addresses")
        if kept is None or kept[0] != address:
            if qt.spec.bits == 8:
                gs, gm = qt.section("gscale").data_ptr(), None
            else:
                gs, gm = qt.section("scode").data_ptr(), qt.section("mcode").data_ptr()
            kept = (address, qt.section("rowf").data_ptr(), qt.section("data").data_ptr(), gs, gm)
            qt.__dict__["_section_addresses"] = kept
        n, k = qt.shape
        return _QTensor(*kept[1:], qt.spec.bits, qt.spec.group, n, k)

    def linear(self, desc: _QTensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, K] (fp32 or bf16; others computed in fp32) -> x @ W.T (+ fp32 bias) [T, N], x's dtype."""
        x = _io(x)
        y = torch.empty(x.shape[0], desc.n, dtype=x.dtype)
        code = DTYPES[x.dtype]
        rc = self._lib.lg_linear(ctypes.byref(desc), x.shape[0], x.data_ptr(), code, None if bias is None else bias.data_ptr(), y.data_ptr(), code, torch.get_num_threads())
        if rc:
            raise MemoryError("native linear kernel: out of memory")
        return y

    @classmethod
    def describe_matrix(cls, w: torch.Tensor | QuantTensor, dtype: torch.dtype, bias: torch.Tensor | None = None) -> LgMat | None:
        """The C view of a weight, quantized or dense, for lg_dense_expert and the model side's fused
        decode (kept alive by the caller, with the bias, which must be fp32), or None when the
        kernels do not take it: a dense weight of another dtype or layout, a quantized one they do
        not support."""
        from .stack import QuantStack

        b = None if bias is None else bias.data_ptr()
        if isinstance(w, QuantStack):
            return cls._describe_stack(w, dtype, bias)
        if isinstance(w, QuantTensor):
            if w.spec.raw_blocks:  # GGUF blocks as stored: their spec (quant.kquants.GGMLSpec) gives the view
                return w.spec.lg_mat(w, b)  # type: ignore[attr-defined]
            if not cls.supports(w):
                return None
            return LgMat(MAT_Q, w.shape[0], w.shape[1], 0, None, b, cls.describe(w))
        if (not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype != dtype or dtype not in DTYPES
                or not w.is_contiguous() or w.device.type != "cpu"):
            return None
        return LgMat(MAT_F32 if dtype == torch.float32 else MAT_BF16, w.shape[0], w.shape[1], 0, w.data_ptr(), b)

    @classmethod
    def _describe_stack(cls, st: object, dtype: torch.dtype, bias: torch.Tensor | None) -> LgMat | None:
        """A QuantStack (kind 4) of quantized or GGUF parts, each part with its rows of the bias; None
        where a part is dense (its torch GEMM's sums are not lg_matvec's) or not taken. The parts'
        array is kept alive by the returned LgMat (ctypes keeps what a pointer field was given)."""
        parts, row = [], 0
        for p in st.parts:  # type: ignore[attr-defined]
            pb = None if bias is None else bias[row : row + p.shape[0]]
            m = cls.describe_matrix(p, dtype, pb) if isinstance(p, QuantTensor) else None
            if m is None:
                return None
            parts.append(m)
            row += p.shape[0]
        table = (LgMat * len(parts))(*parts)
        mat = LgMat(MAT_STACK, int(st.shape[0]), int(st.shape[1]), len(parts), ctypes.addressof(table), None)  # type: ignore[attr-defined]
        mat._parts = table  # type: ignore[attr-defined]  # the C view points into it
        return mat

    def dense_expert(self, gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """One dense expert on x [T, H]: down(silu(gate(x)) * up(x)) in x's dtype, rounded as the torch
        ops round; None where the kernel does not take these tensors."""
        gu, dn = self.describe_matrix(gate_up, x.dtype), self.describe_matrix(down, x.dtype)
        if gu is None or dn is None or x.dim() != 2 or not x.is_contiguous() or x.device.type != "cpu":
            return None
        return self.expert(gu, dn, x)

    def expert(self, gate_up: LgMat, down: LgMat, x: torch.Tensor) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)) of described weights on x [T, H] (fp32 or bf16, contiguous, CPU), in
        x's dtype, rounded to it where the torch ops round (lg_dense_expert)."""
        y = torch.empty(x.shape[0], down.n, dtype=x.dtype)
        if self._lib.lg_dense_expert(ctypes.byref(gate_up), ctypes.byref(down), x.shape[0], x.data_ptr(), DTYPES[x.dtype], y.data_ptr(), torch.get_num_threads()):
            raise MemoryError("native expert: out of memory")
        return y

    def dequantize(self, desc: _QTensor) -> torch.Tensor:
        """The whole weight as fp32 [N, K] (for big batches, multiplied by a float GEMM)."""
        out = torch.empty(desc.n, desc.k, dtype=torch.float32)
        self._lib.lg_dequant(ctypes.byref(desc), out.data_ptr(), torch.get_num_threads())
        return out

    def dequantize_bf16(self, desc: _QTensor, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [n0, n1) of the weight as bf16 into out (bf16, contiguous, at least (n1 - n0) * K values):
        dequantize's floats rounded to nearest even, as .to(torch.bfloat16) rounds them."""
        self._lib.lg_dequant_bf16(ctypes.byref(desc), n0, n1, out.data_ptr(), torch.get_num_threads())
        return out[: (n1 - n0) * desc.k].view(n1 - n0, desc.k)

    def dequantize_rows(self, qt: QuantTensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` of qt as fp32 [len(rows), K], dequantized where they lie (an embedding lookup)."""
        rows = rows.to(torch.int64).contiguous()
        ids = rows.tolist() if rows.numel() <= 64 else [int(rows.min()), int(rows.max())]  # a few ids: no torch reductions
        if ids and not (0 <= min(ids) and max(ids) < qt.shape[0]):
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
        rc = self._lib.lg_moe(t, h, inter, x.data_ptr(), DTYPES[x.dtype], ids.shape[1], ids.data_ptr(), weights.data_ptr(), gate_up, down, len(gate_up), out.data_ptr(), torch.get_num_threads())
        if rc == -2:
            raise IndexError(f"expert id outside [0, {len(gate_up)})")
        if rc:
            raise MemoryError("native MoE kernel: out of memory")
        return out


DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernels read and write these directly (lg_kernels.h's dtype codes)


def _io(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels take it: fp32 or bf16, contiguous, on the CPU."""
    if x.dtype not in DTYPES:
        x = x.float()
    return x if x.is_contiguous() else x.contiguous()


# Above this many rows (tokens) a dequantized fp32 GEMM (MKL) beats the integer dots, which take
# tokens four at a time (measured on 3584x1024, 2 AVX2 threads: q4 native 1.7 / 3.4 / 6.8 ms at
# 32 / 64 / 128 rows against 5.6 / 6.7 / 8.9 ms; q8 equal at 128; GEMM ahead from 256).
NATIVE_MAX_ROWS = 128

# On CPUs with a native bf16 GEMM (AVX512-BF16, AMX: torch's oneDNN reaches ~100 G multiply-adds/s a
# core on Zen 4 against 30-50 for the int8 tiles), bf16 activations of at least this many rows (a prompt
# chunk) go through it instead: the weight dequantized to bf16 a tile of rows at a time (the tile
# stays in cache; no dense copy of the weight), each tile multiplied by torch. Zen 4, 1 thread,
# G multiply-adds/s, int8 tiles / this route (its dequantization included), 4096 x 4096: q8 40 / 41 at
# 16 rows, 43 / 59 at 32, 35 / 83 at 128; q4 39 / 35, 43 / 54, 46 / 86; q2 39 / 27, 33 / 51, 38 / 78 (even
# at about 24 rows). llama.cpp takes its K-quants in prompts the same way (its tiled bf16 mul_mat).
# With the AVX-512 tile dequantization (2026-12-05, a Xeon with AMX, same units) the route is ahead from
# ~16-20 rows: q4 51 / 64 at 24 rows, q2 1408 x 4096 51 / 60, q8 49 / 60. It must stay above a speculative
# verification's rows (localglm.options.MAX_DRAFT + 1): those keep the one-token steps' int8 arithmetic.
BF16_GEMM_ROWS = 24
# A tile is BF16_TILE_BYTES of bf16 weight rows, at least BF16_TILE_ROWS rows: each tile is a Python
# round (dequantize, GEMM, copy out) and a GEMM too small to split well across threads. AMX Xeon,
# 128-token prompts, q2-all, tok/s at 256-row tiles -> 8 MiB: ~0.9B (K = 1024) 206 -> 225 on 1 thread,
# 308 -> 362 on 2; Air widths (K = 4096) 78 -> 82 and 127 -> 150 (16 MiB: 76 and 145).
BF16_TILE_ROWS = 256
BF16_TILE_BYTES = 8 << 20
BF16_ROW_BUCKET = 16  # bf16_tiled_linear's rows rounded up to a multiple of this (the GEMM's shapes repeat)


def bf16_gemm_rows() -> int | None:
    """The row count from which bf16 prompts take the dequantize-to-bf16 GEMM, or None on CPUs whose
    bf16 GEMM is slow (no AVX512-BF16 / AMX: quant.cpu_kernels.cpu_bf16_gemm_is_slow)."""
    from .cpu_kernels import cpu_bf16_gemm_is_slow

    return None if cpu_bf16_gemm_is_slow() else BF16_GEMM_ROWS


def bf16_gemm_takes(dtype: torch.dtype, rows: int) -> bool:
    """Whether `rows` activations of `dtype` (a prompt chunk, an expert's tokens) go through the bf16 GEMM:
    bf16, on a CPU that has it, bf16_gemm_rows() rows or more."""
    least = bf16_gemm_rows() if dtype == torch.bfloat16 else None
    return least is not None and rows >= least


def bf16_expert_takes(dtype: torch.dtype, rows: int) -> bool:
    """Whether an expert's `rows` tokens (bf16) go through the bf16 GEMM: from a third more rows than one
    product needs, since an expert is two products, SiLU and a Python round where the MoE kernel takes
    all of a layer's other experts in one call. Whole experts on the AMX Xeon, 1 thread, int8 / bf16 time:
    0.72-0.94 at 24 rows, 0.84-1.17 at 32, 1.27-1.51 at 48 (1024 x 352 and 4096 x 1408, q2 / q4 / q8)."""
    least = bf16_gemm_rows() if dtype == torch.bfloat16 else None
    return least is not None and rows >= -(-least * 4 // 3)


def bf16_tiled_linear(x: torch.Tensor, n: int, k: int, dequant_tile: Callable[[int, int, torch.Tensor], torch.Tensor],
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] bf16 @ W.T (+ bias) -> [T, N] bf16, W given a tile of rows at a time by dequant_tile(n0,
    n1, buffer) as bf16 [n1 - n0, K] (written into the reused buffer): torch's bf16 GEMM per tile. The
    rows are padded with zeros to a multiple of BF16_ROW_BUCKET: oneDNN JIT-compiles a kernel for each new
    GEMM shape, 1-4 ms each (AMX Xeon) against 0.05-0.4 ms for a tile's product, and an expert's token
    count is a new shape at almost every call of a first prompt; up to 15 more rows cost 5-15% of a product."""
    t = x.shape[0]
    if t % BF16_ROW_BUCKET:
        x = torch.cat([x, x.new_zeros(BF16_ROW_BUCKET - t % BF16_ROW_BUCKET, x.shape[1])])
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    rows = max(1, min(n, max(BF16_TILE_ROWS, BF16_TILE_BYTES // (2 * max(1, k)))))
    buf = torch.empty(rows * k, dtype=torch.bfloat16)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w = dequant_tile(n0, n1, buf)
        y[:, n0:n1] = F.linear(x, w, None if bias is None else bias[n0:n1].to(torch.bfloat16))
    return y[:t]


def bf16_expert(gate_up: Callable[[torch.Tensor], torch.Tensor], down: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) in fp32 for bf16 rows that take the bf16 GEMM (bf16_expert_takes): both
    products through it, SiLU in fp32, its input to down rounded to bf16. One expert's prompt tokens, for
    our formats (NativeExpert) and GGUF blocks (quant.blob.PreparedExpert) alike."""
    gate, up = gate_up(x).float().chunk(2, dim=-1)
    return down((torch.nn.functional.silu(gate) * up).to(torch.bfloat16)).float()


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
        if bf16_gemm_takes(x2.dtype, x2.shape[0]):
            n, k = self.desc.n, self.desc.k
            y = bf16_tiled_linear(x2.contiguous(), n, k, lambda n0, n1, buf: self.lib.dequantize_bf16(self.desc, n0, n1, buf), bias)
        elif x2.shape[0] <= NATIVE_MAX_ROWS:
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

    @staticmethod
    def in_moe_kernel(rows: int, dtype: torch.dtype) -> bool:
        """Whether `rows` activations of `dtype` run through the MoE kernel (not the bf16 GEMM, not a
        dequantized GEMM): then several experts' rows may share one `NativeLib.moe` call, same numbers."""
        return rows <= NATIVE_MAX_ROWS and not bf16_expert_takes(dtype, rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H] in fp32: the caller sums experts in fp32, as the MoE kernel does inside. bf16
        rows from bf16_expert_takes on (a prompt's tokens that chose this expert) go through the bf16 GEMM."""
        if bf16_expert_takes(x.dtype, x.shape[0]):
            return bf16_expert(self.gate_up.matmul, self.down.matmul, x)
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
            units = ("AVX2" if lib.avx2 else "portable C") + (", AMX bf16 tiles" if lib.amx else "")
            return lib, f"native kernels ({units})"
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
