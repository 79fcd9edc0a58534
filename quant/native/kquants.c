/* llama.cpp's K-quant and legacy blocks multiplied as stored (quant/kquants.py holds the format
 * notes and the torch reference these kernels must agree with).
 *
 * Every block decodes into int8 codes q (one per weight), an fp32 scale per sub-block and, for
 * Q2_K / Q4_K / Q5_K, an fp32 offset per sub-block: w = scale * q - offset (Q4_1 / Q5_1 add their m:
 * the offset is -m, and x - (-m) == x + m exactly). The scales are computed
 * exactly as gguf.quants / llama.cpp compute them (fp16 -> fp32, times the sub-block's integer
 * scale: one fp32 product), so `kq_dequant` is bit-exact with them. `kq_matmul` multiplies the codes
 * with fp32 activations (no activation quantization): it agrees with dequantize + fp32 matmul to
 * fp32 rounding. Each block is decoded once per call and used for every token.
 *
 * Built by quant/kquants.py with quant/native.py's builder and flags (-O3 -march=native -fopenmp
 * -ffp-contract=off); AVX2 (+FMA) where the compiler targets it, portable C otherwise.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define QK_K 256
#define KQ_MAX_ROWS 64 /* tokens per kq_matmul call (accumulators live on the stack) */

enum kq_type { KQ_Q4_0, KQ_Q5_0, KQ_Q2_K, KQ_Q3_K, KQ_Q4_K, KQ_Q5_K, KQ_Q6_K, KQ_IQ4_XS, KQ_Q4_1, KQ_Q5_1, KQ_IQ4_NL, KQ_NTYPES };

typedef struct {
    int block, nbytes, sub, has_offset;
} kq_info;

/* weights per block, bytes per block, weights per sub-block, whether sub-blocks carry an offset */
static const kq_info INFO[KQ_NTYPES] = {
    {32, 18, 32, 0}, {32, 22, 32, 0}, {QK_K, 84, 16, 1}, {QK_K, 110, 16, 0},
    {QK_K, 144, 32, 1}, {QK_K, 176, 32, 1}, {QK_K, 210, 16, 0}, {QK_K, 136, 32, 0},
    {32, 20, 32, 1}, {32, 24, 32, 1}, {32, 18, 32, 0},
};

