/* The C interface of quant's kernels (qkernels.c, kquants.c), shared with the model side's library.
 *
 * Two shared libraries are built at first use: quant's (qkernels.c and kquants.c: formats and kernels,
 * nothing of models; quant/native.py) and the model side's (localglm/layers/native/layer_ops.c and
 * localglm/models/native/decode_layer.c: per-token layer ops and the decoder layer, linked against
 * quant's; localglm/layers/native.py). This header is what the second includes to call the first:
 * the structs both read, the small conversions both inline, and the quant entry points the decoder
 * layer calls. Both are compiled with the same flags, so an inline helper gives the same numbers in
 * either library.
 *
 * The structs are mirrored by ctypes (quant/native.py: _QTensor, LgMat); lg_quant_sizeof lets the
 * loader check that the two agree.
 */
#ifndef LG_KERNELS_H
#define LG_KERNELS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define QB 32 /* activation / code block */

/* The parallel loops' work split: schedule(dynamic, lg_chunk(items, nth)), chunks of about
 * 1/(8 nth) of the items claimed as threads come free. With schedule(static) each thread owned a
 * fixed 1/nth, so on a busy machine the thread sharing its core with another process held every
 * other thread at the loop's end; now the threads that run take its chunks. Every item's result
 * is computed by one thread alone, whichever it is, so results do not depend on the split. */
static inline int lg_chunk(long items, int nth) {
    const long c = items / (8L * (nth > 1 ? nth : 1));
    return c < 1 ? 1 : c > (1L << 30) ? (1 << 30) : (int)c;
}

/* A quantized weight [n, k] (layouts: qkernels.c's header comment). */
typedef struct {
    const float *rowf;
    const uint8_t *data;
    const uint8_t *gs; /* q2/q4: scale codes; q8: fp16 group scales */
    const int8_t *gm;  /* q2/q4: offset codes; q8: unused */
    int32_t bits, group, n, k;
} lg_qtensor;

/* A weight matrix of the fused decode: quantized, dense bf16 / fp32 read as stored, a GGUF tensor's
 * blocks as stored (kquants.c's types), or a stack of such parts along the rows (a GGUF mix stores
 * q / k / v, or gate / up, in different types: quant/stack.py's QuantStack). */
enum { LG_MAT_Q = 0, LG_MAT_BF16 = 1, LG_MAT_F32 = 2, LG_MAT_GGML = 3, LG_MAT_STACK = 4 };
typedef struct lg_mat {
    int32_t kind; /* LG_MAT_* */
    int32_t n, k;
    int32_t sub;       /* LG_MAT_GGML: kquants.c's enum kq_type; LG_MAT_STACK: the number of parts */
    const void *w;     /* dense: [n, k] row-major; GGML: the blocks, row-major; STACK: const lg_mat[sub], rows in order */
    const float *bias; /* fp32 [n] or NULL (a stack's parts carry their own rows of it) */
    lg_qtensor q;
} lg_mat;

/* Rows of activations quantized to int8 blocks (lg_qact_alloc): codes q, block scales d, block sums s. */
typedef struct {
    int8_t *q;
    float *d, *s;
} qact;

/* Activations and results are fp32 (dtype 0) or bf16 (dtype 1, converted here as torch does:
 * round to nearest even), so the caller needs no conversion ops around a call. */
static inline float bf16_to_float(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float load_val(const void *p, int dtype, size_t i) {
    return dtype == 1 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* The dense (bf16 / fp32) weight kernels ask for the line DENSE_PREFETCH_BYTES past the one they load, as the
 * quantized rows do with PREFETCH_AHEAD (but dense_tile_bh: on one row at a time, a single stream the
 * hardware prefetcher follows alone, it was no faster): the kernels read the rows in order, and where the weights
 * come from L3 or RAM the samples sat on the instructions right after the loads. Zen 4, one process, a
 * runtime switch, runs in random order over 10 rounds, against no prefetch: a decoded token's six
 * layers and lm_head / a 3-token verification, AVX-512 bf16 tiles 0.85x / 0.73x the time, fp32 rows
 * 1.03x / 0.89x, an AVX2 build 0.67x / 0.93x (2 KB and 8 KB ahead gave the same within the noise). A
 * prefetch is a hint: the numbers are unchanged, and it never faults past the end. */
#define DENSE_PREFETCH_BYTES 4096
#define PREFETCH_DENSE(p) _mm_prefetch((const char *)(p) + DENSE_PREFETCH_BYTES, _MM_HINT_T0)

#ifdef __AVX2__
/* Eight floats to bf16 at o, rounded to nearest even as float_to_bf16 (finite values: weights). */
static inline void store_bf16x8(uint16_t *o, __m256 f) {
    const __m256i u = _mm256_castps_si256(f);
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))), 16);
    _mm_storeu_si128((__m128i *)o, _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08)));
}
#endif

