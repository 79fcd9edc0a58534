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
#include "lg_kernels.h" /* lg_chunk, hsum256 (and immintrin.h under AVX2) */
#ifdef __F16C__
#include <immintrin.h>
#endif

#define QK_K 256
#define KQ_MAX_ROWS 64 /* tokens per kq_matmul call (accumulators live on the stack) */
#define KQ_Q8_ROWS 8   /* tokens per row_q8 pass (vector accumulators) */

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

/* One block -> codes q[block] (skipped when q is NULL: the AVX2 kernels make codes themselves),
 * scale sc[subs], offset mn[subs] (offset types only). */
static inline __attribute__((always_inline)) void decode(int type, const uint8_t *b, int8_t *q, float *sc, float *mn) {
    switch (type) {
    case KQ_Q4_0: {
        if (q) for (int j = 0; j < 16; j++) {
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
        if (q) for (int j = 0; j < 16; j++) {
            q[j] = (int8_t)(((b[6 + o + j] & 15) | (((qh >> j) & 1) << 4)) - zero);
            q[j + 16] = (int8_t)(((b[6 + o + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - zero);
        }
        sc[0] = f16(b);
        if (o) mn[0] = -f16(b + 2);
        break;
    }
    case KQ_Q4_1: {
        if (q) for (int j = 0; j < 16; j++) {
            q[j] = (int8_t)(b[4 + j] & 15);
            q[j + 16] = (int8_t)(b[4 + j] >> 4);
        }
        sc[0] = f16(b);
        mn[0] = -f16(b + 2);
        break;
    }
    case KQ_IQ4_NL: {
        if (q) for (int j = 0; j < 16; j++) {
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
        if (q) for (int h = 0; h < 2; h++)
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
        if (q) for (int h = 0; h < 2; h++)
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
        if (q) for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) {
                q[c * 64 + l] = (int8_t)(qs[c * 32 + l] & 15);
                q[c * 64 + 32 + l] = (int8_t)(qs[c * 32 + l] >> 4);
            }
        if (q && type == KQ_Q5_K)
            for (int i = 0; i < QK_K; i++) q[i] = (int8_t)(q[i] | (((qh[i & 31] >> (i >> 5)) & 1) << 4));
        break;
    }
    case KQ_Q6_K: {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *scales = (const int8_t *)(b + 192);
        const float d = f16(b + 208);
        for (int s = 0; s < 16; s++) sc[s] = d * (float)scales[s];
        if (q) for (int h = 0; h < 2; h++)
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
        if (q) for (int s = 0; s < 8; s++)
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
    return hsum256(acc);
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
#pragma omp parallel for num_threads(nth) schedule(dynamic, lg_chunk(n, nth))
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

/* One row of W dequantized; inlined per type (kq_dequant's switch) so the sub-block size is a constant. */
static inline __attribute__((always_inline)) void dequant_row(const int type, const uint8_t *row, int k, float *o) {
    const kq_info in = INFO[type];
    int8_t q[QK_K];
    float sc[16], mn[16];
    for (int b = 0; b < k / in.block; b++, o += in.block) {
        decode(type, row + (size_t)b * in.nbytes, q, sc, mn);
        for (int s = 0; s < in.block / in.sub; s++)
            for (int i = s * in.sub; i < (s + 1) * in.sub; i++) o[i] = in.has_offset ? sc[s] * (float)q[i] - mn[s] : sc[s] * (float)q[i];
    }
}

#define DEQUANT_OF(TYPE)                                                                                             \
    case TYPE:                                                                                                       \
        _Pragma("omp parallel for num_threads(nth) schedule(dynamic, lg_chunk(n, nth))") for (int r = 0; r < n; r++) \
            dequant_row(TYPE, w + (size_t)r * row_bytes, k, out + (size_t)r * k);                                    \
        break;

/* out[n, k] = W dequantized (fp32), bit-exact with gguf.quants.dequantize. 0, or -1 for a bad type / shape. */
int kq_dequant(int type, const uint8_t *w, int n, int k, float *out, int nth) {
    if (!valid(type, n, k)) return -1;
    const size_t row_bytes = (size_t)(k / INFO[type].block) * INFO[type].nbytes;
    switch (type) {
        DEQUANT_OF(KQ_Q4_0) DEQUANT_OF(KQ_Q5_0) DEQUANT_OF(KQ_Q2_K) DEQUANT_OF(KQ_Q3_K) DEQUANT_OF(KQ_Q4_K) DEQUANT_OF(KQ_Q5_K)
        DEQUANT_OF(KQ_Q6_K) DEQUANT_OF(KQ_IQ4_XS) DEQUANT_OF(KQ_Q4_1) DEQUANT_OF(KQ_Q5_1) DEQUANT_OF(KQ_IQ4_NL)
    }
    return 0;
}

/* ---- decode with int8 activations: codes times int8 x as integers (llama.cpp's vec_dot approach) ----
 * The activations are quantized per 32 (d = amax / 127, q = round-half-even(x / d), as
 * qkernels.c's quantize_row); a block's 32-code chunk is multiplied with them as int8 (AVX2 maddubs),
 * each 16 codes' integer sum scaled by its sub-block scale times d. So kq_matmul_q8 equals
 * (x rounded to its int8 grid) @ W.T to fp32 rounding, not x @ W.T: the activation rounding is the
 * price of a ~5x faster product (what llama.cpp pays too). */

/* x [k] -> int8 xq, per 32 the scale dx, per `sub` (16 or 32) values the scaled sum xs of the codes. */
static void quant_act(const float *x, int k, int sub, int8_t *xq, float *dx, float *xs) {
    for (int b = 0; b < k / 32; b++) {
        const float *xb = x + (size_t)b * 32;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
        const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        int s0 = 0, s1 = 0;
        for (int i = 0; i < 32; i++) {
            const int8_t v = (int8_t)lrintf(xb[i] * id);
            xq[(size_t)b * 32 + i] = v;
            if (i < 16) s0 += v;
            else s1 += v;
        }
        dx[b] = d;
        if (sub == 16) {
            xs[2 * b] = d * (float)s0;
            xs[2 * b + 1] = d * (float)s1;
        } else {
            xs[b] = d * (float)(s0 + s1);
        }
    }
}

#ifdef __AVX2__
/* 16 bytes -> 32 codes: low nibbles are elements 0..15, high nibbles 16..31 (the legacy/IQ4 order). */
static inline __m256i nib32(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

/* 32 bits (little-endian) -> 32 bytes, 0xff where the bit is set. */
static inline __m256i bits32(const uint8_t *p) {
    uint32_t x;
    memcpy(&x, p, 4);
    const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf), bit), bit);
}

/* bytes >> s (each byte; s < 8), masked */
static inline __m256i shr_mask(__m256i v, int s, int mask) {
    return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(s)), _mm256_set1_epi8((char)mask));
}

static inline __m256i ld(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* Codes of chunk j (weights 32j..32j+31) of block b as signed bytes, the same values decode() writes. */
static inline __m256i codes32(int type, const uint8_t *b, int j) {
    const __m256i iq4 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_VALUES)), b16 = _mm256_set1_epi8(16);
    switch (type) {
    case KQ_Q4_0: return _mm256_sub_epi8(nib32(b + 2), _mm256_set1_epi8(8));
    case KQ_Q4_1: return nib32(b + 4);
    case KQ_IQ4_NL: return _mm256_shuffle_epi8(iq4, nib32(b + 2));
    case KQ_Q5_0: return _mm256_sub_epi8(_mm256_or_si256(nib32(b + 6), _mm256_and_si256(bits32(b + 2), b16)), b16);
    case KQ_Q5_1: return _mm256_or_si256(nib32(b + 8), _mm256_and_si256(bits32(b + 4), b16));
    case KQ_Q2_K: return shr_mask(ld(b + 16 + (j >> 2) * 32), 2 * (j & 3), 3);
    case KQ_Q3_K: {
        const __m256i ql = shr_mask(ld(b + 32 + (j >> 2) * 32), 2 * (j & 3), 3), hb = shr_mask(ld(b), j, 1);
        return _mm256_sub_epi8(ql, _mm256_slli_epi16(_mm256_xor_si256(hb, _mm256_set1_epi8(1)), 2));
    }
    case KQ_Q4_K: return shr_mask(ld(b + 16 + (j >> 1) * 32), 4 * (j & 1), 15);
    case KQ_Q5_K: return _mm256_or_si256(shr_mask(ld(b + 48 + (j >> 1) * 32), 4 * (j & 1), 15), _mm256_slli_epi16(shr_mask(ld(b + 16), j, 1), 4));
    case KQ_Q6_K: {
        const int h = j >> 2, jj = j & 3;
        const __m256i lo = shr_mask(ld(b + h * 64 + (jj & 1) * 32), 4 * (jj >> 1), 15), hi = shr_mask(ld(b + 128 + h * 32), 2 * jj, 3);
        return _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
    }
    default: return _mm256_shuffle_epi8(iq4, nib32(b + 8 + j * 16)); /* KQ_IQ4_XS */
    }
}

/* int32 x8 of codes . activations: lanes 0-3 hold weights 0..15 of the chunk, lanes 4-7 weights 16..31 */
static inline __m256 dot32(__m256i v, const int8_t *xq) {
    const __m256i a = _mm256_loadu_si256((const __m256i *)xq);
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(a, v));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
#endif

/* One weight row against T int8-quantized activation rows: y[t] for t < T. Always inlined into a
 * per-type loop (kq_matmul_q8's switch), so `type` is a constant there and decode()'s and
 * codes32()'s switches fold away. */
static inline __attribute__((always_inline)) void row_q8(const int type, const uint8_t *row, int k, const int8_t *xq, const float *dx,
                                                         const float *xsum, int T, float *y, size_t ystride) {
    const kq_info in = INFO[type];
    const int nb = k / in.block, nc = in.block / 32, k32 = k / 32, subs = in.block / in.sub;
    float sc[16], mn[16], off[KQ_MAX_ROWS];
#ifdef __AVX2__
    __m256 acc[KQ_Q8_ROWS];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps(), off[t] = 0.0f;
#else
    float acc[KQ_Q8_ROWS];
    int8_t q[QK_K];
    for (int t = 0; t < T; t++) acc[t] = off[t] = 0.0f;
#endif
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = row + (size_t)b * in.nbytes;
#ifdef __AVX2__
        decode(type, blk, NULL, sc, mn);
        for (int c = 0; c < nc; c++) {
            const __m256i v = codes32(type, blk, c);
            const float lo = in.sub == 16 ? sc[2 * c] : sc[c], hi = in.sub == 16 ? sc[2 * c + 1] : sc[c];
            for (int t = 0; t < T; t++) {
                const float d = dx[(size_t)t * k32 + (size_t)b * nc + c];
                const __m256 s = _mm256_set_m128(_mm_set1_ps(hi * d), _mm_set1_ps(lo * d));
                acc[t] = _mm256_fmadd_ps(dot32(v, xq + (size_t)t * k + (size_t)b * in.block + c * 32), s, acc[t]);
            }
        }
#else
        decode(type, blk, q, sc, mn);
        for (int t = 0; t < T; t++) {
            const int8_t *xb = xq + (size_t)t * k + (size_t)b * in.block;
            const float *db = dx + (size_t)t * k32 + (size_t)b * nc;
            for (int h = 0; h < in.block / 16; h++) {
                int32_t is = 0;
                for (int i = 0; i < 16; i++) is += (int32_t)q[h * 16 + i] * xb[h * 16 + i];
                acc[t] += sc[in.sub == 16 ? h : h / 2] * db[h / 2] * (float)is;
            }
        }
#endif
        if (in.has_offset) /* xs: per token and sub-block, the activations' scaled sum */
            for (int t = 0; t < T; t++) {
                const float *xs = xsum + (size_t)t * (k / in.sub) + (size_t)b * subs;
                float o = 0.0f;
#ifdef __AVX2__
                if (subs % 8 == 0) {
                    __m256 ov = _mm256_setzero_ps();
                    for (int s = 0; s < subs; s += 8) ov = _mm256_fmadd_ps(_mm256_loadu_ps(mn + s), _mm256_loadu_ps(xs + s), ov);
                    o = hsum256(ov);
                } else
#endif
                    for (int s = 0; s < subs; s++) o += mn[s] * xs[s];
                off[t] += o;
            }
    }
    for (int t = 0; t < T; t++)
#ifdef __AVX2__
        y[(size_t)t * ystride] = hsum256(acc[t]) - off[t];
#else
        y[(size_t)t * ystride] = acc[t] - off[t];
#endif
}

#define ROWS_OF(TYPE)                                                                                                \
    case TYPE:                                                                                                       \
        _Pragma("omp parallel for num_threads(nth) schedule(dynamic, lg_chunk(n, nth))") for (int r = 0; r < n; r++) \
            if (T == 1) /* one token (decode): T a constant, the accumulator a register */                             \
                row_q8(TYPE, w + (size_t)r * row_bytes, k, xq, dx, xsum, 1, y + r, (size_t)n);                       \
            else /* tokens KQ_Q8_ROWS at a time, the row's blocks staying in L1 between them */                      \
                for (int t0 = 0; t0 < T; t0 += KQ_Q8_ROWS)                                                          \
                    row_q8(TYPE, w + (size_t)r * row_bytes, k, xq + (size_t)t0 * k, dx + (size_t)t0 * k32,           \
                           xsum + (size_t)t0 * ks, T - t0 < KQ_Q8_ROWS ? T - t0 : KQ_Q8_ROWS, y + (size_t)t0 * n + r, (size_t)n); \
        break;

/* y[t, r] = sum_k W[r, k] xq[t, k] dx for T <= KQ_MAX_ROWS tokens: the decode-time product with int8
 * activations (see above). Returns 0, -1 for a bad type / shape / token count, -2 when out of memory. */
int kq_matmul_q8(int type, const uint8_t *w, int n, int k, const float *x, int T, float *y, int nth) {
    if (!valid(type, n, k) || T < 1 || T > KQ_MAX_ROWS) return -1;
    const size_t row_bytes = (size_t)(k / INFO[type].block) * INFO[type].nbytes;
    const int k32 = k / 32, ks = k / INFO[type].sub;
    int8_t *xq = malloc((size_t)T * k);
    float *dx = malloc(sizeof(float) * (size_t)T * k32), *xsum = malloc(sizeof(float) * (size_t)T * ks);
    if (!xq || !dx || !xsum) {
        free(xq), free(dx), free(xsum);
        return -2;
    }
    for (int t = 0; t < T; t++) quant_act(x + (size_t)t * k, k, INFO[type].sub, xq + (size_t)t * k, dx + (size_t)t * k32, xsum + (size_t)t * ks);
    switch (type) {
        ROWS_OF(KQ_Q4_0) ROWS_OF(KQ_Q5_0) ROWS_OF(KQ_Q2_K) ROWS_OF(KQ_Q3_K) ROWS_OF(KQ_Q4_K) ROWS_OF(KQ_Q5_K)
        ROWS_OF(KQ_Q6_K) ROWS_OF(KQ_IQ4_XS) ROWS_OF(KQ_Q4_1) ROWS_OF(KQ_Q5_1) ROWS_OF(KQ_IQ4_NL)
    }
    free(xq), free(dx), free(xsum);
    return 0;
}