static const int8_t IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* IEEE half -> float, exact (F16C where present). */
static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float v = e == 0 ? ldexpf((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexpf((float)(m | 0x400), e - 25);
    return (h & 0x8000) ? -v : v;
#endif
}

/* One block -> codes q[block], scale sc[subs], offset mn[subs] (offset types only). */
static void decode(int type, const uint8_t *b, int8_t *q, float *sc, float *mn) {
    switch (type) {
    case KQ_Q4_0: {
        for (int j = 0; j < 16; j++) {
            q[j] = (int8_t)((b[2 + j] & 15) - 8);
            q[j + 16] = (int8_t)((b[2 + j] >> 4) - 8);
        }
        sc[0] = f16(b);
        break;
    }
    case KQ_Q5_0:
    case KQ_Q5_1: {
        const int o = type == KQ_Q5_1 ? 2 : 0, zero = type == KQ_Q5_1 ? 0 : 16;
        uint32_t qh;
        memcpy(&qh, b + 2 + o, 4);
        for (int j = 0; j < 16; j++) {
            q[j] = (int8_t)(((b[6 + o + j] & 15) | (((qh >> j) & 1) << 4)) - zero);
            q[j + 16] = (int8_t)(((b[6 + o + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - zero);
        }
        sc[0] = f16(b);
        if (o) mn[0] = -f16(b + 2);
        break;
    }
    case KQ_Q4_1: {
        for (int j = 0; j < 16; j++) {
            q[j] = (int8_t)(b[4 + j] & 15);
            q[j + 16] = (int8_t)(b[4 + j] >> 4);
        }
        sc[0] = f16(b);
        mn[0] = -f16(b + 2);
        break;
    }
    case KQ_IQ4_NL: {
        for (int j = 0; j < 16; j++) {
            q[j] = IQ4_VALUES[b[2 + j] & 15];
            q[j + 16] = IQ4_VALUES[b[2 + j] >> 4];
        }
        sc[0] = f16(b);
        break;
    }
    case KQ_Q2_K: {
        const uint8_t *scales = b, *qs = b + 16;
        const float d = f16(b + 80), dmin = f16(b + 82);
        for (int s = 0; s < 16; s++) {
            sc[s] = d * (float)(scales[s] & 15);
            mn[s] = dmin * (float)(scales[s] >> 4);
        }
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 32; l++) q[h * 128 + j * 32 + l] = (int8_t)((qs[h * 32 + l] >> (2 * j)) & 3);
        break;
    }
    case KQ_Q3_K: {
        const uint8_t *hmask = b, *qs = b + 32, *s = b + 96;
        const float d = f16(b + 108);
        for (int i = 0; i < 16; i++) {
            const int lo = i < 8 ? s[i] & 15 : s[i - 8] >> 4;
            const int hi = (s[8 + (i & 3)] >> (2 * (i >> 2))) & 3;
            sc[i] = d * (float)((lo | (hi << 4)) - 32);
        }
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 32; l++) {
                    const int i = h * 128 + j * 32 + l;
                    q[i] = (int8_t)(((qs[h * 32 + l] >> (2 * j)) & 3) - (((hmask[l] >> (i >> 5)) & 1) ? 0 : 4));
                }
        break;
    }
    case KQ_Q4_K:
    case KQ_Q5_K: {
        const float d = f16(b), dmin = f16(b + 2);
        const uint8_t *s = b + 4, *qh = b + 16, *qs = type == KQ_Q4_K ? b + 16 : b + 48;
        for (int j = 0; j < 8; j++) {
            const int scj = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 2) & 48);
            const int mnj = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 2) & 48);
            sc[j] = d * (float)scj;
            mn[j] = dmin * (float)mnj;
        }
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) {
                q[c * 64 + l] = (int8_t)(qs[c * 32 + l] & 15);
                q[c * 64 + 32 + l] = (int8_t)(qs[c * 32 + l] >> 4);
            }
        if (type == KQ_Q5_K)
            for (int i = 0; i < QK_K; i++) q[i] = (int8_t)(q[i] | (((qh[i & 31] >> (i >> 5)) & 1) << 4));
        break;
    }
    case KQ_Q6_K: {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *scales = (const int8_t *)(b + 192);
        const float d = f16(b + 208);
        for (int s = 0; s < 16; s++) sc[s] = d * (float)scales[s];
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 32; l++) {
                    const int i = h * 128 + j * 32 + l, lo = (ql[h * 64 + (j & 1) * 32 + l] >> (4 * (j >> 1))) & 15;
                    q[i] = (int8_t)((lo | (((qh[h * 32 + l] >> (2 * j)) & 3) << 4)) - 32);
                }
        break;
    }
    case KQ_IQ4_XS: {
        const float d = f16(b);
        const unsigned sh = (unsigned)b[2] | ((unsigned)b[3] << 8);
        const uint8_t *sl = b + 4, *qs = b + 8;
        for (int j = 0; j < 8; j++) {
            const int lo = (sl[j >> 1] >> (4 * (j & 1))) & 15, hi = (sh >> (2 * j)) & 3;
            sc[j] = d * (float)((lo | (hi << 4)) - 32);
        }
        for (int s = 0; s < 8; s++)
            for (int l = 0; l < 16; l++) {
                q[s * 32 + l] = IQ4_VALUES[qs[s * 16 + l] & 15];
                q[s * 32 + 16 + l] = IQ4_VALUES[qs[s * 16 + l] >> 4];
            }
        break;
    }
    }
}