#if defined(__AVX512F__)
/* store_bf16x8 sixteen at a time: the same integer rounding (not vcvtneps2bf16, which flushes denormals). */
static inline void store_bf16x16(uint16_t *o, __m512 f) {
    const __m512i u = _mm512_castps_si512(f);
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))), 16);
    _mm256_storeu_si256((__m256i *)o, _mm512_cvtepi32_epi16(r));
}

/* 32 floats (lo, then hi) to bf16, rounded to nearest even. With AVX512-BF16, one vcvtne2ps2bf16, which
 * also flushes denormals to zero: weights below 1.2e-38 in magnitude, none in a real checkpoint. */
static inline void store_bf16x32(uint16_t *o, __m512 lo, __m512 hi) {
#if defined(__AVX512BF16__)
    _mm512_storeu_si512((void *)o, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
#else
    store_bf16x16(o, lo);
    store_bf16x16(o + 16, hi);
#endif
}
#endif

/* k floats of finite weights to bf16 (round to nearest even). */
static inline void row_to_bf16(const float *x, int k, uint16_t *o) {
    int i = 0;
#if defined(__AVX512F__)
    for (; i + 32 <= k; i += 32) store_bf16x32(o + i, _mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i + 16));
#endif
#ifdef __AVX2__
    for (; i + 8 <= k; i += 8) store_bf16x8(o + i, _mm256_loadu_ps(x + i));
#endif
    for (; i < k; i++) o[i] = float_to_bf16(x[i]);
}

static inline void load_row(const void *src, int dtype, size_t offset, int k, float *dst) {
    if (dtype == 1) {
        const uint16_t *h = (const uint16_t *)src + offset;
        int i = 0;
#ifdef __AVX2__
        for (; i + 8 <= k; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + i))), 16)));
#endif
        for (; i < k; i++) dst[i] = bf16_to_float(h[i]);
    } else {
        memcpy(dst, (const float *)src + offset, (size_t)k * sizeof(float));
    }
}

static inline void store(void *dst, int dtype, size_t i, float v) {
    if (dtype == 1) ((uint16_t *)dst)[i] = float_to_bf16(v);
    else ((float *)dst)[i] = v;
}

/* v rounded to the dtype: float rows that hold model-dtype values round where torch's ops round. */
static inline float rnd(float v, int dtype) { return dtype == 1 ? bf16_to_float(float_to_bf16(v)) : v; }

#ifdef __AVX2__
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* a . b over n floats (two vector accumulators, then the tail). */
static inline float dotf(const float *a, const float *b, int n) {
    float s = 0.0f;
    int i = 0;
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
    }
    s = hsum256(_mm256_add_ps(a0, a1));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

#if defined(__AVX512F__)
/* The dense (bf16 / fp32) product of R weight rows x nt tokens with AVX-512's 32 registers, for
 * lg_matvec's one-token rows and lg_mat_rows' multi-token tiles (qkernels.c): one zmm
 * accumulator per (row, token) whose lane j sums the values 16 b + j in order -- lanes 0-7 are
 * dotf's / dot_dense's a0, lanes 8-15 its a1 -- so the dot is hsum256(low half + high half), then the
 * tail in order: dot_dense's numbers bit for bit, whatever R, nt or the tile a row sits in. Up to 8
 * rows x 1 token or 4 x 2-4 keep 8-16 independent FMA chains, and one widened weight vector serves
 * every token. s[t * TILE16_ROWS + r] = row n + r of m . token t (x: nt rows K apart); R and nt
 * compile-time constants where inlined. */
