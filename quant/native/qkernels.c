/* localglm's native CPU kernels for quantized weights (q2 / q4 / q8, see quant/formats.py).
 *
 * Why native: a decode step through torch costs ~1000 small ops and torch's int4 CPU kernel is
 * compute-bound on AVX2. Here activations are quantized to int8 in blocks of 32 (as llama.cpp's
 * q8 dot products do), weight codes are multiplied as integers (AVX2 maddubs), and one call runs a
 * whole MoE layer: every chosen expert's gate/up, SiLU, down and the weighted sum.
 *
 * Weight layouts (quant/formats.py is the reference; w = weight, c = code):
 *   q2/q4: rowf fp32 [N,2] (s_max, m_max), codes little-end first in bytes, scode uint8 [N,K/G],
 *          mcode int8 [N,K/G]; w = s_max * 2^((scode-255)/16) * c + mcode * m_max / 127.
 *   q8:    rowf fp32 [N,1], codes int8, gscale fp16 [N,K/G]; w = rowf * gscale * c.
 * Activation blocks are stored permuted to match how codes come out of a byte: element e of a
 * block sits at (e % per) * (32 / per) + e / per, per = codes per byte.
 *
 * Built at first use by quant/native.py with the machine's C compiler (-O3 -march=native -fopenmp);
 * a portable scalar path is used where AVX2 is not available. Threads: OpenMP, torch's runtime
 * (same libgomp soname), count passed per call.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define QB 32 /* activation / code block */

typedef struct {
    const float *rowf;
    const uint8_t *data;
    const uint8_t *gs; /* q2/q4: scale codes; q8: fp16 group scales */
    const int8_t *gm;  /* q2/q4: offset codes; q8: unused */
    int32_t bits, group, n, k;
} lg_qtensor;

static float scale_lut[256];

__attribute__((constructor)) static void init_lut(void) {
    for (int i = 0; i < 256; i++) scale_lut[i] = exp2f((float)(i - 255) / 16.0f);
}

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, f;
    if (exp == 0) {
        if (mant == 0) {
            f = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            f = sign | (exp << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        f = sign | 0x7f800000u | (mant << 13);
    } else {
        f = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float out;
    memcpy(&out, &f, 4);
    return out;
#endif
}

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

static void load_row(const void *src, int dtype, size_t offset, int k, float *dst) {
    if (dtype == 1) {
        const uint16_t *h = (const uint16_t *)src + offset;
        for (int i = 0; i < k; i++) dst[i] = bf16_to_float(h[i]);
    } else {
        memcpy(dst, (const float *)src + offset, (size_t)k * sizeof(float));
    }
}

static inline void store(void *dst, int dtype, size_t i, float v) {
    if (dtype == 1) ((uint16_t *)dst)[i] = float_to_bf16(v);
    else ((float *)dst)[i] = v;
}

int lg_has_avx2(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

/* One row of activations -> int8 blocks (permuted for `bits`), block scales d and sums s of the rounded values. */
static void quantize_row(const float *x, int k, int bits, int8_t *q, float *d, float *s) {
    const int per = 8 / bits, nb = QB / per;
    for (int b = 0; b < k / QB; b++) {
        const float *xb = x + (size_t)b * QB;
        float amax = 0.0f;
        for (int i = 0; i < QB; i++) {
            float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;
        }
        const float dd = amax / 127.0f, id = dd > 0.0f ? 1.0f / dd : 0.0f;
        d[b] = dd;
        int8_t *qb = q + (size_t)b * QB;
        int32_t qsum = 0;
        for (int e = 0; e < QB; e++) {
            const int8_t v = (int8_t)lrintf(xb[e] * id);
            qb[(e % per) * nb + e / per] = v;
            qsum += v;
        }
        s[b] = dd * (float)qsum; /* the rounded block's sum: offsets then see the same x as the codes */
    }
}

#ifdef __AVX2__
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 codes of block b as unsigned bytes in the permuted order. */
static inline __m256i codes_q4(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

static inline __m256i codes_q2(const uint8_t *p) {
    const __m128i v = _mm_loadl_epi64((const __m128i *)p), m = _mm_set1_epi8(0x03);
    const __m128i lo = _mm_unpacklo_epi64(v, _mm_srli_epi16(v, 2));
    const __m128i hi = _mm_unpacklo_epi64(_mm_srli_epi16(v, 4), _mm_srli_epi16(v, 6));
    return _mm256_set_m128i(_mm_and_si128(hi, m), _mm_and_si128(lo, m));
}

static inline __m256i dot_u8s8(__m256i w, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}
#endif

#ifdef __AVX2__
/* The AVX2 body, inlined with a constant `bits`; blocks two at a time into two accumulators so
 * consecutive FMAs do not wait on each other. */
static inline __attribute__((always_inline)) float dot_lowbit_avx2(const uint8_t *row, const uint8_t *sc, const int8_t *mc, float s0, float m0,
                                                                    int nblocks, int bpg, const int8_t *xq, const float *xd, const float *xs, const int bits) {
    const size_t blk_bytes = QB * bits / 8;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float macc0 = 0.0f, macc1 = 0.0f;
    int b = 0;
    for (; b + 1 < nblocks; b += 2) {
        const int g0 = b / bpg, g1 = (b + 1) / bpg;
        const __m256i c0 = bits == 4 ? codes_q4(row + b * blk_bytes) : codes_q2(row + b * blk_bytes);
        const __m256i c1 = bits == 4 ? codes_q4(row + (b + 1) * blk_bytes) : codes_q2(row + (b + 1) * blk_bytes);
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + (size_t)b * QB));
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + (size_t)(b + 1) * QB));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(c0, x0)), _mm256_set1_ps(s0 * scale_lut[sc[g0]] * xd[b]), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(c1, x1)), _mm256_set1_ps(s0 * scale_lut[sc[g1]] * xd[b + 1]), acc1);
        macc0 += (float)mc[g0] * xs[b];
        macc1 += (float)mc[g1] * xs[b + 1];
    }
    if (b < nblocks) {
        const int g = b / bpg;
        const __m256i c = bits == 4 ? codes_q4(row + b * blk_bytes) : codes_q2(row + b * blk_bytes);
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)b * QB));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(c, x)), _mm256_set1_ps(s0 * scale_lut[sc[g]] * xd[b]), acc0);
        macc0 += (float)mc[g] * xs[b];
    }
    return hsum256(_mm256_add_ps(acc0, acc1)) + m0 * (macc0 + macc1);
}
#endif

