"""llama.cpp's own matrix product for one quantized weight, driven through ggml's C API (ctypes on the
libraries llama-cpp-python bundles): the peer for per-type kernel figures (bench_gguf_kquant.py --kernels).

The weight is placed as llama.cpp's model loader places it on this CPU: in the CPU "repack" buffer type
for the types its CPU backend repacks into interleaved rows (ggml_repack_get_optimal_repack_type: on
AVX2 Q4_0, Q4_K and IQ4_NL with rows a multiple of 8), else a plain CPU buffer (vec_dot per row). A
call is one graph: mul_mat of the weight by one fp32 token, or several (a prompt's: `tokens`) (its activations quantized to Q8_K / Q8_0
inside, as in a model), 1 thread unless told. Quantized blocks come from ggml's own quantizer.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

# ggml type ids (ggml.h)
GGML_TYPE = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ2_XXS": 16, "IQ2_XS": 17,
             "IQ3_XXS": 18, "IQ1_S": 19, "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22, "IQ4_XS": 23, "IQ1_M": 29}  # fmt: skip
GRID_TYPES = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"}  # ggml_quantize_init builds their tables first
REPACKED_AVX2 = {"Q4_0", "Q4_K", "IQ4_NL"}  # llama.cpp ggml/src/ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class Ggml:
    """The few ggml entry points the peer needs, from llama-cpp-python's bundled libraries."""

    def __init__(self) -> None:
        import llama_cpp

        lib = Path(llama_cpp.__file__).parent / "lib"
        base, core, cpu = (ctypes.CDLL(str(lib / f"lib{n}.so"), mode=ctypes.RTLD_GLOBAL) for n in ("ggml-base", "ggml", "ggml-cpu"))
        p, i64, sz, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t, ctypes.c_int

        def fn(so: ctypes.CDLL, name: str, res: object, *args: object) -> ctypes._CFuncPtr:
            f = getattr(so, name)
            f.restype, f.argtypes = res, list(args)
            return f

        self.init = fn(base, "ggml_init", p, _InitParams)
        self.free = fn(base, "ggml_free", None, p)
        self.new_2d = fn(base, "ggml_new_tensor_2d", p, p, i, i64, i64)
        self.mul_mat = fn(base, "ggml_mul_mat", p, p, p, p)
        self.new_graph = fn(base, "ggml_new_graph", p, p)
        self.expand = fn(base, "ggml_build_forward_expand", None, p, p)
        self.get_data = fn(base, "ggml_get_data", p, p)
        self.quantize_chunk = fn(base, "ggml_quantize_chunk", sz, i, p, p, i64, i64, i64, p)
        self.quantize_init = fn(base, "ggml_quantize_init", None, i)
        self.row_size = fn(base, "ggml_row_size", sz, i, i64)
        self.tensor_set = fn(base, "ggml_backend_tensor_set", None, p, p, sz, sz)
        self.buffer_free = fn(base, "ggml_backend_buffer_free", None, p)
        self.graph_compute = fn(base, "ggml_backend_graph_compute", i, p, p)
        self.backend_free = fn(base, "ggml_backend_free", None, p)
        self.alloc_tensors = fn(core, "ggml_backend_alloc_ctx_tensors_from_buft", p, p, p)
        self.cpu_init = fn(cpu, "ggml_backend_cpu_init", p)
        self.set_threads = fn(cpu, "ggml_backend_cpu_set_n_threads", None, p, i)
        self.cpu_buffer_type = fn(cpu, "ggml_backend_cpu_buffer_type", p)
        self.repack_buffer_type = fn(cpu, "_Z35ggml_backend_cpu_repack_buffer_typev", p)  # C++ linkage in ggml-cpu
        fn(cpu, "ggml_cpu_init", None)()

    def quantize(self, kind: str, w: np.ndarray) -> np.ndarray:
        """fp32 [n, k] -> ggml's blocks of `kind` (its own quantizer). The i-quants get an importance matrix of
        ones (every column alike): llama.cpp requires one below 3 bits (llama-quantize refuses IQ1/IQ2 without)."""
        n, k = w.shape
        w = np.ascontiguousarray(w, dtype=np.float32)
        out = np.empty(n * self.row_size(GGML_TYPE[kind], k), np.uint8)
        imatrix = np.ones(k, np.float32) if kind in GRID_TYPES else None
        if imatrix is not None:
            self.quantize_init(GGML_TYPE[kind])
        written = self.quantize_chunk(GGML_TYPE[kind], w.ctypes.data, out.ctypes.data, 0, n, k, None if imatrix is None else imatrix.ctypes.data)
        if written != out.nbytes:
            raise RuntimeError(f"ggml_quantize_chunk({kind}) wrote {written} bytes, expected {out.nbytes}")
        return out


class MulMat:
    """`copies` weights [n, k] holding the blocks `q`, each multiplied by one token in its own graph."""

    def __init__(self, g: Ggml, kind: str, q: np.ndarray, n: int, k: int, copies: int, threads: int = 1, tokens: int = 1) -> None:
        self.g = g
        self.backend = g.cpu_init()
        g.set_threads(self.backend, threads)
        self.ctx = g.init(_InitParams((16 << 20) + 8 * tokens * (n + k) * copies, None, False))
        self.wctx = g.init(_InitParams(1 << 20, None, True))
        self.x = g.new_2d(self.ctx, 0, k, tokens)  # GGML_TYPE_F32, `tokens` rows
        ws = [g.new_2d(self.wctx, GGML_TYPE[kind], k, n) for _ in range(copies)]
        self.repacked = kind in REPACKED_AVX2 and n % 8 == 0
        self.buffer = g.alloc_tensors(self.wctx, g.repack_buffer_type() if self.repacked else g.cpu_buffer_type())
        for w in ws:
            g.tensor_set(w, q.ctypes.data, 0, q.nbytes)  # the repack buffer interleaves rows here
        self.out = [g.mul_mat(self.ctx, w, self.x) for w in ws]
        self.graphs = []
        for node in self.out:
            self.graphs.append(g.new_graph(self.ctx))
            g.expand(self.graphs[-1], node)
        self.n, self.tokens = n, tokens

    def set_x(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        ctypes.memmove(self.g.get_data(self.x), x.ctypes.data, x.nbytes)

    def run(self, c: int) -> None:
        self.g.graph_compute(self.backend, self.graphs[c])

    def result(self, c: int) -> np.ndarray:
        return np.ctypeslib.as_array(ctypes.cast(self.g.get_data(self.out[c]), ctypes.POINTER(ctypes.c_float)), (self.tokens, self.n)).copy()

    def close(self) -> None:
        self.g.backend_free(self.backend)
        self.g.buffer_free(self.buffer)
        self.g.free(self.wctx)
        self.g.free(self.ctx)