#define TILE16_ROWS 8
#define TILE16_TOKENS 4
static inline __attribute__((always_inline)) void dense_tile16(const lg_mat *m, int n, const int R, const float *x, const int nt, float *s) {
    const int K = m->k, K16 = K & ~15;
    __m512 acc[TILE16_ROWS][TILE16_TOKENS];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < nt; t++) acc[r][t] = _mm512_setzero_ps();
    for (int i = 0; i < K16; i += 16) {
        __m512 xv[TILE16_TOKENS];
        for (int t = 0; t < nt; t++) xv[t] = _mm512_loadu_ps(x + (size_t)t * K + i);
        for (int r = 0; r < R; r++) {
            __m512 w;
            if (m->kind == 1) {
                const uint16_t *row = (const uint16_t *)m->w + (size_t)(n + r) * K + i;
                w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)row)), 16));
                PREFETCH_DENSE(row);
            } else {
                const float *row = (const float *)m->w + (size_t)(n + r) * K + i;
                w = _mm512_loadu_ps(row);
                PREFETCH_DENSE(row);
            }
            for (int t = 0; t < nt; t++) acc[r][t] = _mm512_fmadd_ps(w, xv[t], acc[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < nt; t++) {
            const __m512 a = acc[r][t];
            s[t * TILE16_ROWS + r] = hsum256(_mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1))));
        }
    if (K16 < K)
        for (int r = 0; r < R; r++)
            for (int t = 0; t < nt; t++) {
                const size_t row = (size_t)(n + r) * K;
                for (int j = K16; j < K; j++)
                    s[t * TILE16_ROWS + r] += (m->kind == 1 ? bf16_to_float(((const uint16_t *)m->w)[row + j]) : ((const float *)m->w)[row + j]) * x[(size_t)t * K + j];
            }
}
#endif

#if defined(__AVX512BF16__)
/* bf16 weight rows x bf16 activations with AVX512-BF16's vdpbf16ps, where the model computes in bf16
 * (its activations are bf16 values, as torch's are): 32 exact products an instruction, no widening
 * of the weights, half dense_tile16's FMA work. At 3-5 tokens (a speculative verification) the fp32
 * tile is bound by the FMA port, not by reading the weights; this one is not. The same order for
 * every R, nt and tile: lane j of a (row, token) accumulator sums the pairs 32 b + 2j + 1, 32 b + 2j
 * in turn (the instruction's order, denormals flushed), then hsum256(low half + high half), then the
 * tail in order -- so a token's numbers do not depend on how many tokens or rows share its tile.
 * xb: nt rows of K bf16 values, K apart (rows_to_bf16). */
#define LG_DPBF16 1
static inline __attribute__((always_inline)) void dense_tile_bh(const lg_mat *m, int n, const int R, const uint16_t *xb, const int nt, float *s) {
    const int K = m->k, K32 = K & ~31;
    const uint16_t *W = (const uint16_t *)m->w + (size_t)n * K;
    __m512 acc[TILE16_ROWS][TILE16_TOKENS];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < nt; t++) acc[r][t] = _mm512_setzero_ps();
    for (int i = 0; i < K32; i += 32) {
        __m512bh xv[TILE16_TOKENS];
        for (int t = 0; t < nt; t++) xv[t] = (__m512bh)_mm512_loadu_si512((const void *)(xb + (size_t)t * K + i));
        for (int r = 0; r < R; r++) {
            const __m512bh w = (__m512bh)_mm512_loadu_si512((const void *)(W + (size_t)r * K + i));
            for (int t = 0; t < nt; t++) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], w, xv[t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < nt; t++) {
            const __m512 a = acc[r][t];
            float v = hsum256(_mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1))));
            for (int j = K32; j < K; j++) v += bf16_to_float(W[(size_t)r * K + j]) * bf16_to_float(xb[(size_t)t * K + j]);
            s[t * TILE16_ROWS + r] = v;
        }
}

/* Sixteen accumulators' horizontal sums at once, each bit for bit dense_tile_bh's (and dense_tile16's): lane i of
 * the result is (((a_j + a_j+8) then + 4 lanes on) then + 2) then + 1, the pairs hsum256(low half + high half)
 * adds, in the same tree (IEEE addition is commutative, so only the pairing counts). Four levels of shuffles and
 * adds over all sixteen cost ~3 instructions a sum, where one hsum256 is ~8: at the widths of a small model (K =
 * 256: eight vdpbf16ps a dot) the per-dot sums had been as much work as the products. `a` comes in slot order
 * p = 4 s + q for the accumulator 4 q + s (the shuffles' lane order), so lane i holds accumulator i. */
static inline __attribute__((always_inline)) __m512 hsum16(const __m512 a[16]) {
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++) /* lanes j + j+8: halves side by side */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++) /* j + j+4: quarters 0, 2 against 1, 3 */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++) /* j + j+2 within each quarter */
        d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0x44), _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD)); /* j + j+1 */
}

/* dense_tile_bh's dots for R rows x nt tokens (R * nt <= 16; R, nt constants where inlined), rows one after another
 * (each row's whole K before the next: one weight stream, as AMD CPUs read fastest), the sums by hsum16:
 * s[t * R + r] = row n + r of m . token t, the same numbers as dense_tile_bh gives, whatever R or nt. */