/* dot(row n of w, one quantized activation row) for q2 / q4: sum_g s_g * sum(c x) + m_g * sum(x), x rounded. */
static float dot_lowbit(const lg_qtensor *w, int n, const int8_t *xq, const float *xd, const float *xs) {
    const int K = w->k, G = w->group, ng = K / G, bpg = G / QB, bits = w->bits;
    const uint8_t *row = w->data + (size_t)n * ((size_t)K * bits / 8);
    const uint8_t *sc = w->gs + (size_t)n * ng;
    const int8_t *mc = w->gm + (size_t)n * ng;
    const float s0 = w->rowf[2 * (size_t)n], m0 = w->rowf[2 * (size_t)n + 1] / 127.0f;
#ifdef __AVX2__
    return bits == 4 ? dot_lowbit_avx2(row, sc, mc, s0, m0, K / QB, bpg, xq, xd, xs, 4)
                     : dot_lowbit_avx2(row, sc, mc, s0, m0, K / QB, bpg, xq, xd, xs, 2);
#else
    const int per = 8 / bits, nb = QB / per, mask = (1 << bits) - 1;
    const size_t blk_bytes = QB * bits / 8;
    float acc = 0.0f, macc = 0.0f;
    for (int g = 0; g < ng; g++) {
        const float sg = s0 * scale_lut[sc[g]], mg = m0 * (float)mc[g];
        for (int j = 0; j < bpg; j++) {
            const int b = g * bpg + j;
            const uint8_t *p = row + (size_t)b * blk_bytes;
            const int8_t *xb = xq + (size_t)b * QB;
            int32_t isum = 0;
            for (int e = 0; e < QB; e++) isum += ((p[e / per] >> (bits * (e % per))) & mask) * xb[(e % per) * nb + e / per];
            acc += sg * xd[b] * (float)isum;
            macc += mg * xs[b];
        }
    }
    return acc + macc;
#endif
}

static float dot_q8(const lg_qtensor *w, int n, const int8_t *xq, const float *xd) {
    const int K = w->k, G = w->group, ng = K / G, bpg = G / QB;
    const int8_t *row = (const int8_t *)w->data + (size_t)n * K;
    const uint16_t *gsc = (const uint16_t *)w->gs + (size_t)n * ng;
    const float r = w->rowf[n];
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (int g = 0; g < ng; g++) {
        const float sg = r * half_to_float(gsc[g]);
        for (int j = 0; j < bpg; j++) {
            const int b = g * bpg + j;
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(row + (size_t)b * QB));
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (size_t)b * QB));
            const __m256i i32 = dot_u8s8(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), _mm256_set1_ps(sg * xd[b]), acc);
        }
    }
    return hsum256(acc);