/* sum over a sub-block of n (16 or 32) codes times fp32 activations */
static inline float dot_sub(const int8_t *q, const float *x, int n) {
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) {
        const __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + i))));
        acc = _mm256_fmadd_ps(qf, _mm256_loadu_ps(x + i), acc);
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
#else
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += (float)q[i] * x[i];
    return s;
#endif
}

static int valid(int type, int n, int k) {
    return type >= 0 && type < KQ_NTYPES && n > 0 && k > 0 && k % INFO[type].block == 0;
}

/* y[t, r] = sum_k W[r, k] x[t, k] for T <= KQ_MAX_ROWS tokens; W: n rows of k / block blocks.
 * Returns 0, or -1 for a bad type / shape / token count, -2 when out of memory. */
int kq_matmul(int type, const uint8_t *w, int n, int k, const float *x, int T, float *y, int nth) {
    if (!valid(type, n, k) || T < 1 || T > KQ_MAX_ROWS) return -1;
    const kq_info in = INFO[type];
    const int nb = k / in.block, subs = in.block / in.sub, nsub = k / in.sub;
    const size_t row_bytes = (size_t)nb * in.nbytes;
    float *xs = NULL; /* per token and sub-block: the activations' sum (offset types) */
    if (in.has_offset) {
        xs = malloc(sizeof(float) * (size_t)T * nsub);
        if (!xs) return -2;
        for (int t = 0; t < T; t++)
            for (int s = 0; s < nsub; s++) {
                float a = 0.0f;
                for (int i = 0; i < in.sub; i++) a += x[(size_t)t * k + (size_t)s * in.sub + i];
                xs[(size_t)t * nsub + s] = a;
            }
    }
#pragma omp parallel for num_threads(nth) schedule(static)
    for (int r = 0; r < n; r++) {
        int8_t q[QK_K];
        float sc[16], mn[16], acc[KQ_MAX_ROWS], off[KQ_MAX_ROWS];
        for (int t = 0; t < T; t++) acc[t] = off[t] = 0.0f;
        const uint8_t *row = w + (size_t)r * row_bytes;
        for (int b = 0; b < nb; b++) {
            decode(type, row + (size_t)b * in.nbytes, q, sc, mn);
            for (int t = 0; t < T; t++) {
                const float *xb = x + (size_t)t * k + (size_t)b * in.block;
                float a = 0.0f;
                for (int s = 0; s < subs; s++) a += sc[s] * dot_sub(q + s * in.sub, xb + s * in.sub, in.sub);
                acc[t] += a;
                if (in.has_offset) {
                    const float *xst = xs + (size_t)t * nsub + (size_t)b * subs;
                    float o = 0.0f;
                    for (int s = 0; s < subs; s++) o += mn[s] * xst[s];
                    off[t] += o;
                }
            }
        }
        for (int t = 0; t < T; t++) y[(size_t)t * n + r] = acc[t] - off[t];
    }
    free(xs);
    return 0;
}

/* out[n, k] = W dequantized (fp32), bit-exact with gguf.quants.dequantize. 0, or -1 for a bad type / shape. */
int kq_dequant(int type, const uint8_t *w, int n, int k, float *out, int nth) {
    if (!valid(type, n, k)) return -1;
    const kq_info in = INFO[type];
    const int nb = k / in.block;
#pragma omp parallel for num_threads(nth) schedule(static)
    for (int r = 0; r < n; r++) {
        int8_t q[QK_K];
        float sc[16], mn[16];
        for (int b = 0; b < nb; b++) {
            decode(type, w + ((size_t)r * nb + b) * in.nbytes, q, sc, mn);
            float *o = out + (size_t)r * k + (size_t)b * in.block;
            for (int i = 0; i < in.block; i++) {
                const int s = i / in.sub;
                o[i] = in.has_offset ? sc[s] * (float)q[i] - mn[s] : sc[s] * (float)q[i];
            }
        }
    }
    return 0;
}