static inline __attribute__((always_inline)) void dense_block_bh(const lg_mat *m, int n, const int R, const uint16_t *xb, const int nt, float *s) {
    const int K = m->k, K32 = K & ~31;
    const uint16_t *W = (const uint16_t *)m->w + (size_t)n * K;
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    for (int r = 0; r < R; r++) {
        const uint16_t *row = W + (size_t)r * K;
        for (int i = 0; i < K32; i += 32) {
            const __m512bh w = (__m512bh)_mm512_loadu_si512((const void *)(row + i));
            for (int t = 0; t < nt; t++)
                acc[t * R + r] = _mm512_dpbf16_ps(acc[t * R + r], w, (__m512bh)_mm512_loadu_si512((const void *)(xb + (size_t)t * K + i)));
        }
    }
    __m512 slots[16];
    for (int p = 0; p < 16; p++) slots[p] = acc[(p & 3) * 4 + (p >> 2)];
    _mm512_storeu_ps(s, hsum16(slots));
    if (K32 < K)
        for (int r = 0; r < R; r++)
            for (int t = 0; t < nt; t++)
                for (int j = K32; j < K; j++) s[t * R + r] += bf16_to_float(W[(size_t)r * K + j]) * bf16_to_float(xb[(size_t)t * K + j]);
}

/* T rows of K floats (bf16 values) -> bf16, for dense_tile_bh. */
static inline void rows_to_bf16(const float *x, int T, int K, uint16_t *xb) {
    for (int t = 0; t < T; t++) row_to_bf16(x + (size_t)t * K, K, xb + (size_t)t * K);
}
#endif

/* ---- quant entry points the model side calls (defined in qkernels.c; kq_matmul_q8 in kquants.c) ---- */

/* Room for `rows` quantized rows of k values (k a multiple of QB); returns 0 when out of memory. */
int lg_qact_alloc(qact *a, size_t rows, int k);
void lg_qact_free(qact *a);

/* Whether dense rows that stream through once (a decoded token, a verification's few tokens) are read
 * several at a time, interleaved, or one after another: qkernels.c lg_set_interleaved_rows. */
int lg_interleaved_rows(void);

/* The AMX tiles (amx.c): lg_set_amx turns them on (asking the kernel for the tile state) or off and
 * says whether they are on; lg_amx_takes says whether a matrix goes through them (then always:
 * lg_matvec, lg_mat_rows and the decoder's multi-token products); lg_amx_rows is the product. */
int lg_set_amx(int want);
int lg_amx_takes(const lg_mat *m, int dtype);
int lg_amx_rows(const lg_mat *m, int T, const float *x, int dt, float *y, int nth);

/* y = m . x (+ bias), each value rounded to dtype; `xa` has room for one quantized row of m->k. */
void lg_matvec(const lg_mat *m, const float *x, int dtype, qact *xa, float *y, int nth);

/* y[t] = m . x[t] (+ bias), each value rounded to dtype, for T rows of floats x [T, m->k] -> y [T, m->n]:
 * GGML blocks through kq_matmul_q8 (each row's numbers the same whatever T), a stack part by part,
 * quantized rows through lg_linear's tiles and dense ones through tiles of rows x tokens, each token's
 * numbers lg_matvec's (the portable build: row by row through lg_matvec). `xa` as lg_matvec's (a stack's quantized parts use it).
 * Returns 0, or -1 when out of memory or a kernel refuses the shape. */
int lg_mat_rows(const lg_mat *m, int T, const float *x, int dtype, qact *xa, float *y, int nth);

/* The GGML product (kquants.c): y[t, r] = W[r] . x[t] in fp32 with x rounded to int8 blocks as llama.cpp does. */
int kq_matmul_q8(int type, const uint8_t *w, int n, int k, const float *x, int T, float *y, int nth);

/* SwiGLU: out = down(silu(gate(h)) * up(h)), gate_up fused [2I, H]; g holds 2I floats. */
void lg_swiglu_vec(const lg_mat *gate_up, const lg_mat *down, int dtype, const float *h, qact *xa, float *g, float *out, int nth);

/* y[t] = w . x[t] (+ bias) for T rows, each row's arithmetic
 * lg_matvec's (the row quantized alike, the dot in the same order whichever tile it sits in). */
int lg_linear(const lg_qtensor *w, int T, const void *x, int x_dtype, const float *bias, void *y, int y_dtype, int nth);

/* A MoE layer's routed experts over T tokens (quantized expert tables; see qkernels.c). */
int lg_moe(int T, int H, int I, const void *x, int dtype, int k, const int64_t *ids, const float *wts,
           const lg_qtensor *gate_up, const lg_qtensor *down, int E, void *out, int nth);

#endif