#else
    float acc = 0.0f;
    for (int g = 0; g < ng; g++) {
        const float sg = r * half_to_float(gsc[g]);
        for (int j = 0; j < bpg; j++) {
            const int b = g * bpg + j;
            int32_t isum = 0;
            for (int e = 0; e < QB; e++) isum += (int32_t)row[(size_t)b * QB + e] * xq[(size_t)b * QB + e];
            acc += sg * xd[b] * (float)isum;
        }
    }
    return acc;
#endif
}

static inline float dot_row(const lg_qtensor *w, int n, const int8_t *xq, const float *xd, const float *xs) {
    return w->bits == 8 ? dot_q8(w, n, xq, xd) : dot_lowbit(w, n, xq, xd, xs);
}

typedef struct {
    int8_t *q;
    float *d, *s;
} qact;

static int qact_alloc(qact *a, size_t rows, int k) {
    a->q = malloc(rows * (size_t)k);
    a->d = malloc(rows * (size_t)(k / QB) * sizeof(float));
    a->s = malloc(rows * (size_t)(k / QB) * sizeof(float));
    return a->q && a->d && a->s;
}

static void qact_free(qact *a) {
    free(a->q);
    free(a->d);
    free(a->s);
}

#define QROW(a, r, k) ((a)->q + (size_t)(r) * (k)), ((a)->d + (size_t)(r) * ((k) / QB)), ((a)->s + (size_t)(r) * ((k) / QB))

/* y[t, n] = x[t] . w[n] (+ bias[n]) for t < T: a quantized linear layer; x and y of dtype 0 (fp32)
 * or 1 (bf16), bias fp32. Returns 0, or -1 when out of memory. */
int lg_linear(const lg_qtensor *w, int T, const void *x, int x_dtype, const float *bias, void *y, int y_dtype, int nth) {
    const int K = w->k, N = w->n;
    qact a = {0};
    float *row = malloc((size_t)K * sizeof(float));
    if (!row || !qact_alloc(&a, T, K)) {
        free(row);
        qact_free(&a);
        return -1;
    }
    for (int t = 0; t < T; t++) {
        load_row(x, x_dtype, (size_t)t * K, K, row);
        quantize_row(row, K, w->bits, QROW(&a, t, K));
    }
    const int par = nth > 1 && (size_t)N * K * T >= (1u << 16);
#pragma omp parallel for num_threads(nth) schedule(static) if (par)
    for (int n = 0; n < N; n++) {
        const float b = bias ? bias[n] : 0.0f;
        for (int t = 0; t < T; t++) store(y, y_dtype, (size_t)t * N + n, dot_row(w, n, QROW(&a, t, K)) + b);
    }
    free(row);
    qact_free(&a);
    return 0;
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* One MoE layer's routed experts: out[t] = sum_j wts[t,j] * down_e(silu(gate_e(x_t)) * up_e(x_t)),
 * e = ids[t,j]. gate_up[e] is [2I, H] (gate rows then up rows), down[e] is [H, I], all experts of a
 * layer in the same format. Pairs are grouped by expert so each weight row is read once per call;
 * the sum over a token's experts runs in fp32, in expert order. x and out share `dtype` (0 fp32,
 * 1 bf16). Returns 0, -1 when out of memory, -2 for an expert id outside [0, E). */
int lg_moe(int T, int H, int I, const void *x, int dtype, int k, const int64_t *ids, const float *wts,
           const lg_qtensor *gate_up, const lg_qtensor *down, int E, void *out, int nth) {
    const int P = T * k, I2 = 2 * I;
    if (P == 0) return 0;
    for (int p = 0; p < P; p++)
        if (ids[p] < 0 || ids[p] >= E) return -2;
    int *cnt = calloc((size_t)E + 1, sizeof(int)), *order = malloc((size_t)P * sizeof(int));
    int *seg_e = malloc((size_t)P * sizeof(int)), *seg_start = malloc(((size_t)P + 1) * sizeof(int));
    float *h1 = malloc((size_t)P * I2 * sizeof(float)), *y = malloc((size_t)P * H * sizeof(float));
    float *xf = malloc((size_t)T * H * sizeof(float));
    qact xa = {0}, ha = {0};
    const int ok = cnt && order && seg_e && seg_start && h1 && y && xf && qact_alloc(&xa, T, H) && qact_alloc(&ha, P, I);
    if (!ok) {
        free(cnt); free(order); free(seg_e); free(seg_start); free(h1); free(y); free(xf);
        qact_free(&xa); qact_free(&ha);
        return -1;
    }
    /* counting sort of the (token, slot) pairs by expert */
    for (int p = 0; p < P; p++) cnt[ids[p] + 1]++;
    for (int e = 0; e < E; e++) cnt[e + 1] += cnt[e];
    int S = 0;
    for (int e = 0; e < E; e++)
        if (cnt[e + 1] > cnt[e]) { seg_e[S] = e; seg_start[S++] = cnt[e]; }
    seg_start[S] = P;
    for (int p = 0; p < P; p++) order[cnt[ids[p]]++] = p;

    const int gbits = gate_up[seg_e[0]].bits, dbits = down[seg_e[0]].bits;
    const int par = nth > 1 && (size_t)P * I * H >= (1u << 15);
    /* Work items are (expert, row) in expert-major order, so each thread streams whole runs of one
     * expert's rows (codes and scales sequentially: what the hardware prefetchers follow). */
    const long gate_items = (long)S * I2, down_items = (long)S * H;
#pragma omp parallel num_threads(nth) if (par)
    {
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++) {
            load_row(x, dtype, (size_t)t * H, H, xf + (size_t)t * H);
            quantize_row(xf + (size_t)t * H, H, gbits, QROW(&xa, t, H));
        }
#pragma omp for schedule(static)
        for (long it = 0; it < gate_items; it++) {
            const int s = (int)(it / I2), n = (int)(it % I2);
            const lg_qtensor *w = &gate_up[seg_e[s]];
            for (int i = seg_start[s]; i < seg_start[s + 1]; i++)
                h1[(size_t)i * I2 + n] = dot_row(w, n, QROW(&xa, order[i] / k, H));
        }
#pragma omp for schedule(static)
        for (int i = 0; i < P; i++) {
            float *h = h1 + (size_t)i * I2;
            for (int j = 0; j < I; j++) h[j] = silu(h[j]) * h[I + j];
            quantize_row(h, I, dbits, QROW(&ha, i, I));
        }
#pragma omp for schedule(static)
        for (long it = 0; it < down_items; it++) {
            const int s = (int)(it / H), n = (int)(it % H);
            const lg_qtensor *w = &down[seg_e[s]];
            for (int i = seg_start[s]; i < seg_start[s + 1]; i++) y[(size_t)i * H + n] = dot_row(w, n, QROW(&ha, i, I));
        }
        /* out[t] = sum of its pairs' outputs, in expert order (pair i runs in sorted order) */
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++) {
            float *o = xf + (size_t)t * H; /* x is quantized already: its float row is the accumulator */
            for (int n = 0; n < H; n++) o[n] = 0.0f;
            for (int i = 0; i < P; i++) {
                const int p = order[i];
                if (p / k != t) continue;
                const float wt = wts[p], *yi = y + (size_t)i * H;
                for (int n = 0; n < H; n++) o[n] += wt * yi[n];
            }
            for (int n = 0; n < H; n++) store(out, dtype, (size_t)t * H + n, o[n]);
        }
    }
    free(cnt); free(order); free(seg_e); free(seg_start); free(h1); free(y); free(xf);
    qact_free(&xa); qact_free(&ha);
    return 0;
}

/* Rows [0, N) of w as fp32 [N, K]: prefill multiplies big batches with a float GEMM instead. */
void lg_dequant(const lg_qtensor *w, float *out, int nth) {
    const int K = w->k, G = w->group, ng = K / G, bits = w->bits, N = w->n;
    const int par = nth > 1 && (size_t)N * K >= (1u << 16);
#pragma omp parallel for num_threads(nth) schedule(static) if (par)
    for (int n = 0; n < N; n++) {
        float *o = out + (size_t)n * K;
        if (bits == 8) {
            const int8_t *row = (const int8_t *)w->data + (size_t)n * K;
            const uint16_t *gsc = (const uint16_t *)w->gs + (size_t)n * ng;
            for (int g = 0; g < ng; g++) {
                const float sg = w->rowf[n] * half_to_float(gsc[g]);
                for (int i = g * G; i < (g + 1) * G; i++) o[i] = sg * (float)row[i];
            }
        } else {
            const int per = 8 / bits, mask = (1 << bits) - 1;
            const uint8_t *row = w->data + (size_t)n * K * bits / 8;
            const float s0 = w->rowf[2 * (size_t)n], m0 = w->rowf[2 * (size_t)n + 1] / 127.0f;
            for (int g = 0; g < ng; g++) {
                const float sg = s0 * scale_lut[w->gs[(size_t)n * ng + g]], mg = m0 * (float)w->gm[(size_t)n * ng + g];
                for (int i = g * G; i < (g + 1) * G; i++) o[i] = sg * (float)((row[i / per] >> (bits * (i % per))) & mask) + mg;
            }
        }
    }
}

/* RMSNorm of `rows` rows of n values, as transformers computes it: in fp32, cast back to the
 * input dtype, then times the weight (in that dtype: the product rounded once). One call instead
 * of a handful of torch ops per norm, which is what a decode step on the CPU is made of. */
void lg_rms_norm(const void *x, int dtype, int rows, int n, const void *weight, float eps, void *out) {
    for (int r = 0; r < rows; r++) {
        const size_t off = (size_t)r * n;
        double ss = 0.0;
        for (int i = 0; i < n; i++) {
            const float v = load_val(x, dtype, off + i);
            ss += (double)v * v;
        }
        const float inv = 1.0f / sqrtf((float)(ss / n) + eps);
        for (int i = 0; i < n; i++) {
            if (dtype == 1) {
                const float v = bf16_to_float(((const uint16_t *)x)[off + i]);
                const float y = bf16_to_float(float_to_bf16(v * inv));
                ((uint16_t *)out)[off + i] = float_to_bf16(bf16_to_float(((const uint16_t *)weight)[i]) * y);
            } else {
                ((float *)out)[off + i] = ((const float *)weight)[i] * (((const float *)x)[off + i] * inv);
            }
        }
    }
}

/* One query token against the KV cache, per head: scores = q.k * scale (fp32), softmax (fp32),
 * out = sum p v -- what layers._decode_attention does with torch ops on CPUs without native bf16.
 * q [heads, hd] contiguous; k, v: kv head g, position t at g * stride_head + t * stride_pos;
 * out [heads, hd] contiguous; all of `dtype`. Returns 0, or -1 when out of memory. */
int lg_decode_attention(const void *q, const void *k, const void *v, int dtype, int heads, int kv_heads, int len, int hd,
                        long stride_head, long stride_pos, float scale, void *out, int nth) {
    const int group = heads / kv_heads;
    float *buf = malloc(sizeof(float) * (size_t)heads * ((size_t)len + 2 * (size_t)hd));
    if (!buf) return -1;
    const int par = nth > 1 && (long)heads * len * hd >= (1L << 16);
#pragma omp parallel for num_threads(nth) schedule(static) if (par)
    for (int h = 0; h < heads; h++) {
        float *sc = buf + (size_t)h * ((size_t)len + 2 * (size_t)hd), *qf = sc + len, *acc = qf + hd;
        const size_t base = (size_t)(h / group) * (size_t)stride_head;
        for (int i = 0; i < hd; i++) qf[i] = load_val(q, dtype, (size_t)h * hd + i);
        float mx = -INFINITY;
        for (int t = 0; t < len; t++) {
            float s = 0.0f;
            const size_t row = base + (size_t)t * (size_t)stride_pos;
            for (int i = 0; i < hd; i++) s += qf[i] * load_val(k, dtype, row + i);
            sc[t] = s * scale;
            mx = sc[t] > mx ? sc[t] : mx;
        }
        float sum = 0.0f;
        for (int t = 0; t < len; t++) {
            sc[t] = expf(sc[t] - mx);
            sum += sc[t];
        }
        for (int i = 0; i < hd; i++) acc[i] = 0.0f;
        for (int t = 0; t < len; t++) {
            const float p = sc[t] / sum;
            const size_t row = base + (size_t)t * (size_t)stride_pos;
            for (int i = 0; i < hd; i++) acc[i] += p * load_val(v, dtype, row + i);
        }
        for (int i = 0; i < hd; i++) store(out, dtype, (size_t)h * hd + i, acc[i]);
    }
    free(buf);
    return 0;
}

/* Rotary embedding of `rows` rows of hd values (one position): the first `rot` dims rotate, halves
 * paired (x * cos + rotate_half(x) * sin), the rest pass through; each product and the sum rounded
 * to `dtype` as torch's elementwise ops do. */
void lg_rope(const void *x, int dtype, int rows, int hd, int rot, const void *cos, const void *sin, void *out) {
    const int half = rot / 2;
    for (int r = 0; r < rows; r++) {
        const size_t off = (size_t)r * hd;
        for (int i = 0; i < hd; i++) {
            float y = load_val(x, dtype, off + i);
            if (i < rot) {
                const float rh = i < half ? -load_val(x, dtype, off + i + half) : load_val(x, dtype, off + i - half);
                float a = y * load_val(cos, dtype, i), b = rh * load_val(sin, dtype, i);
                if (dtype == 1) {
                    a = bf16_to_float(float_to_bf16(a));
                    b = bf16_to_float(float_to_bf16(b));
                }
                y = a + b;
            }
            store(out, dtype, off + i, y);
        }
    }
}
