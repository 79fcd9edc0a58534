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
 * (same libgomp soname), count passed per call; loops split dynamically (lg_kernels.h lg_chunk),
 * and idle threads block instead of spinning (localglm/threads.py sets the runtime's wait policy).
 *
 * This file holds formats and kernels only, nothing of models: the per-token layer ops (norm, RoPE,
 * attention, router) and the fused decoder layer are the model side's (localglm/layers/native/,
 * localglm/models/native/), built into a second library that links against this one and calls the
 * entry points lg_kernels.h declares (lg_matvec, lg_swiglu_vec, lg_moe, lg_qact_*).
 */
#include "lg_kernels.h"
#include <omp.h>

/* The q2/q4 scale code c means 2^((c - 255) / 16). With v = c + 1 = 16 e + f that is
 * 2^(e - 16) * 2^(f / 16): the table is built that way (the power of two is exact), so the vector
 * kernels can compute it from a 16-entry table (scale_frac) and an exponent instead of a gather,
 * and get the same floats as the table. */
static float scale_lut[256], scale_frac[16];

__attribute__((constructor)) static void init_lut(void) {
    for (int f = 0; f < 16; f++) scale_frac[f] = (float)exp2((double)f / 16.0); /* quant/formats.py _scale_table: the same floats */
    for (int c = 0; c < 256; c++) scale_lut[c] = ldexpf(scale_frac[(c + 1) & 15], ((c + 1) >> 4) - 16);
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

int lg_has_avx2(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

/* sizeof of the structs ctypes mirrors (quant/native.py compares them at load): 0 lg_qtensor,
 * 1 lg_mat; 0 past the end. */
size_t lg_quant_sizeof(int which) {
    switch (which) {
    case 0: return sizeof(lg_qtensor);
    case 1: return sizeof(lg_mat);
    default: return 0;
    }
}

/* One row of activations -> int8 blocks (permuted for `bits`), block scales d and sums s of the rounded
 * values. The AVX2 path gives the same bytes and floats as the scalar one: the same amax, the same
 * product x * (1 / d) rounded to nearest even (cvtps_epi32 under the default rounding mode, as
 * lrintf), the same integer sum; only the permutation is done by byte shuffles. */
static void quantize_row(const float *x, int k, int bits, int8_t *q, float *d, float *s) {
    const int per = 8 / bits, nb = QB / per;
    int b = 0;
#ifdef __AVX2__
    /* The bytes of packs_epi32 + packs_epi16 come in dwords (0 4 1 5 2 6 3 7) of element order; then
     * within 128-bit lanes bytes are grouped by e % per, and dwords put each group's two halves together. */
    const __m256i unpack = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i grp4 = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m256i grp2 = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m256i join4 = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7), join2 = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (; b < k / QB; b++) {
        const float *xb = x + (size_t)b * QB;
        const __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8), v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                                 _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4), dd = amax / 127.0f, id = dd > 0.0f ? 1.0f / dd : 0.0f;
        const __m256 idv = _mm256_set1_ps(id);
        const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, idv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, idv));
        const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, idv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, idv));
        const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3)), unpack);
        if (per == 2) bytes = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(bytes, grp4), join4);
        else if (per == 4) bytes = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(bytes, grp2), join2);
        _mm256_storeu_si256((__m256i *)(q + (size_t)b * QB), bytes);
        d[b] = dd;
        s[b] = dd * (float)_mm_cvtsi128_si32(s4);
    }
#endif
    for (; b < k / QB; b++) {
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
/* 32 codes of block b as unsigned bytes in the permuted order: the block's bytes broadcast to every
 * lane, each lane shifted by its own count (one vpsrlvq), then masked -- three instructions. q4: low
 * nibbles in the low 128 bits, high in the high; q2: 64-bit lane j holds bits 2j..2j+1 of each byte. */
static inline __m256i codes_q4(const uint8_t *p) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(0x0f));
}

static inline __m256i codes_q2(const uint8_t *p) {
    int64_t b;
    memcpy(&b, p, 8);
    return _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(b), _mm256_set_epi64x(6, 4, 2, 0)), _mm256_set1_epi8(0x03));
}

/* scale_lut[c] for eight codes (the 16-entry fraction table by two lane permutes, the power of
 * two into the exponent bits): about half the cost of a gather. */
static inline __m256 scale8(__m256i c) {
    const __m256i v = _mm256_add_epi32(c, _mm256_set1_epi32(1)), f = _mm256_and_si256(v, _mm256_set1_epi32(15));
    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(scale_frac), f), hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(scale_frac + 8), f);
    const __m256 frac = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(f, 28))); /* bit 3 of f -> the sign bit blendv reads */
    const __m256i e = _mm256_srli_epi32(v, 4);                                                  /* 0..16 */
    const __m256 pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127 - 16)), 23));
    return _mm256_mul_ps(frac, pow2);
}

/* Sums of four u8 x s8 products per int32 lane. With AVX512-VNNI (Zen 4, Ice Lake and later) one
 * vpdpbusd; otherwise maddubs (pairs to int16) + madd (to int32). The same integers either way: the
 * pairs never saturate int16 here (codes <= 15, or |w| <= 127 against |x| <= 127 for q8). */
static inline __m256i dot_u8s8(__m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
#endif
}

/* Four blocks' low-bit dots in one vector: lane i of each 128-bit half holds block i's sum over
 * that half's 16 codes (so blocks j..j+3 meet the scales [d_j .. d_j+3] twice over, one convert
 * and one FMA per four blocks instead of per block). maddubs, then the int16 pairs are summed
 * within each block by two rounds of hadd (q4: |pair| <= 2 * 15 * 127, four pairs <= 15240, no
 * int16 overflow; q2 less) and widened by one madd: five multiplies per four blocks instead of
 * eight. With VNNI, dpbusd then hadd of the int32 lanes: the same integers. Exact either way. */
static inline __m256i dot4_vec(__m256i k0, __m256i k1, __m256i k2, __m256i k3, __m256i x0, __m256i x1, __m256i x2, __m256i x3) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    const __m256i z = _mm256_setzero_si256();
    return _mm256_hadd_epi32(_mm256_hadd_epi32(_mm256_dpbusd_epi32(z, k0, x0), _mm256_dpbusd_epi32(z, k1, x1)),
                             _mm256_hadd_epi32(_mm256_dpbusd_epi32(z, k2, x2), _mm256_dpbusd_epi32(z, k3, x3)));
#else
    const __m256i h01 = _mm256_hadd_epi16(_mm256_maddubs_epi16(k0, x0), _mm256_maddubs_epi16(k1, x1));
    const __m256i h23 = _mm256_hadd_epi16(_mm256_maddubs_epi16(k2, x2), _mm256_maddubs_epi16(k3, x3));
    return _mm256_madd_epi16(_mm256_hadd_epi16(h01, h23), _mm256_set1_epi16(1));
#endif
}

/* dot4_vec against the activation blocks at q, of which only the first c (1..4) are read: the
 * missing blocks' codes are zero (k1..k3 given so), so any activation bytes do there (block 0's). */
static inline __attribute__((always_inline)) __m256i dot4_u8s8(__m256i k0, __m256i k1, __m256i k2, __m256i k3, const int8_t *q, const int c) {
    const __m256i x0 = _mm256_loadu_si256((const __m256i *)q);
    const __m256i x1 = c > 1 ? _mm256_loadu_si256((const __m256i *)(q + QB)) : x0;
    const __m256i x2 = c > 2 ? _mm256_loadu_si256((const __m256i *)(q + 2 * QB)) : x0;
    const __m256i x3 = c > 3 ? _mm256_loadu_si256((const __m256i *)(q + 3 * QB)) : x0;
    return dot4_vec(k0, k1, k2, k3, x0, x1, x2, x3);
}

/* Lane masks for the first n (0..8) floats: maskload reads nothing past them (a tail's scales never
 * read past the end of their array, and the lanes left out are zero). */
static const int32_t lane_mask_tab[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
static inline __m256 load_first8(const float *p, int n) { return _mm256_maskload_ps(p, _mm256_loadu_si256((const __m256i *)(lane_mask_tab + 8 - n))); }
static inline __m128 load_first4(const float *p, int n) { return _mm_maskload_ps(p, _mm_loadu_si128((const __m128i *)(lane_mask_tab + 8 - n))); }

/* Bytes p[j..nb) (1..7 of them) in the low bytes of a vector, zeros above, reading nothing outside
 * p[0..nb): the eight bytes that end at nb, shifted down, where the row has eight. */
static inline __m128i tail_bytes(const void *pv, int j, int nb) {
    const uint8_t *p = (const uint8_t *)pv;
    uint64_t v = 0;
    if (nb >= 8) {
        memcpy(&v, p + nb - 8, 8);
        v >>= 8 * (8 - (nb - j));
    } else {
        for (int i = nb - 1; i >= j; i--) v = v << 8 | p[i];
    }
    return _mm_cvtsi64_si128((long long)v);
}

/* Sums of four vectors' lanes, one float each, in a fixed order per vector (pairs, then pairs of
 * pairs, then the halves), whatever the other three are: the tile and one-token epilogues pack
 * their sums differently and get the same floats. */
static inline __m128 hsum4(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif

/* Up to NT_MAX activation rows (tokens) against one weight row at a time: a weight block's codes
 * are unpacked once and used by every token of the tile, which is where batches (prefill, an
 * expert chosen by several tokens) gain. Each token's arithmetic is the same sequence of
 * operations whatever the tile size, so a token's result does not depend on which other tokens
 * shared its tile. */
#define NT_MAX 4
/* Blocks per step of a q2/q4 tile: the offsets' sums (mv) for a step, then its integer loop. */
#define KCH 64
/* Weight rows per work item for a single token (lg_matvec, and row_chunk for lg_moe's and
 * lg_linear's decode): the rows go one at a time (lowbit_rows1_avx2); this only sets how much work
 * a thread takes at once. */
#ifndef ROWS_1TOK
#define ROWS_1TOK 16
#endif

typedef struct {
    const int8_t *q[NT_MAX];
    const float *d[NT_MAX], *s[NT_MAX];
} qrows;

#ifdef __AVX2__
/* The AVX2 tiles. A row's block scales are floats already (row_prep: once per row, not per tile);
 * the integer loop takes blocks four at a time (dot4_u8s8, q8_quad: one convert and one FMA per
 * four blocks and token, by ws[b] * d_t[b] formed four at a time) into two accumulators per token
 * (even and odd quads; q2/q4's partial eight at a row's end as zero-padded quads, q8's blocks
 * past the last quad one by one into the second). q2/q4 go in
 * steps of KCH blocks (the offsets' sums first, vectorised); their accumulators live in memory
 * between steps and in registers within one (the *_step functions load and store them): held in
 * registers across the offsets' loop, the compiler spilled them inside the integer loop. */
typedef struct {
    float v[2][NT_MAX][8];
} tile_acc;

/* A step's accumulators: into registers at its start, back to memory at its end. */
static inline __attribute__((always_inline)) void acc_load(const tile_acc *acc, const int nt, __m256 *a0, __m256 *a1) {
    for (int t = 0; t < nt; t++) {
        a0[t] = _mm256_loadu_ps(acc->v[0][t]);
        a1[t] = _mm256_loadu_ps(acc->v[1][t]);
    }
}

static inline __attribute__((always_inline)) void acc_store(tile_acc *acc, const int nt, const __m256 *a0, const __m256 *a1) {
    for (int t = 0; t < nt; t++) {
        _mm256_storeu_ps(acc->v[0][t], a0[t]);
        _mm256_storeu_ps(acc->v[1][t], a1[t]);
    }
}

static inline __attribute__((always_inline)) __m256i codes_lb(const uint8_t *p, const int bits) { return bits == 4 ? codes_q4(p) : codes_q2(p); }

/* Weight bytes ahead of the quad being read that it asks the cache for: a one-token product streams
 * the weight from memory, and the hardware prefetcher alone left a single thread at ~6.5 GB/s (q8,
 * 14336 x 4096, 1 token: 6.5 -> 9 GB/s with it). Past a row's end it fetches the next row, which
 * follows in memory; a prefetch never faults. */
#define PREFETCH_AHEAD 1024

/* Codes of the first c (1..4) of four blocks at p, zeros for the rest: unpacked here (p: the
 * packed row) or loaded (cu: the row unpacked). Nothing past the c blocks is read. */
#define QUAD_CODES(k, p, cu, bb, bits, c)                                                                                                   \
    const __m256i k##0 = cu ? _mm256_loadu_si256((const __m256i *)(cu)) : codes_lb(p, bits);                                              \
    const __m256i k##1 = c < 2 ? _mm256_setzero_si256() : cu ? _mm256_loadu_si256((const __m256i *)(cu + QB)) : codes_lb(p + bb, bits);         \
    const __m256i k##2 = c < 3 ? _mm256_setzero_si256() : cu ? _mm256_loadu_si256((const __m256i *)(cu + 2 * QB)) : codes_lb(p + 2 * bb, bits); \
    const __m256i k##3 = c < 4 ? _mm256_setzero_si256() : cu ? _mm256_loadu_si256((const __m256i *)(cu + 3 * QB)) : codes_lb(p + 3 * bb, bits)

/* acc[t] += blocks j..j+c-1 (c = 1..4: a row's last quad may be partial, its missing blocks zero
 * codes and zero scales, which adds exactly nothing) of every token of the tile (dot4_u8s8), each
 * block's sum times its weight scale times the token's activation scale (ws[b] * d_t[b], formed
 * here four at a time). Codes from the packed row p, unpacked once for the tile (a single tile:
 * decode), or from cu, the row unpacked once for all its tiles (lowbit_scales; then loaded per
 * token, which keeps the accumulators in registers). The same integers and floats either way. */
static inline __attribute__((always_inline)) void lowbit_quad(const uint8_t *p, const uint8_t *cu, const float *ws, int j, const int c, const int8_t *const *xq,
                                                               const float *const *xd, const int nt, const int bits, __m256 *acc) {
    const size_t bb = QB * bits / 8;
#define QUAD_SCALE(v, c) (c == 4 ? _mm256_broadcast_ps((const __m128 *)(v)) : _mm256_set_m128(load_first4(v, c), load_first4(v, c)))
    const __m256 w4 = QUAD_SCALE(ws + j, c);
    if (cu) {
        for (int t = 0; t < nt; t++) {
            QUAD_CODES(k, p, cu, bb, bits, c);
            const __m256 d4 = _mm256_mul_ps(w4, QUAD_SCALE(xd[t] + j, c));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4_u8s8(k0, k1, k2, k3, xq[t] + (size_t)j * QB, c)), d4, acc[t]);
        }
    } else {
        _mm_prefetch((const char *)(p + PREFETCH_AHEAD), _MM_HINT_T0);
        QUAD_CODES(k, p, (const uint8_t *)NULL, bb, bits, c);
        for (int t = 0; t < nt; t++) {
            const __m256 d4 = _mm256_mul_ps(w4, QUAD_SCALE(xd[t] + j, c));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4_u8s8(k0, k1, k2, k3, xq[t] + (size_t)j * QB, c)), d4, acc[t]);
        }
    }
#undef QUAD_SCALE
}

/* Blocks eight at a time, the first quad of each eight into the first accumulator, the second
 * into the second; a step's last eight may be partial (1..7 blocks: its quads partial or the
 * second absent). The same sequence for every token whatever nt is. r, cu, ws, xq, xd: at the
 * step's first block. */
static inline __attribute__((always_inline)) void lowbit_step(const uint8_t *r, const uint8_t *cu, const float *ws, int nb, const int8_t *const *xq,
                                                               const float *const *xd, const int nt, const int bits, tile_acc *acc) {
    const size_t bb = QB * bits / 8;
    __m256 a0[NT_MAX], a1[NT_MAX];
    acc_load(acc, nt, a0, a1);
    int j = 0;
    for (; j + 8 <= nb; j += 8) {
        lowbit_quad(r + j * bb, cu ? cu + j * QB : NULL, ws, j, 4, xq, xd, nt, bits, a0);
        lowbit_quad(r + (j + 4) * bb, cu ? cu + (j + 4) * QB : NULL, ws, j + 4, 4, xq, xd, nt, bits, a1);
    }
    const int tl = nb - j;
    if (tl > 0) {
        const uint8_t *p = r + j * bb, *c = cu ? cu + j * QB : NULL;
        switch (tl < 4 ? tl : 4) {
        case 1: lowbit_quad(p, c, ws, j, 1, xq, xd, nt, bits, a0); break;
        case 2: lowbit_quad(p, c, ws, j, 2, xq, xd, nt, bits, a0); break;
        case 3: lowbit_quad(p, c, ws, j, 3, xq, xd, nt, bits, a0); break;
        default: lowbit_quad(p, c, ws, j, 4, xq, xd, nt, bits, a0);
        }
        p += 4 * bb;
        c = cu ? c + 4 * QB : NULL;
        switch (tl - 4) {
        case 1: lowbit_quad(p, c, ws, j + 4, 1, xq, xd, nt, bits, a1); break;
        case 2: lowbit_quad(p, c, ws, j + 4, 2, xq, xd, nt, bits, a1); break;
        case 3: lowbit_quad(p, c, ws, j + 4, 3, xq, xd, nt, bits, a1); break;
        default: break;
        }
    }
    acc_store(acc, nt, a0, a1);
}

/* A q2/q4 row's group parameters for every block b, as floats: ws[b] = s0 * 2^((scode - 255) / 16),
 * mw[b] = mcode. Computed once per row and read by every tile of tokens that meets the row (the
 * scale decode per tile was a fifth of a prefill tile's time). scale8 gives scale_lut's floats, so
 * the vector and scalar parts agree. With cu, the row's codes unpacked too (QB bytes per block),
 * for rows that several tiles meet. */
static void lowbit_scales(const lg_qtensor *w, int n, float *ws, float *mw, uint8_t *cu) {
    const int nblocks = w->k / QB, ng = w->k / w->group, gshift = __builtin_ctz((unsigned)(w->group / QB));
    const uint8_t *sc = w->gs + (size_t)n * ng;
    const int8_t *mc = w->gm + (size_t)n * ng;
    const float s0 = w->rowf[2 * (size_t)n];
    int j = 0;
    if (gshift == 0) {
        const __m256 s0v = _mm256_set1_ps(s0);
        for (; j + 8 <= nblocks; j += 8) {
            _mm256_storeu_ps(ws + j, _mm256_mul_ps(s0v, scale8(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sc + j))))));
            _mm256_storeu_ps(mw + j, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(mc + j)))));
        }
    }
    for (; j < nblocks; j++) {
        ws[j] = s0 * scale_lut[sc[j >> gshift]];
        mw[j] = (float)mc[j >> gshift];
    }
    if (cu) {
        const size_t bb = QB * w->bits / 8;
        const uint8_t *row = w->data + (size_t)n * nblocks * bb;
        for (int b = 0; b < nblocks; b++) _mm256_storeu_si256((__m256i *)(cu + (size_t)b * QB), codes_lb(row + b * bb, w->bits));
    }
}

/* The row's dot with nt tokens: per step, each block's scale times each token's (dts) and the
 * offsets' sum (mv: eight lanes, a partial eight's missing lanes zero), then the integer loop; at
 * the end the lanes summed by hsum4 (the accumulators' and the offsets' sums of two tokens at a
 * time). ws / mw: lowbit_scales of the row. */
static inline __attribute__((always_inline)) void lowbit_tile_avx2(const uint8_t *row, const uint8_t *cu, const float *ws, const float *mw, float m0,
                                                                    int nblocks, const qrows *x, const int nt, const int bits, float *out) {
    const size_t blk_bytes = QB * bits / 8;
    tile_acc acc;
    __m256 mv[NT_MAX];
    memset(&acc, 0, sizeof acc);
    for (int t = 0; t < nt; t++) mv[t] = _mm256_setzero_ps();
    for (int c0 = 0; c0 < nblocks; c0 += KCH) {
        const int nb = nblocks - c0 < KCH ? nblocks - c0 : KCH;
        int j = 0;
        for (; j + 8 <= nb; j += 8) {
            const __m256 m = _mm256_loadu_ps(mw + c0 + j);
            for (int t = 0; t < nt; t++) mv[t] = _mm256_fmadd_ps(m, _mm256_loadu_ps(x->s[t] + c0 + j), mv[t]);
        }
        if (j < nb) {
            const __m256 m = load_first8(mw + c0 + j, nb - j);
            for (int t = 0; t < nt; t++) mv[t] = _mm256_fmadd_ps(m, load_first8(x->s[t] + c0 + j, nb - j), mv[t]);
        }
        const int8_t *xq[NT_MAX];
        const float *xd[NT_MAX];
        for (int t = 0; t < nt; t++) {
            xq[t] = x->q[t] + (size_t)c0 * QB;
            xd[t] = x->d[t] + c0;
        }
        lowbit_step(row + (size_t)c0 * blk_bytes, cu ? cu + (size_t)c0 * QB : NULL, ws + c0, nb, xq, xd, nt, bits, &acc);
    }
    for (int t = 0; t < nt; t += 2) {
        const __m256 s0 = _mm256_add_ps(_mm256_loadu_ps(acc.v[0][t]), _mm256_loadu_ps(acc.v[1][t]));
        const __m256 s1 = t + 1 < nt ? _mm256_add_ps(_mm256_loadu_ps(acc.v[0][t + 1]), _mm256_loadu_ps(acc.v[1][t + 1])) : s0;
        float h[4];
        _mm_storeu_ps(h, hsum4(s0, mv[t], s1, t + 1 < nt ? mv[t + 1] : mv[t]));
        out[t] = h[0] + m0 * h[1];
        if (t + 1 < nt) out[t + 1] = h[2] + m0 * h[3];
    }
}

/* One eight of a one-token row (lowbit_rows1_avx2): c = 1..8 blocks from j, the rest as zeros.
 * sc8 / mc8: the eight's scale and offset codes; xs8, xd8: the token's sums and scales (zero past
 * c). The same products as lowbit_tile_avx2's: ws[b] * d[b] eight in one multiply, then each half
 * broadcast to both lanes of its quad. */
static inline __attribute__((always_inline)) void rows1_eight(const uint8_t *p, __m128i sc8, __m128i mc8, __m256 s0v, __m256 xs8, __m256 xd8, const int8_t *q,
                                                               const int c, const int bits, __m256 *a0, __m256 *a1, __m256 *mv) {
    const size_t bb = QB * bits / 8;
    const __m256 ws8 = _mm256_mul_ps(s0v, scale8(_mm256_cvtepu8_epi32(sc8)));
    *mv = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(mc8)), xs8, *mv);
    const __m256 d8 = _mm256_mul_ps(ws8, xd8);
    const int c0 = c < 4 ? c : 4;
    QUAD_CODES(k, p, (const uint8_t *)NULL, bb, bits, c0);
    *a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4_u8s8(k0, k1, k2, k3, q, c0)), _mm256_permute2f128_ps(d8, d8, 0x00), *a0);
    if (c > 4) {
        QUAD_CODES(h, p + 4 * bb, (const uint8_t *)NULL, bb, bits, c - 4);
        *a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4_u8s8(h0, h1, h2, h3, q + 4 * QB, c - 4)), _mm256_permute2f128_ps(d8, d8, 0x11), *a1);
    }
}

/* One token against one q2/q4 row of group-32 blocks (decode), everything in registers: the block
 * scales decoded eight at a time as they are needed (no row_prep pass through memory, no
 * accumulators stored between steps). The same floats as lowbit_tile_avx2 with nt = 1: the same
 * products ws[b] * d[b], eights of blocks from the row's start (a step of KCH blocks is a multiple
 * of eight, so its eights fall the same), the last one partial with zeros past the row's end (its
 * codes read without passing it: tail_bytes), the offsets' FMA over the same eights, and the same
 * final sums (hsum4). (Rows interleaved two or four at a time were no faster once the tail and the
 * sums were vectorised: the compiler kept their accumulators in memory.) */
static inline __attribute__((always_inline)) float lowbit_rows1_avx2(const lg_qtensor *w, int n, const int8_t *xq, const float *xd, const float *xs,
                                                                      const int bits) {
    const int nblocks = w->k / QB;
    const size_t bb = QB * bits / 8;
    const uint8_t *row = w->data + (size_t)n * nblocks * bb, *sc = w->gs + (size_t)n * nblocks;
    const int8_t *mc = w->gm + (size_t)n * nblocks;
    const __m256 s0v = _mm256_set1_ps(w->rowf[2 * (size_t)n]);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, mv = a0;
    int j = 0;
    for (; j + 8 <= nblocks; j += 8) {
        const uint8_t *p = row + (size_t)j * bb;
        _mm_prefetch((const char *)(p + PREFETCH_AHEAD), _MM_HINT_T0); /* past the row's end: the next row's, which follows */
        if (bits == 4) _mm_prefetch((const char *)(p + PREFETCH_AHEAD + 4 * bb), _MM_HINT_T0);
        rows1_eight(p, _mm_loadl_epi64((const __m128i *)(sc + j)), _mm_loadl_epi64((const __m128i *)(mc + j)), s0v, _mm256_loadu_ps(xs + j),
                    _mm256_loadu_ps(xd + j), xq + (size_t)j * QB, 8, bits, &a0, &a1, &mv);
    }
    const int tl = nblocks - j;
    if (tl > 0)
        rows1_eight(row + (size_t)j * bb, tail_bytes(sc, j, nblocks), tail_bytes(mc, j, nblocks), s0v, load_first8(xs + j, tl), load_first8(xd + j, tl),
                    xq + (size_t)j * QB, tl, bits, &a0, &a1, &mv);
    float h[4];
    const __m256 acc = _mm256_add_ps(a0, a1);
    _mm_storeu_ps(h, hsum4(acc, mv, acc, mv));
    return h[0] + w->rowf[2 * (size_t)n + 1] / 127.0f * h[1];
}

/* One q8 block's dot: |w| (aw) in the unsigned operand, w's sign moved onto the activations. */
static inline __m256i q8_dot(__m256i aw, __m256i w, const int8_t *q) {
    return dot_u8s8(aw, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)q), w));
}

/* The codes of blocks j..j+c-1 of a q8 row (c = 1..4, zeros past c, nothing past them read) and their
 * absolute values, once for all the tokens that meet them. */
#define Q8_QUAD_CODES(rw, j, c)                                                                                        \
    const __m256i w0 = _mm256_loadu_si256((const __m256i *)((rw) + (size_t)(j) * QB));                                 \
    const __m256i w1 = c > 1 ? _mm256_loadu_si256((const __m256i *)((rw) + (size_t)((j) + 1) * QB)) : _mm256_setzero_si256(); \
    const __m256i w2 = c > 2 ? _mm256_loadu_si256((const __m256i *)((rw) + (size_t)((j) + 2) * QB)) : _mm256_setzero_si256(); \
    const __m256i w3 = c > 3 ? _mm256_loadu_si256((const __m256i *)((rw) + (size_t)((j) + 3) * QB)) : _mm256_setzero_si256(); \
    const __m256i aw0 = _mm256_sign_epi8(w0, w0), aw1 = _mm256_sign_epi8(w1, w1), aw2 = _mm256_sign_epi8(w2, w2), aw3 = _mm256_sign_epi8(w3, w3)

/* Four q8 blocks' int32 sums against the activations at q in one vector by two rounds of hadd (the
 * lowbit quads' lane order; q8's int16 pairs leave no room to add them earlier). Past c the codes
 * are zero, so any activation bytes do there: block 0's. */
#define Q8_SUM4(q, c)                                                                                                    \
    _mm256_hadd_epi32(_mm256_hadd_epi32(q8_dot(aw0, w0, q), q8_dot(aw1, w1, c > 1 ? (q) + QB : (q))),                     \
                      _mm256_hadd_epi32(q8_dot(aw2, w2, c > 2 ? (q) + 2 * QB : (q)), q8_dot(aw3, w3, c > 3 ? (q) + 3 * QB : (q))))

/* acc[t] += blocks j..j+c-1 (c = 1..4; missing blocks zero codes and zero scales, exactly nothing)
 * of every token of the tile: one convert and one FMA per four blocks and token, by ws[b] * d_t[b]
 * formed here. */
static inline __attribute__((always_inline)) void q8_quad(const int8_t *rw, const float *ws, int j, const int c, const int8_t *const *xq,
                                                           const float *const *xd, const int nt, __m256 *acc) {
    Q8_QUAD_CODES(rw, j, c);
    const __m256 w4 = c == 4 ? _mm256_broadcast_ps((const __m128 *)(ws + j)) : _mm256_set_m128(load_first4(ws + j, c), load_first4(ws + j, c));
    _mm_prefetch((const char *)(rw + (size_t)j * QB + PREFETCH_AHEAD), _MM_HINT_T0);
    _mm_prefetch((const char *)(rw + (size_t)j * QB + PREFETCH_AHEAD + 64), _MM_HINT_T0);
    for (int t = 0; t < nt; t++) {
        const int8_t *q = xq[t] + (size_t)j * QB;
        const __m256 d4 = c == 4 ? _mm256_broadcast_ps((const __m128 *)(xd[t] + j)) : _mm256_set_m128(load_first4(xd[t] + j, c), load_first4(xd[t] + j, c));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(Q8_SUM4(q, c)), _mm256_mul_ps(w4, d4), acc[t]);
    }
}

/* q8: |w| rides in the unsigned operand, its sign moves onto the activation (sign_epi8), as
 * llama.cpp's q8 dots do. The whole row in one pass, blocks four at a time, the last quad
 * zero-padded, one accumulator per token in registers (two per token, as the q2/q4 tiles keep,
 * were spilled at four tokens). ws: q8_scales of the row. */
static inline __attribute__((always_inline)) void q8_tile_avx2(const int8_t *rw, const float *ws, int nb, const qrows *x, const int nt, float *out) {
    __m256 a[NT_MAX];
    for (int t = 0; t < nt; t++) a[t] = _mm256_setzero_ps();
    const int8_t *const *xq = x->q;
    const float *const *xd = x->d;
    int j = 0;
    for (; j + 4 <= nb; j += 4) q8_quad(rw, ws, j, 4, xq, xd, nt, a);
    switch (nb - j) {
    case 1: q8_quad(rw, ws, j, 1, xq, xd, nt, a); break;
    case 2: q8_quad(rw, ws, j, 2, xq, xd, nt, a); break;
    case 3: q8_quad(rw, ws, j, 3, xq, xd, nt, a); break;
    default: break;
    }
    for (int t = 0; t < nt; t++) out[t] = hsum256(a[t]);
}

#ifdef __F16C__
/* One token's quad for q8_rows1_avx2: acc += blocks j..j+c-1 times d4 (their ws[b] * d[b]). */
static inline __attribute__((always_inline)) __m256 q8_quad1(const int8_t *rw, int j, const int c, const int8_t *xq, __m256 d4, __m256 acc) {
    Q8_QUAD_CODES(rw, j, c);
    const int8_t *q = xq + (size_t)j * QB;
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(Q8_SUM4(q, c)), d4, acc);
}

/* One token against one q8 row of group-32 blocks (decode): q8_tile_avx2's floats with nt = 1 (the
 * same products ws[b] * d[b], here eight in one multiply and each half broadcast to its quad; the
 * same quads into one accumulator, the last zero-padded), the block scales converted eight at a
 * time in registers instead of by q8_scales' pass through memory (the tail's as q8_scales does
 * them: the same floats). */
static inline __attribute__((always_inline)) float q8_rows1_avx2(const lg_qtensor *w, int n, const int8_t *xq, const float *xd) {
    const int nb = w->k / QB;
    const int8_t *rw = (const int8_t *)w->data + (size_t)n * w->k;
    const uint16_t *gsc = (const uint16_t *)w->gs + (size_t)n * nb;
    const float r = w->rowf[n];
    const __m256 rv = _mm256_set1_ps(r);
    __m256 acc = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= nb; j += 8) {
        _mm_prefetch((const char *)(rw + (size_t)j * QB + PREFETCH_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(rw + (size_t)j * QB + PREFETCH_AHEAD + 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(rw + (size_t)j * QB + PREFETCH_AHEAD + 128), _MM_HINT_T0);
        _mm_prefetch((const char *)(rw + (size_t)j * QB + PREFETCH_AHEAD + 192), _MM_HINT_T0);
        const __m256 d8 = _mm256_mul_ps(_mm256_mul_ps(rv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gsc + j)))), _mm256_loadu_ps(xd + j));
        acc = q8_quad1(rw, j, 4, xq, _mm256_permute2f128_ps(d8, d8, 0x00), acc);
        acc = q8_quad1(rw, j + 4, 4, xq, _mm256_permute2f128_ps(d8, d8, 0x11), acc);
    }
    const int c = nb - j;
    if (c > 0) {
        float ws[8] = {0};
        for (int b = 0; b < c; b++) ws[b] = r * half_to_float(gsc[j + b]);
        const __m256 d8 = _mm256_mul_ps(_mm256_loadu_ps(ws), load_first8(xd + j, c));
        const __m256 lo = _mm256_permute2f128_ps(d8, d8, 0x00), hi = _mm256_permute2f128_ps(d8, d8, 0x11);
        switch (c) {
        case 1: acc = q8_quad1(rw, j, 1, xq, lo, acc); break;
        case 2: acc = q8_quad1(rw, j, 2, xq, lo, acc); break;
        case 3: acc = q8_quad1(rw, j, 3, xq, lo, acc); break;
        default:
            acc = q8_quad1(rw, j, 4, xq, lo, acc);
            if (c == 5) acc = q8_quad1(rw, j + 4, 1, xq, hi, acc);
            else if (c == 6) acc = q8_quad1(rw, j + 4, 2, xq, hi, acc);
            else if (c == 7) acc = q8_quad1(rw, j + 4, 3, xq, hi, acc);
        }
    }
    return hsum256(acc);
}
#endif

/* A q8 row's scale for every block b as a float: ws[b] = rowf * gscale (fp16, eight at a time with
 * F16C; the same floats as half_to_float). Once per row, as lowbit_scales. */
static void q8_scales(const lg_qtensor *w, int n, float *ws) {
    const int nblocks = w->k / QB, ng = w->k / w->group, gshift = __builtin_ctz((unsigned)(w->group / QB));
    const uint16_t *gsc = (const uint16_t *)w->gs + (size_t)n * ng;
    const float r = w->rowf[n];
    int j = 0;
#ifdef __F16C__
    if (gshift == 0) {
        const __m256 rv = _mm256_set1_ps(r);
        for (; j + 8 <= nblocks; j += 8) _mm256_storeu_ps(ws + j, _mm256_mul_ps(rv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gsc + j)))));
    }
#endif
    for (; j < nblocks; j++) ws[j] = r * half_to_float(gsc[j >> gshift]);
}
#endif

#ifndef __AVX2__
/* The portable path. dot(row n of w, one quantized activation row) for q2 / q4:
 * sum_g s_g * sum(c x) + m_g * sum(x), x rounded. */
static float dot_lowbit_scalar(const lg_qtensor *w, int n, const int8_t *xq, const float *xd, const float *xs) {
    const int K = w->k, G = w->group, ng = K / G, bpg = G / QB, bits = w->bits;
    const uint8_t *row = w->data + (size_t)n * ((size_t)K * bits / 8);
    const uint8_t *sc = w->gs + (size_t)n * ng;
    const int8_t *mc = w->gm + (size_t)n * ng;
    const float s0 = w->rowf[2 * (size_t)n], m0 = w->rowf[2 * (size_t)n + 1] / 127.0f;
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
}

static float dot_q8_scalar(const lg_qtensor *w, int n, const int8_t *xq, const float *xd) {
    const int K = w->k, G = w->group, ng = K / G, bpg = G / QB;
    const int8_t *row = (const int8_t *)w->data + (size_t)n * K;
    const uint16_t *gsc = (const uint16_t *)w->gs + (size_t)n * ng;
    const float r = w->rowf[n];
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
}
#endif

#ifdef __AVX2__
#define TILE_CASES(F, ...) \
    switch (nt) { case 1: F(__VA_ARGS__, 1); break; case 2: F(__VA_ARGS__, 2); break; case 3: F(__VA_ARGS__, 3); break; default: F(__VA_ARGS__, 4); }
#endif

/* Scratch for a row's expanded block parameters (row_prep), in floats: 2 per block of k, then the
 * unpacked codes (k bytes). */
#define ROW_SCRATCH(k) (2 * ((k) / QB) + (k) / 4)

/* What dot_rows needs of row n before the `tokens` tokens meet it, into rs (ROW_SCRATCH(w->k)
 * floats): q2/q4's block scales and offsets (lowbit_scales), and where more than one tile will meet
 * the row its unpacked codes, whose address it returns (NULL otherwise: one tile unpacks as it
 * goes, cheaper there); nothing for a single token of a group-32 q2/q4 row (lowbit_rows1_avx2
 * decodes its scales in registers); q8's block scales (q8_scales); nothing on the portable path.
 * Once per row, however many tiles of tokens follow. */
static inline const uint8_t *row_prep(const lg_qtensor *w, int n, float *rs, int tokens) {
    const int tiles = (tokens + NT_MAX - 1) / NT_MAX;
#ifdef __AVX2__
    if (w->bits != 8) {
        if (tokens == 1 && w->group == QB) return NULL; /* one token: lowbit_rows1_avx2 decodes the scales as it goes */
        uint8_t *cu = tiles > 1 ? (uint8_t *)(rs + 2 * (w->k / QB)) : NULL;
        lowbit_scales(w, n, rs, rs + w->k / QB, cu);
        return cu;
    }
    q8_scales(w, n, rs);
#else
    (void)rs; (void)tiles; (void)tokens;
#endif
    (void)w; (void)n;
    return NULL;
}

/* out[t] = dot(row n of w, activation row t) for the nt <= NT_MAX rows of x; rs, cu: row_prep of row n.
 * (Block scales are expanded per block by row_prep, a block's group found by a shift: groups are
 * 32 to 256 weights, powers of two; a division per block cost the 1408-wide expert rows a quarter
 * of their time.) */
static void dot_rows(const lg_qtensor *w, int n, int nt, const qrows *x, const float *rs, const uint8_t *cu, float *out) {
    const int K = w->k;
#ifdef __AVX2__
    if (w->bits == 8) {
        const int8_t *row = (const int8_t *)w->data + (size_t)n * K;
#define Q8_CALL(dummy, nt_) q8_tile_avx2(row, rs, K / QB, x, nt_, out)
        TILE_CASES(Q8_CALL, 0)
    } else {
        const uint8_t *row = w->data + (size_t)n * ((size_t)K * w->bits / 8);
        const float m0 = w->rowf[2 * (size_t)n + 1] / 127.0f;
        if (nt == 1 && !cu && w->group == QB) {
            out[0] = w->bits == 4 ? lowbit_rows1_avx2(w, n, x->q[0], x->d[0], x->s[0], 4) : lowbit_rows1_avx2(w, n, x->q[0], x->d[0], x->s[0], 2);
            return;
        }
#define LB_CALL(bits_, nt_) lowbit_tile_avx2(row, cu, rs, rs + K / QB, m0, K / QB, x, nt_, bits_, out)
        if (w->bits == 4) { TILE_CASES(LB_CALL, 4) }
        else { TILE_CASES(LB_CALL, 2) }
    }
#else
    (void)rs; (void)cu; (void)K;
    for (int t = 0; t < nt; t++)
        out[t] = w->bits == 8 ? dot_q8_scalar(w, n, x->q[t], x->d[t]) : dot_lowbit_scalar(w, n, x->q[t], x->d[t], x->s[t]);
#endif
}

static inline float dot_row(const lg_qtensor *w, int n, const int8_t *xq, const float *xd, const float *xs) {
    const qrows x = {{xq}, {xd}, {xs}};
    float out, rs[ROW_SCRATCH(w->k)];
    dot_rows(w, n, 1, &x, rs, row_prep(w, n, rs, 1), &out);
    return out;
}

int lg_qact_alloc(qact *a, size_t rows, int k) {
    a->q = malloc(rows * (size_t)k);
    a->d = malloc(rows * (size_t)(k / QB) * sizeof(float));
    a->s = malloc(rows * (size_t)(k / QB) * sizeof(float));
    return a->q && a->d && a->s;
}

void lg_qact_free(qact *a) {
    free(a->q);
    free(a->d);
    free(a->s);
}

#define QROW(a, r, k) ((a)->q + (size_t)(r) * (k)), ((a)->d + (size_t)(r) * ((k) / QB)), ((a)->s + (size_t)(r) * ((k) / QB))

/* Point tile slot j at activation row r of a (rows of k values). */
static inline void tile_set(qrows *x, int j, const qact *a, size_t r, int k) {
    x->q[j] = a->q + r * (size_t)k;
    x->d[j] = a->d + r * (size_t)(k / QB);
    x->s[j] = a->s + r * (size_t)(k / QB);
}

/* out[n - n1] = dot(row n of w, one token) for n in [n1, n2) by lowbit_rows1_avx2 or q8_rows1_avx2.
 * Returns 0, doing nothing, where they do not apply (groups other than 32, no AVX2): the caller
 * takes the tile path; n1 == n2 asks only that. The same floats as the tiles either way. */
static inline __attribute__((always_inline)) int rows_1tok(const lg_qtensor *w, int n1, int n2, const int8_t *q, const float *d, const float *sv, float *out) {
#ifdef __AVX2__
    if (w->group != QB) return 0;
    if (w->bits == 8) {
#ifdef __F16C__
        for (int n = n1; n < n2; n++) out[n - n1] = q8_rows1_avx2(w, n, q, d);
        return 1;
#else
        return 0;
#endif
    }
    if (w->bits == 4)
        for (int n = n1; n < n2; n++) out[n - n1] = lowbit_rows1_avx2(w, n, q, d, sv, 4);
    else
        for (int n = n1; n < n2; n++) out[n - n1] = lowbit_rows1_avx2(w, n, q, d, sv, 2);
    return 1;
#else
    (void)w; (void)n1; (void)n2; (void)q; (void)d; (void)sv; (void)out;
    return 0;
#endif
}

/* Weight rows per work item of lg_linear and lg_moe: each token tile meets the item's rows in
 * turn, so its activations stay in L1 and the rows' prepared scales and codes (row_prep, ~64 KiB
 * for them all) in L2, instead of every tile's activations streaming from L2 for each row (q4,
 * 128 tokens: K = 4096 +4-8%, K = 1408 +13%). One row for a tile of 2-4 tokens; ROWS_1TOK for a
 * single token (decode: nothing to reuse, but 2-row items cost K = 352 rows ~10% in their calls). */
#define ROW_CHUNK_MAX 16
_Static_assert(ROWS_1TOK <= ROW_CHUNK_MAX, "dot_pairs and lg_linear hold a work item's one-token outputs in ROW_CHUNK_MAX floats");

/* Whether T tokens meet the rows through rows_1tok, one token at a time: a single token, and rows of
 * at most SMALL_K weights meeting 2..NT_MAX tokens (over a work item's
 * ROWS_1TOK rows, which stay in L1 for the next token) instead of in a tile: on short rows the
 * tile's per-row preparation (row_prep) and per-token sums cost more than the codes it shares save.
 * The same floats either way (rows_1tok gives the tile's numbers). Zen 4, 1 thread, one call of
 * 2 / 3 / 4 tokens against one token's time, tile -> rows: 8192 x 256 q8 3.17x / 3.94x / 4.62x ->
 * 1.79x / 2.56x / 3.28x (q4, q2 alike); 4096 x 512 q4 2.44x / 3.33x / 3.94x -> 1.83x / 2.61x / 3.38x;
 * 2048 x 1024 q4 2.05x / 2.63x / 3.23x -> 1.80x / 2.58x / 3.35x; at K = 1536-5120 the tile is as fast
 * or faster (4 tokens: up to 10%), so it keeps those. A verification step of the q4 default model
 * (layers and lm_head): 2 tokens 2.33x -> 1.71x a one-token step, 4 tokens 3.69x -> 2.97x. */
#define SMALL_K 1024
static inline int by_token_rows(const lg_qtensor *w, int T) {
    return (T == 1 || (T <= NT_MAX && w->k <= SMALL_K)) && rows_1tok(w, 0, 0, NULL, NULL, NULL, NULL);
}

static inline int row_chunk(const lg_qtensor *w, int k, int T) {
    if (T == 1 || by_token_rows(w, T)) return ROWS_1TOK;
    if (T <= NT_MAX) return 1;
    const int r = (int)((64u << 10) / (unsigned)(ROW_SCRATCH(k) * sizeof(float)));
    return r < 1 ? 1 : r > ROW_CHUNK_MAX ? ROW_CHUNK_MAX : r;
}

/* out[i * stride + n] = dot(row n of w, activation row r(i)) for rows n in [n1, n2) and pairs i in
 * [first, last), tokens NT_MAX at a time, each tile against each row in turn (lg_linear's order);
 * r(i) = order[i] / k with an order (the gate projection reads the pair's token), else i (the down
 * projection reads the pair's own row). rs: (n2 - n1) x rsz floats, rsz >= ROW_SCRATCH(kdim). */
static void dot_pairs(const lg_qtensor *w, int n1, int n2, const qact *a, int kdim, int first, int last, const int *order, int k,
                      float *rs, size_t rsz, float *out, size_t stride) {
    const uint8_t *cu[ROW_CHUNK_MAX];
    float o1[ROW_CHUNK_MAX];
    if (by_token_rows(w, last - first)) {
        for (int i = first; i < last; i++) {
            rows_1tok(w, n1, n2, QROW(a, order ? order[i] / k : i, kdim), o1);
            for (int n = n1; n < n2; n++) out[(size_t)i * stride + n] = o1[n - n1];
        }
        return;
    }
    for (int n = n1; n < n2; n++) cu[n - n1] = row_prep(w, n, rs + (size_t)(n - n1) * rsz, last - first);
    for (int i0 = first; i0 < last; i0 += NT_MAX) {
        const int nt = last - i0 < NT_MAX ? last - i0 : NT_MAX;
        qrows xr;
        for (int j = 0; j < nt; j++) tile_set(&xr, j, a, (size_t)(order ? order[i0 + j] / k : i0 + j), kdim);
        for (int n = n1; n < n2; n++) {
            float o[NT_MAX];
            dot_rows(w, n, nt, &xr, rs + (size_t)(n - n1) * rsz, cu[n - n1], o);
            for (int j = 0; j < nt; j++) out[(size_t)(i0 + j) * stride + n] = o[j];
        }
    }
}

/* Tokens per pass over the weight in lg_linear: their quantized rows (~256 KiB) stay in L2 while
 * every weight row meets them, instead of all T rows streaming through the cache for each row.
 * (128 KiB made wide rows, K = 12288, pass over the weight from memory every 8 tokens: 7-13%
 * slower there; 256 KiB still fits a 512 KiB L2 with the weight rows passing through.) */
static inline int token_block(int k) {
    const int tb = (int)((256u << 10) / (unsigned)(k > 0 ? k : 1)) & ~(NT_MAX - 1);
    return tb < NT_MAX ? NT_MAX : tb;
}

/* y[t, n] = x[t] . w[n] (+ bias[n]) for t < T: a quantized linear layer; x and y of dtype 0 (fp32)
 * or 1 (bf16), bias fp32. Rows are quantized in parallel, then the work items are (token block,
 * chunk of weight rows), token-block-major, each running its block's tokens NT_MAX at a time
 * through the tile against each of its rows; a token's result is the same whatever the blocking.
 * Returns 0, or -1 when out of memory. */
int lg_linear(const lg_qtensor *w, int T, const void *x, int x_dtype, const float *bias, void *y, int y_dtype, int nth) {
    const int K = w->k, N = w->n, TB = token_block(K), nblk = (T + TB - 1) / TB;
    qact a = {0};
    float *xf = x_dtype == 0 ? NULL : malloc((size_t)T * K * sizeof(float));
    if ((x_dtype != 0 && !xf) || !lg_qact_alloc(&a, T, K)) {
        free(xf);
        lg_qact_free(&a);
        return -1;
    }
    const int par = nth > 1 && (size_t)N * K * T >= (1u << 16);
    const int R = row_chunk(w, K, T), nrc = (N + R - 1) / R, nthr = par ? nth : 1;
    const size_t rsz = ROW_SCRATCH(K);
    float *scratch = malloc((size_t)nthr * R * rsz * sizeof(float));
    if (!scratch) {
        free(xf);
        lg_qact_free(&a);
        return -1;
    }
    const long items = (long)nblk * nrc;
#pragma omp parallel num_threads(nth) if (par)
    {
#pragma omp for schedule(dynamic, lg_chunk(T, nth))
        for (int t = 0; t < T; t++) {
            const float *row = (const float *)x + (size_t)t * K;
            if (xf) {
                load_row(x, x_dtype, (size_t)t * K, K, xf + (size_t)t * K);
                row = xf + (size_t)t * K;
            }
            quantize_row(row, K, w->bits, QROW(&a, t, K));
        }
        float *rs = scratch + (size_t)(par ? omp_get_thread_num() : 0) * R * rsz;
        const uint8_t *cu[ROW_CHUNK_MAX];
        float o1[ROW_CHUNK_MAX];
#pragma omp for schedule(dynamic, lg_chunk(items, nth))
        for (long it = 0; it < items; it++) {
            const int n1 = (int)(it % nrc) * R, n2 = n1 + R < N ? n1 + R : N, t1 = (int)(it / nrc) * TB, t2 = t1 + TB < T ? t1 + TB : T;
            if (by_token_rows(w, t2 - t1)) {
                for (int t = t1; t < t2; t++) {
                    rows_1tok(w, n1, n2, QROW(&a, t, K), o1);
                    for (int n = n1; n < n2; n++) store(y, y_dtype, (size_t)t * N + n, o1[n - n1] + (bias ? bias[n] : 0.0f));
                }
                continue;
            }
            for (int n = n1; n < n2; n++) cu[n - n1] = row_prep(w, n, rs + (size_t)(n - n1) * rsz, t2 - t1);
            for (int t0 = t1; t0 < t2; t0 += NT_MAX) {
                const int nt = t2 - t0 < NT_MAX ? t2 - t0 : NT_MAX;
                qrows xr;
                for (int j = 0; j < nt; j++) tile_set(&xr, j, &a, (size_t)(t0 + j), K);
                for (int n = n1; n < n2; n++) {
                    float o[NT_MAX];
                    const float b = bias ? bias[n] : 0.0f;
                    dot_rows(w, n, nt, &xr, rs + (size_t)(n - n1) * rsz, cu[n - n1], o);
                    for (int j = 0; j < nt; j++) store(y, y_dtype, (size_t)(t0 + j) * N + n, o[j] + b);
                }
            }
        }
    }
    free(scratch);
    free(xf);
    lg_qact_free(&a);
    return 0;
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* One MoE layer's routed experts: out[t] = sum_j wts[t,j] * down_e(silu(gate_e(x_t)) * up_e(x_t)),
 * e = ids[t,j]. gate_up[e] is [2I, H] (gate rows then up rows), down[e] is [H, I], all experts of a
 * layer in the same format. Pairs are grouped by expert so each weight row is read once per call;
 * the sum over a token's experts runs in fp32, in expert order. x and out share `dtype` (0 fp32,
 * 1 bf16). An id of -1 skips its pair (the caller computes it elsewhere: a prompt's busiest experts
 * through the bf16 GEMM); a token whose pairs are all skipped gets zeros. Returns 0, -1 when out of
 * memory, -2 for an expert id outside [0, E) other than -1. */
int lg_moe(int T, int H, int I, const void *x, int dtype, int k, const int64_t *ids, const float *wts,
           const lg_qtensor *gate_up, const lg_qtensor *down, int E, void *out, int nth) {
    const int Pall = T * k, I2 = 2 * I;
    int P = 0; /* the pairs computed here */
    for (int p = 0; p < Pall; p++) {
        if (ids[p] == -1) continue;
        if (ids[p] < 0 || ids[p] >= E) return -2;
        P++;
    }
    if (P == 0) {
        for (size_t i = 0; i < (size_t)T * H; i++) store(out, dtype, i, 0.0f);
        return 0;
    }
    int *cnt = calloc((size_t)E + 1, sizeof(int)), *order = malloc((size_t)P * sizeof(int));
    int *seg_e = malloc((size_t)P * sizeof(int)), *seg_start = malloc(((size_t)P + 1) * sizeof(int));
    float *h1 = malloc((size_t)P * I2 * sizeof(float)), *y = malloc((size_t)P * H * sizeof(float));
    float *xf = malloc((size_t)T * H * sizeof(float));
    qact xa = {0}, ha = {0};
    const int ok = cnt && order && seg_e && seg_start && h1 && y && xf && lg_qact_alloc(&xa, T, H) && lg_qact_alloc(&ha, P, I);
    if (!ok) {
        free(cnt); free(order); free(seg_e); free(seg_start); free(h1); free(y); free(xf);
        lg_qact_free(&xa); lg_qact_free(&ha);
        return -1;
    }
    /* counting sort of the (token, slot) pairs by expert */
    for (int p = 0; p < Pall; p++) cnt[ids[p] + 1] += ids[p] >= 0;
    for (int e = 0; e < E; e++) cnt[e + 1] += cnt[e];
    int S = 0;
    for (int e = 0; e < E; e++)
        if (cnt[e + 1] > cnt[e]) { seg_e[S] = e; seg_start[S++] = cnt[e]; }
    seg_start[S] = P;
    for (int p = 0; p < Pall; p++)
        if (ids[p] >= 0) order[cnt[ids[p]]++] = p;

    const int gbits = gate_up[seg_e[0]].bits, dbits = down[seg_e[0]].bits;
    const int par = nth > 1 && (size_t)P * I * H >= (1u << 15), nthr = par ? nth : 1;
    /* Work items are (expert, chunk of rows) in expert-major order, so each thread streams whole runs
     * of one expert's rows (codes and scales sequentially: what the hardware prefetchers follow);
     * rows per chunk as lg_linear's (row_chunk) for the most tokens an expert has. */
    int most = 0;
    for (int s = 0; s < S; s++) most = seg_start[s + 1] - seg_start[s] > most ? seg_start[s + 1] - seg_start[s] : most;
    const int Rg = row_chunk(&gate_up[seg_e[0]], H, most), Rd = row_chunk(&down[seg_e[0]], I, most), ncg = (I2 + Rg - 1) / Rg, ncd = (H + Rd - 1) / Rd;
    const size_t rsz = ROW_SCRATCH(H > I ? H : I), rper = (size_t)(Rg > Rd ? Rg : Rd) * rsz;
    float *scratch = malloc((size_t)nthr * rper * sizeof(float));
    if (!scratch) {
        free(cnt); free(order); free(seg_e); free(seg_start); free(h1); free(y); free(xf);
        lg_qact_free(&xa); lg_qact_free(&ha);
        return -1;
    }
    const long gate_items = (long)S * ncg, down_items = (long)S * ncd;
#pragma omp parallel num_threads(nth) if (par)
    {
        float *rs = scratch + (size_t)(par ? omp_get_thread_num() : 0) * rper;
#pragma omp for schedule(dynamic, lg_chunk(T, nth))
        for (int t = 0; t < T; t++) {
            load_row(x, dtype, (size_t)t * H, H, xf + (size_t)t * H);
            quantize_row(xf + (size_t)t * H, H, gbits, QROW(&xa, t, H));
        }
#pragma omp for schedule(dynamic, lg_chunk(gate_items, nth))
        for (long it = 0; it < gate_items; it++) {
            const int s = (int)(it / ncg), n1 = (int)(it % ncg) * Rg, n2 = n1 + Rg < I2 ? n1 + Rg : I2;
            dot_pairs(&gate_up[seg_e[s]], n1, n2, &xa, H, seg_start[s], seg_start[s + 1], order, k, rs, rsz, h1, I2);
        }
#pragma omp for schedule(dynamic, lg_chunk(P, nth))
        for (int i = 0; i < P; i++) {
            float *h = h1 + (size_t)i * I2;
            for (int j = 0; j < I; j++) h[j] = silu(h[j]) * h[I + j];
            quantize_row(h, I, dbits, QROW(&ha, i, I));
        }
#pragma omp for schedule(dynamic, lg_chunk(down_items, nth))
        for (long it = 0; it < down_items; it++) {
            const int s = (int)(it / ncd), n1 = (int)(it % ncd) * Rd, n2 = n1 + Rd < H ? n1 + Rd : H;
            dot_pairs(&down[seg_e[s]], n1, n2, &ha, I, seg_start[s], seg_start[s + 1], NULL, 1, rs, rsz, y, H);
        }
        /* out[t] = sum of its pairs' outputs, in expert order (pair i runs in sorted order) */
#pragma omp for schedule(dynamic, lg_chunk(T, nth))
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
    free(cnt); free(order); free(seg_e); free(seg_start); free(h1); free(y); free(xf); free(scratch);
    lg_qact_free(&xa); lg_qact_free(&ha);
    return 0;
}

/* Rows [0, N) of w as fp32 [N, K]: prefill multiplies big batches with a float GEMM instead. */
static void dequant_row(const lg_qtensor *w, int n, float *o) {
    const int K = w->k, G = w->group, ng = K / G, bits = w->bits;
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

void lg_dequant(const lg_qtensor *w, float *out, int nth) {
    const int par = nth > 1 && (size_t)w->n * w->k >= (1u << 16);
#pragma omp parallel for num_threads(nth) schedule(dynamic, lg_chunk(w->n, nth)) if (par)
    for (int n = 0; n < w->n; n++) dequant_row(w, n, out + (size_t)n * w->k);
}

/* dequant_row's floats rounded to bf16 (round to nearest even, as torch's .to(bfloat16)): rows
 * [n0, n1) of w into out [n1 - n0, K]. For prompts on CPUs with a native bf16 GEMM (quant/native.py
 * NativeLinear): the weight goes to bf16 a few hundred rows at a time and torch's GEMM multiplies it,
 * about twice the int8 tiles' rate there. Vectorised: the same products and sums as dequant_row
 * (-ffp-contract=off keeps them two roundings), eight weights at a time. */
#ifdef __AVX2__
/* The 32 codes of a q2/q4 block in natural order (element i: byte i / per, bits (i % per) * bits). */
static inline void block_codes(const uint8_t *p, int bits, __m128i *lo16, __m128i *hi16) {
    if (bits == 4) {
        const __m128i b = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(0x0f);
        const __m128i l = _mm_and_si128(b, m), h = _mm_and_si128(_mm_srli_epi16(b, 4), m);
        *lo16 = _mm_unpacklo_epi8(l, h), *hi16 = _mm_unpackhi_epi8(l, h);
    } else {
        const __m128i b = _mm_loadl_epi64((const __m128i *)p), m = _mm_set1_epi8(0x03);
        const __m128i c0 = _mm_and_si128(b, m), c1 = _mm_and_si128(_mm_srli_epi16(b, 2), m);
        const __m128i c2 = _mm_and_si128(_mm_srli_epi16(b, 4), m), c3 = _mm_and_si128(_mm_srli_epi16(b, 6), m);
        const __m128i p01 = _mm_unpacklo_epi8(c0, c1), p23 = _mm_unpacklo_epi8(c2, c3);
        *lo16 = _mm_unpacklo_epi16(p01, p23), *hi16 = _mm_unpackhi_epi16(p01, p23);
    }
}
#endif

#ifdef __AVX2__
/* One 32-weight block to bf16: q8 codes times s, or q2/q4 codes (lo, hi: 16 each) times s plus m. Sixteen
 * weights a step where the CPU has AVX-512, eight otherwise: the same floats either way. */
static inline void block8_bf16(uint16_t *o, float s, const int8_t *c) {
#if defined(__AVX512F__)
    const __m512 sg = _mm512_set1_ps(s);
    store_bf16x32(o, _mm512_mul_ps(sg, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)c)))),
                  _mm512_mul_ps(sg, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + 16))))));
#else
    const __m256 sg = _mm256_set1_ps(s);
    for (int e = 0; e < QB; e += 8)
        store_bf16x8(o + e, _mm256_mul_ps(sg, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(c + e))))));
#endif
}

static inline void block_lowbit_bf16(uint16_t *o, float s, float m, const __m128i c[2]) {
#if defined(__AVX512F__)
    const __m512 sg = _mm512_set1_ps(s), mg = _mm512_set1_ps(m);
    store_bf16x32(o, _mm512_add_ps(_mm512_mul_ps(sg, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c[0]))), mg),
                  _mm512_add_ps(_mm512_mul_ps(sg, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c[1]))), mg));
#else
    const __m256 sg = _mm256_set1_ps(s), mg = _mm256_set1_ps(m);
    for (int e = 0; e < QB; e += 8) {
        const __m128i c8 = e & 8 ? _mm_srli_si128(c[e >> 4], 8) : c[e >> 4];
        store_bf16x8(o + e, _mm256_add_ps(_mm256_mul_ps(sg, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c8))), mg));
    }
#endif
}
#endif

static void dequant_row_bf16(const lg_qtensor *w, int n, uint16_t *o, float *tmp) {
    const int K = w->k;
#ifdef __AVX2__
    if (w->group % QB == 0) {
        const int G = w->group, ng = K / G, nb = K / QB, gshift = __builtin_ctz((unsigned)(G / QB));
        if (w->bits == 8) {
            const int8_t *row = (const int8_t *)w->data + (size_t)n * K;
            const uint16_t *gsc = (const uint16_t *)w->gs + (size_t)n * ng;
            for (int b = 0; b < nb; b++)
                block8_bf16(o + (size_t)b * QB, w->rowf[n] * half_to_float(gsc[b >> gshift]), row + (size_t)b * QB);
        } else {
            const int bits = w->bits;
            const uint8_t *row = w->data + (size_t)n * K * bits / 8;
            const float s0 = w->rowf[2 * (size_t)n], m0 = w->rowf[2 * (size_t)n + 1] / 127.0f;
            for (int b = 0; b < nb; b++) {
                const int g = b >> gshift;
                __m128i c[2];
                block_codes(row + (size_t)b * QB * bits / 8, bits, &c[0], &c[1]);
                block_lowbit_bf16(o + (size_t)b * QB, s0 * scale_lut[w->gs[(size_t)n * ng + g]], m0 * (float)w->gm[(size_t)n * ng + g], c);
            }
        }
        return;
    }
#endif
    if (!tmp) { /* out of memory for the portable path's row: NaNs, seen, not a silently wrong product */
        for (int i = 0; i < K; i++) o[i] = 0x7fc0;
        return;
    }
    dequant_row(w, n, tmp);
    row_to_bf16(tmp, K, o);
}

void lg_dequant_bf16(const lg_qtensor *w, int n0, int n1, uint16_t *out, int nth) {
    const int par = nth > 1 && (size_t)(n1 - n0) * w->k >= (1u << 16);
#pragma omp parallel num_threads(nth) if (par)
    {
        float *tmp = malloc((size_t)w->k * sizeof(float)); /* the portable path's fp32 row */
#pragma omp for schedule(dynamic, lg_chunk(n1 - n0, nth))
        for (int n = n0; n < n1; n++) dequant_row_bf16(w, n, out + (size_t)(n - n0) * w->k, tmp);
        free(tmp);
    }
}

/* Rows rows[0..m) of w as fp32 [m, K] (an embedding lookup for a decoded token); the caller has
 * checked 0 <= rows[i] < N. */
void lg_dequant_rows(const lg_qtensor *w, const int64_t *rows, int m, float *out) {
    for (int i = 0; i < m; i++) dequant_row(w, (int)rows[i], out + (size_t)i * w->k);
}

/* Row n of a dense (bf16 / fp32) matrix against x. */
static float dot_dense(const lg_mat *m, int n, const float *x) {
    const int K = m->k;
    float s = 0.0f;
    int i = 0;
    if (m->kind == 1) {
        const uint16_t *r = (const uint16_t *)m->w + (size_t)n * K;
#ifdef __AVX2__
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (; i + 16 <= K; i += 16) {
            const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(r + i))), 16));
            const __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(r + i + 8))), 16));
            a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i), a0);
            a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i + 8), a1);
        }
        s = hsum256(_mm256_add_ps(a0, a1));
#endif
        for (; i < K; i++) s += bf16_to_float(r[i]) * x[i];
    } else {
        s = dotf((const float *)m->w + (size_t)n * K, x, K);
    }
    return s;
}

#if defined(__AVX2__) && !defined(__AVX512F__) /* AVX-512: lg_kernels.h's dense_tile16, eight rows */
/* Rows n..n+3 of a bf16 matrix against x, each row's sum in dot_dense's order (two accumulators,
 * then hsum256 of their sum; lg_mat_rows' dense tiles keep it too): four independent weight
 * streams and eight FMA chains, where one row at a time leaves a core waiting on one stream
 * (Xeon, 1 thread, 4096 x 4096 from RAM: ~8 GB/s). */
static void dot_dense4(const lg_mat *m, int n, const float *x, float *s) {
    const int K = m->k;
    const uint16_t *r = (const uint16_t *)m->w + (size_t)n * K;
    __m256 a0[4], a1[4];
    for (int j = 0; j < 4; j++) a0[j] = a1[j] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= K; i += 16) {
        __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        __asm__("" : "+x"(x0), "+x"(x1));
        for (int j = 0; j < 4; j++) {
            const uint16_t *rj = r + (size_t)j * K + i;
            PREFETCH_DENSE(rj);
            const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)rj)), 16));
            const __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(rj + 8))), 16));
            a0[j] = _mm256_fmadd_ps(w0, x0, a0[j]);
            a1[j] = _mm256_fmadd_ps(w1, x1, a1[j]);
        }
    }
    for (int j = 0; j < 4; j++) {
        float v = hsum256(_mm256_add_ps(a0[j], a1[j]));
        for (int t = i; t < K; t++) v += bf16_to_float(r[(size_t)j * K + t]) * x[t];
        s[j] = v;
    }
}
#endif

/* bf16 rows of one token: how many a work item takes, and the kernel that takes them. */
#if defined(__AVX512F__)
#define DENSE_1TOK_ROWS 8 /* eight weight streams in flight: a decoded token's rows come from L3 or RAM */
#define dense_1tok(m, n, x, o) dense_tile16(m, n, 8, x, 1, o)
#elif defined(__AVX2__)
#define DENSE_1TOK_ROWS 4
#define dense_1tok(m, n, x, o) dot_dense4(m, n, x, o)
#endif

/* Whether dense weight rows that stream through once -- a decoded token's (lg_matvec: DENSE_1TOK_ROWS at a
 * time, dense_tile_bh / dense_1tok) and a verification's few tokens' (lg_mat_rows' tiles) -- are read
 * several at a time, interleaved, or one after another (the same numbers: a row's sum does not depend on
 * how many rows share the call). Interleaved streams keep more loads in flight on the Xeon (one row at a
 * time ~8 GB/s from RAM, AVX2). On AMD they stream at about half the speed. Zen 4, 1 thread, one process
 * switching at run time, (setting, tokens) in random order; a forward's layers and lm_head, 1 / 2 / 3 / 4
 * tokens against the interleaved one-token time: AVX512-BF16, the default model 1.00 / 1.38 / 1.63 / 1.79x
 * -> 0.66 / 0.95 / 1.27 / 1.50x, a ~0.9B (hidden 1024, 64 experts top-8) 1.00 / 1.43 / 1.77 / 2.08x -> 0.58
 * / 0.76 / 1.00 / 1.37x (2 threads, one token: 0.72x); an AVX2 build, the ~0.9B's decoded token 41.9 ->
 * 18.8 ms. lg_set_interleaved_rows(-1): the CPU's default (one row after another on AMD), 0 / 1: off /
 * on; returns the setting. Process-wide, as lg_set_amx. (Xeons with AMX take bf16 through amx.c.) */
static int interleaved_rows = 1;
int lg_interleaved_rows(void) { return interleaved_rows; }
int lg_set_interleaved_rows(int on) {
#if defined(__x86_64__) || defined(__i386__)
    if (on < 0) {
        __builtin_cpu_init(); /* the CPU model table, whichever constructor ran first */
        on = !__builtin_cpu_is("amd");
    }
#endif
    interleaved_rows = on != 0;
    return interleaved_rows;
}

#ifdef LG_DPBF16
/* Rows r0..r1-1 of bf16 weights against nt bf16 tokens, R rows a dense_block_bh (R * nt <= 16), the rest one row
 * a block; into y (rows N apart) with the bias, rounded to dt. */
static inline __attribute__((always_inline)) void block_rows_bh(const lg_mat *m, int r0, int r1, const int R, const uint16_t *xb, const int nt, int dt,
                                                                float *y) {
    const int N = m->n;
    float s[16];
    int n = r0;
    for (; n + R <= r1; n += R) {
        dense_block_bh(m, n, R, xb, nt, s);
        for (int t = 0; t < nt; t++)
            for (int r = 0; r < R; r++) y[(size_t)t * N + n + r] = rnd(s[t * R + r] + (m->bias ? m->bias[n + r] : 0.0f), dt);
    }
    for (; n < r1; n++) {
        dense_block_bh(m, n, 1, xb, nt, s);
        for (int t = 0; t < nt; t++) y[(size_t)t * N + n] = rnd(s[t] + (m->bias ? m->bias[n] : 0.0f), dt);
    }
}
#endif

/* GGML blocks and stacks (lg_mat_rows), one row; NaNs where it fails (out of memory: lg_matvec
 * returns nothing, and NaN logits are seen where a zeroed row would pass unnoticed). */
static void matvec_parts(const lg_mat *m, const float *x, int dtype, qact *xa, float *y, int nth) {
    if (lg_mat_rows(m, 1, x, dtype, xa, y, nth))
        for (int n = 0; n < m->n; n++) y[n] = NAN;
}

/* y = m . x (+ bias), each value rounded to dtype. `xa` has room for one quantized row of m->k. */
void lg_matvec(const lg_mat *m, const float *x, int dtype, qact *xa, float *y, int nth) {
    const int N = m->n, K = m->k;
    if (m->kind >= LG_MAT_GGML) {
        matvec_parts(m, x, dtype, xa, y, nth);
        return;
    }
    if (lg_amx_takes(m, dtype)) {
        if (lg_amx_rows(m, 1, x, dtype, y, nth))
            for (int n = 0; n < N; n++) y[n] = NAN;
        return;
    }
    if (m->kind == 0) quantize_row(x, K, m->q.bits, QROW(xa, 0, K));
    const int par = nth > 1 && (size_t)N * K >= (1u << 16);
    if (m->kind == 0 && rows_1tok(&m->q, 0, 0, QROW(xa, 0, K), NULL)) { /* q2/q4 rows that rows_1tok takes, ROWS_1TOK a work item */
        const int NP = (N + ROWS_1TOK - 1) / ROWS_1TOK;
#pragma omp parallel for num_threads(nth) schedule(dynamic, lg_chunk(NP, nth)) if (par)
        for (int i = 0; i < NP; i++) {
            const int n1 = i * ROWS_1TOK, n2 = n1 + ROWS_1TOK < N ? n1 + ROWS_1TOK : N;
            float o[ROWS_1TOK];
            rows_1tok(&m->q, n1, n2, QROW(xa, 0, K), o);
            for (int n = n1; n < n2; n++) y[n] = rnd(o[n - n1] + (m->bias ? m->bias[n] : 0.0f), dtype);
        }
        return;
    }
#ifdef LG_DPBF16
    if (m->kind == 1 && dtype == 1) { /* bf16 weights and activations: dense_tile_bh, eight rows a work item (interleaved_rows) */
        uint16_t xs[K <= 8192 ? K : 1], *xb = K <= 8192 ? xs : malloc((size_t)K * sizeof(uint16_t));
        if (!xb) {
            for (int n = 0; n < N; n++) y[n] = NAN;
            return;
        }
        row_to_bf16(x, K, xb);
        const int per = interleaved_rows ? DENSE_1TOK_ROWS : 16; /* rows a work item: 8 interleaved, or 16 one after another (block_rows_bh) */
        const int NP = (N + per - 1) / per;
#pragma omp parallel for num_threads(nth) schedule(dynamic, lg_chunk(NP, nth)) if (par)
        for (int i = 0; i < NP; i++) {
            const int n1 = i * per, n2 = n1 + per < N ? n1 + per : N;
            if (!interleaved_rows) {
                block_rows_bh(m, n1, n2, 16, xb, 1, dtype, y);
                continue;
            }
            float o[TILE16_ROWS * TILE16_TOKENS];
            if (n2 - n1 == per) dense_tile_bh(m, n1, DENSE_1TOK_ROWS, xb, 1, o);
            else
                for (int n = n1; n < n2; n++) dense_tile_bh(m, n, 1, xb, 1, o + (n - n1));
            for (int n = n1; n < n2; n++) y[n] = rnd(o[n - n1] + (m->bias ? m->bias[n] : 0.0f), dtype);
        }
        if (xb != xs) free(xb);
        return;
    }
#endif
#ifdef DENSE_1TOK_ROWS
    if (m->kind == 1) { /* bf16: DENSE_1TOK_ROWS rows a work item, each row dot_dense's numbers */
        const int NP = (N + DENSE_1TOK_ROWS - 1) / DENSE_1TOK_ROWS;
#pragma omp parallel for num_threads(nth) schedule(dynamic, lg_chunk(NP, nth)) if (par)
        for (int i = 0; i < NP; i++) {
            const int n1 = i * DENSE_1TOK_ROWS;
            float o[DENSE_1TOK_ROWS];
            if (n1 + DENSE_1TOK_ROWS <= N && interleaved_rows) dense_1tok(m, n1, x, o);
            else
                for (int n = n1; n < n1 + DENSE_1TOK_ROWS && n < N; n++) o[n - n1] = dot_dense(m, n, x);
            for (int n = n1; n < n1 + DENSE_1TOK_ROWS && n < N; n++) y[n] = rnd(o[n - n1] + (m->bias ? m->bias[n] : 0.0f), dtype);
        }
        return;
    }
#endif
#pragma omp parallel for num_threads(nth) schedule(dynamic, lg_chunk(N, nth)) if (par)
    for (int n = 0; n < N; n++) {
        const float v = m->kind == 0 ? dot_row(&m->q, n, QROW(xa, 0, K)) : dot_dense(m, n, x);
        y[n] = rnd(v + (m->bias ? m->bias[n] : 0.0f), dtype);
    }
}

/* ---- dense rows of several tokens (lg_mat_rows: a speculative verification, an expert's few tokens) ---- */
#if defined(__AVX2__) && !defined(__AVX512F__) /* AVX-512: dense_tile16 below */
/* The dense (bf16 / fp32) product of several tokens: a tile of R weight rows x nt tokens, every
 * (row, token) dot in its own registers, so one weight load serves nt tokens and one activation load
 * R rows, and 2 R nt independent FMA chains fill the pipes (one row against one token is two chains:
 * bound by the FMA latency, not by reading the weight, at these sizes). Each dot keeps quant's
 * dot_dense order (dotf's: lane j of accumulator a0 sums the values 16 b + j in order, a1 the values
 * 16 b + 8 + j, then hsum256(a0 + a1), then the tail in order), so a token's numbers do not depend
 * on the tile it sits in or on how many tokens the call has.
 *
 * bf16 rows are read 16 values at a time and widened by a shift (the even values) and a mask (the odd
 * ones) instead of two zero-extensions: the even accumulator's lane j then holds the chain of FMAs
 * dotf's a0 / a1 lane 2j mod 8 holds, the odd one lane 2j + 1's; and hsum256(a0 + a1) =
 * hsum256(even) + hsum256(odd) exactly (with P_j = even_j + even_j+4 and Q_j = odd_j + odd_j+4, both
 * are ((P0 + P2) + (P1 + P3)) + ((Q0 + Q2) + (Q1 + Q3))). The activations are laid out alike: each
 * 16-value block as its 8 even values, then its 8 odd ones (split_halves). */
#define RMAX 4 /* weight rows of a tile */
#define TMAX 4 /* tokens of a tile */
/* Keeps a loaded vector in a register: GCC otherwise folds the load into each instruction that uses
 * it, reading the same 32 bytes once per use; the loads, not the FMAs, then bound the tile. */
#define IN_REG(v) __asm__("" : "+x"(v))

/* x rows [T, K] -> xs [T, K]: each whole 16-value block as its even values, then its odd ones; the tail as is. */
static void split_halves(const float *x, int T, int K, float *xs) {
    for (int t = 0; t < T; t++) {
        const float *a = x + (size_t)t * K;
        float *b = xs + (size_t)t * K;
        int i = 0;
        for (; i + 16 <= K; i += 16)
            for (int j = 0; j < 8; j++) {
                b[i + j] = a[i + 2 * j];
                b[i + 8 + j] = a[i + 2 * j + 1];
            }
        for (; i < K; i++) b[i] = a[i];
    }
}

/* The tail (values from..K-1, in order) of a tile's dots, after their vector part s[t * RMAX + r]. */
static __attribute__((noinline)) void tile_tail(const lg_mat *m, int n, int R, const float *x, int nt, int from, float *s) {
    const int K = m->k;
    for (int r = 0; r < R; r++)
        for (int t = 0; t < nt; t++) {
            const size_t row = (size_t)(n + r) * K;
            for (int j = from; j < K; j++)
                s[t * RMAX + r] += (m->kind == 1 ? bf16_to_float(((const uint16_t *)m->w)[row + j]) : ((const float *)m->w)[row + j]) * x[(size_t)t * K + j];
        }
}

/* s[t * RMAX + r] = row n + r of m . token t (x: nt rows K apart; bf16: split_halves' layout), for
 * constant R <= RMAX and nt <= TMAX (inlined, so the accumulators stay in registers). */
static inline __attribute__((always_inline)) void dense_tile(const lg_mat *m, int n, const int R, const float *x, const int nt, float *s) {
    const int K = m->k, K16 = K & ~15;
    __m256 ae[RMAX][TMAX], ao[RMAX][TMAX];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < nt; t++) ae[r][t] = ao[r][t] = _mm256_setzero_ps();
    if (m->kind == 1) {
        const uint16_t *w = (const uint16_t *)m->w + (size_t)n * K;
        const __m256i odd = _mm256_set1_epi32((int)0xffff0000u);
        for (int i = 0; i < K16; i += 16) {
            __m256 xe[TMAX], xo[TMAX];
            for (int t = 0; t < nt; t++) {
                xe[t] = _mm256_loadu_ps(x + (size_t)t * K + i);
                xo[t] = _mm256_loadu_ps(x + (size_t)t * K + i + 8);
                if (R > 1) {
                    IN_REG(xe[t]);
                    IN_REG(xo[t]);
                }
            }
            for (int r = 0; r < R; r++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(w + (size_t)r * K + i));
                PREFETCH_DENSE(w + (size_t)r * K + i);
                IN_REG(v);
                const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), wo = _mm256_castsi256_ps(_mm256_and_si256(v, odd));
                for (int t = 0; t < nt; t++) {
                    ae[r][t] = _mm256_fmadd_ps(we, xe[t], ae[r][t]);
                    ao[r][t] = _mm256_fmadd_ps(wo, xo[t], ao[r][t]);
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int t = 0; t < nt; t++) s[t * RMAX + r] = hsum256(ae[r][t]) + hsum256(ao[r][t]);
    } else {
        const float *w = (const float *)m->w + (size_t)n * K;
        for (int i = 0; i < K16; i += 16) {
            __m256 x0[TMAX], x1[TMAX];
            for (int t = 0; t < nt; t++) {
                x0[t] = _mm256_loadu_ps(x + (size_t)t * K + i);
                x1[t] = _mm256_loadu_ps(x + (size_t)t * K + i + 8);
                if (R > 1) {
                    IN_REG(x0[t]);
                    IN_REG(x1[t]);
                }
            }
            for (int r = 0; r < R; r++) {
                const __m256 w0 = _mm256_loadu_ps(w + (size_t)r * K + i), w1 = _mm256_loadu_ps(w + (size_t)r * K + i + 8);
                PREFETCH_DENSE(w + (size_t)r * K + i);
                for (int t = 0; t < nt; t++) {
                    ae[r][t] = _mm256_fmadd_ps(w0, x0[t], ae[r][t]);
                    ao[r][t] = _mm256_fmadd_ps(w1, x1[t], ao[r][t]);
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int t = 0; t < nt; t++) s[t * RMAX + r] = hsum256(_mm256_add_ps(ae[r][t], ao[r][t]));
    }
    if (K16 < K) tile_tail(m, n, R, x, nt, K16, s);
}

/* A tile's weight rows by its tokens (measured on an AVX2 EPYC, bf16 rows of 256 in L2 and in L3):
 * one token 4 rows (8 chains), two 2 rows, three or four 1 row (x from memory); one row where the call's
 * T tokens stream the rows through once and lg_interleaved_rows() says one row after another. */
static inline int tile_rows(int nt, int T) {
    if (T <= TMAX && !lg_interleaved_rows()) return 1;
    return nt == 1 ? 4 : nt == 2 ? 2 : 1;
}

/* dense_tile with R (tile_rows(nt), or 1) and nt known at compile time (bh: AVX-512 only). */
static inline __attribute__((always_inline)) void dense_tile_of(const lg_mat *m, int n, int R, const void *xv, int nt, int bh, float *s) {
    const float *x = (const float *)xv;
    (void)bh;
    if (R == 1) {
        switch (nt) {
        case 1: dense_tile(m, n, 1, x, 1, s); break;
        case 2: dense_tile(m, n, 1, x, 2, s); break;
        case 3: dense_tile(m, n, 1, x, 3, s); break;
        default: dense_tile(m, n, 1, x, TMAX, s);
        }
    } else if (nt == 1) {
        dense_tile(m, n, 4, x, 1, s);
    } else {
        dense_tile(m, n, 2, x, 2, s);
    }
}
#endif

#ifdef __AVX512F__
/* The AVX-512 tiles: lg_kernels.h's dense_tile16 (one zmm accumulator a dot, in dot_dense's lane order,
 * so the activations stay in their natural order). At 3-4 tokens (a speculative verification) the AVX2
 * tile above (1 row, 8 chains of 8 lanes) waited on its FMA chains and its per-row horizontal sums,
 * not on the weights; 16 accumulators on 4 rows do not. */
#define RMAX TILE16_ROWS
#define TMAX TILE16_TOKENS

/* Rows a tile takes for nt of a call's T tokens. Rows that stream through once (T <= TMAX: a verification)
 * follow lg_interleaved_rows() (qkernels.c: one row after another on AMD); a prompt's tiles read the rows
 * again and again from the caches, and there 4 rows' accumulator chains keep the FMA port busy (one
 * process, a runtime switch, 30 rounds: a 128-token prompt of the default model 6792 tok/s on 4-row tiles,
 * 6162 one row at a time; ~0.9B even). */
static inline int tile_rows(int nt, int T) {
    if (T <= TMAX && !lg_interleaved_rows()) return 1;
    return nt == 1 ? 8 : 4;
}

/* A tile of R rows x nt tokens: dense_tile_bh on bf16 activations (bh), else dense_tile16. */
#ifdef LG_DPBF16
#define TILE(R, nt) (bh ? dense_tile_bh(m, n, R, (const uint16_t *)x, nt, s) : dense_tile16(m, n, R, (const float *)x, nt, s))
#else
#define TILE(R, nt) dense_tile16(m, n, R, (const float *)x, nt, s)
#endif

/* The tile with R (tile_rows(nt), or 1) and nt known at compile time. */
static inline __attribute__((always_inline)) void dense_tile_of(const lg_mat *m, int n, int R, const void *x, int nt, int bh, float *s) {
    (void)bh;
    switch (nt) {
    case 1: R == 1 ? TILE(1, 1) : TILE(8, 1); break;
    case 2: R == 1 ? TILE(1, 2) : TILE(4, 2); break;
    case 3: R == 1 ? TILE(1, 3) : TILE(4, 3); break;
    default: R == 1 ? TILE(1, TMAX) : TILE(4, TMAX);
    }
}
#undef TILE
#endif

#ifdef __AVX2__
/* Weight rows n..n+R-1 (R = tile_rows(nt, T); fewer at the end, one at a time) against the nt tokens at
 * x (rows K apart; AVX2's bf16 tiles: split_halves' layout) into y (rows N apart), with the bias,
 * rounded to dt. */
static inline __attribute__((always_inline)) void dense_rows(const lg_mat *m, int n, const int R, const void *x, int nt, int bh, int dt, float *y) {
    const int N = m->n, rows = n + R <= N ? R : N - n;
    float s[RMAX * TMAX];
    if (rows == R) dense_tile_of(m, n, R, x, nt, bh, s);
    else
        for (int r = 0; r < rows; r++) dense_tile_of(m, n + r, 1, x, nt, bh, s + r);
    for (int r = 0; r < rows; r++) {
        const float b = m->bias ? m->bias[n + r] : 0.0f;
        for (int t = 0; t < nt; t++) y[(size_t)t * N + n + r] = rnd(s[t * RMAX + r] + b, dt);
    }
}

/* Blocks b0..b1-1 of R rows each (dense_rows) against nt tokens, the tile chosen once for the range, not once a
 * row: at 2-4 tokens a row of 256 is ~100 cycles of products, and the per-row dispatch and call cost about as
 * much again (perf, a 4-token forward of the default model). */
static void dense_range(const lg_mat *m, int b0, int b1, const int R, const void *x, int nt, int bh, int dt, float *y) {
    switch (nt) {
    case 1: for (int b = b0; b < b1; b++) dense_rows(m, b * R, R, x, 1, bh, dt, y); break;
    case 2: for (int b = b0; b < b1; b++) dense_rows(m, b * R, R, x, 2, bh, dt, y); break;
    case 3: for (int b = b0; b < b1; b++) dense_rows(m, b * R, R, x, 3, bh, dt, y); break;
    default: for (int b = b0; b < b1; b++) dense_rows(m, b * R, R, x, TMAX, bh, dt, y);
    }
}
/* Rows of weights a work item of dense_rows_tiled holds for all its token tiles: about 256 KB of them
 * (the item's rows stay in L2 while each tile of tokens reads them; an expert's 12 MB of weights came from
 * RAM once per 4 tokens when the tiles were the outer loop), a multiple of 16 (every tile_rows and
 * block_rows_bh's blocks), and at most an eighth of each thread's share. */
static int tiled_chunk_rows(const lg_mat *m, int nth) {
    const long bytes = (long)m->k * (m->kind == 1 ? 2 : 4), by_cache = (256L << 10) / (bytes > 0 ? bytes : 1);
    const long by_share = (long)m->n / (8L * (nth > 1 ? nth : 1));
    long rows = by_cache < by_share ? by_cache : by_share;
    rows &= ~15L;
    return rows < 16 ? 16 : rows > (1L << 20) ? (1 << 20) : (int)rows;
}

#ifdef LG_DPBF16
/* A verification's few tokens (nt <= TMAX) on rows that stream through one after another: 16 dots a block. */
static void block_range_bh(const lg_mat *m, int r0, int r1, const uint16_t *xb, int nt, int dt, float *y) {
    switch (nt) {
    case 1: block_rows_bh(m, r0, r1, 16, xb, 1, dt, y); break;
    case 2: block_rows_bh(m, r0, r1, 8, xb, 2, dt, y); break;
    case 3: block_rows_bh(m, r0, r1, 4, xb, 3, dt, y); break;
    default: block_rows_bh(m, r0, r1, 4, xb, 4, dt, y);
    }
}
#endif

/* y[t] = m . x[t] (+ bias, rounded to dt) for T > 1 rows of floats, dense weights (bf16 / fp32): tiles of
 * weight rows x up to TMAX tokens (dense_rows), each (row, token) dot in lg_matvec's order, so every
 * token's numbers are a one-token call's. Work items are chunks of rows, each through every tile of tokens.
 * Returns 0, or -1 when out of memory. */
static int dense_rows_tiled(const lg_mat *m, int T, const float *x, int dt, float *y, int nth) {
    const int N = m->n, K = m->k;
    void *xs = NULL;
    int bh = 0;
#ifndef __AVX512F__
    if (m->kind == 1) { /* the AVX2 tile's layout */
        if (!(xs = malloc((size_t)T * K * sizeof(float)))) return -1;
        split_halves(x, T, K, xs);
    }
#endif
#ifdef LG_DPBF16
    if (m->kind == 1 && dt == 1) { /* bf16 activations, as lg_matvec's one-token rows take them */
        if (!(xs = malloc((size_t)T * K * sizeof(uint16_t)))) return -1;
        rows_to_bf16(x, T, K, xs);
        bh = 1;
    }
#endif
    const char *xr = xs ? (const char *)xs : (const char *)x;
    const size_t es = bh ? sizeof(uint16_t) : sizeof(float);
    const int rows = tiled_chunk_rows(m, nth), chunks = (N + rows - 1) / rows;
    const int par = nth > 1 && chunks > 1 && (size_t)N * K * (T < TMAX ? T : TMAX) >= (1u << 16);
#pragma omp parallel for num_threads(nth) schedule(dynamic, 1) if (par)
    for (int c = 0; c < chunks; c++) {
        const int r0 = c * rows, r1 = r0 + rows < N ? r0 + rows : N;
#ifdef LG_DPBF16
        if (bh && T <= TMAX && !lg_interleaved_rows()) { /* one row after another: the sums of 16 dots at once */
            block_range_bh(m, r0, r1, (const uint16_t *)xr, T, dt, y);
            continue;
        }
#endif
        for (int t0 = 0; t0 < T; t0 += TMAX) {
            const int nt = T - t0 < TMAX ? T - t0 : TMAX, R = tile_rows(nt, T);
            dense_range(m, r0 / R, (r1 + R - 1) / R, R, xr + (size_t)t0 * K * es, nt, bh, dt, y + (size_t)t0 * N);
        }
    }
    free(xs);
    return 0;
}
#endif


int lg_mat_rows(const lg_mat *m, int T, const float *x, int dt, qact *xa, float *y, int nth) {
    const int N = m->n, K = m->k;
    if (m->kind == LG_MAT_GGML) {
        /* the torch path's GGMLKernel: the fp32 product, + the fp32 bias, then one rounding to the dtype */
        if (kq_matmul_q8(m->sub, m->w, N, K, x, T, y, nth)) return -1;
        for (int t = 0; t < T; t++)
            for (int n = 0; n < N; n++) {
                float *v = y + (size_t)t * N + n;
                *v = rnd(m->bias ? *v + m->bias[n] : *v, dt);
            }
        return 0;
    }
    if (m->kind == LG_MAT_STACK) { /* quant/stack.py's QuantStack: each part's rows, concatenated */
        const lg_mat *parts = (const lg_mat *)m->w;
        int widest = 0;
        for (int p = 0; p < m->sub; p++) widest = parts[p].n > widest ? parts[p].n : widest;
        float *tmp = T > 1 ? malloc((size_t)T * widest * sizeof(float)) : NULL;
        if (T > 1 && !tmp) return -1;
        int off = 0, rc = 0;
        for (int p = 0; p < m->sub && rc == 0; p++) {
            const int np = parts[p].n;
            rc = lg_mat_rows(&parts[p], T, x, dt, xa, T > 1 ? tmp : y + off, nth);
            for (int t = 0; t < T && T > 1 && rc == 0; t++) memcpy(y + (size_t)t * N + off, tmp + (size_t)t * np, (size_t)np * sizeof(float));
            off += np;
        }
        free(tmp);
        return rc;
    }
    if (lg_amx_takes(m, dt)) return lg_amx_rows(m, T, x, dt, y, nth); /* AMX tiles: T tokens for the price of one */
    if (T > 1 && m->kind == LG_MAT_Q) { /* each quantized weight row read once for every tile of tokens */
        if (lg_linear(&m->q, T, x, 0, m->bias, y, 0, nth)) return -1;
        for (size_t i = 0; i < (size_t)T * N; i++) y[i] = rnd(y[i], dt);
        return 0;
    }
#ifdef __AVX2__
    if (T > 1) return dense_rows_tiled(m, T, x, dt, y, nth);
#endif
    for (int t = 0; t < T; t++) lg_matvec(m, x + (size_t)t * K, dt, xa, y + (size_t)t * N, nth);
    return 0;
}

/* SwiGLU: down(silu(gate(h)) * up(h)), gate_up fused [2I, H]; rounded where torch rounds. g holds 2I floats. */
void lg_swiglu_vec(const lg_mat *gate_up, const lg_mat *down, int dt, const float *h, qact *xa, float *g, float *out, int nth) {
    const int I = down->k;
    lg_matvec(gate_up, h, dt, xa, g, nth);
    for (int j = 0; j < I; j++) g[j] = rnd(rnd(silu(g[j]), dt) * g[I + j], dt);
    lg_matvec(down, g, dt, xa, out, nth);
}

/* One expert of lg_mat weights on T tokens: y = down(silu(gate(x)) * up(x)) in x's dtype, rounded as
 * the torch ops round -- what localglm.layers.experts.expert_swiglu computes for a dense expert in RAM
 * and the offloaded one alike, and (dtype fp32) what quant/blob.py's PreparedExpert computes for GGUF
 * blocks. Tokens go EXPERT_ROWS at a time through lg_mat_rows (each weight row read once for a tile of
 * them, GGML blocks once for them all), each token's numbers lg_swiglu_vec's. Returns 0, or -1 when out of memory or a kernel refuses the shape. */
#define EXPERT_ROWS 64
int lg_dense_expert(const lg_mat *gate_up, const lg_mat *down, int T, const void *x, int dtype, void *y, int nth) {
    const int H = gate_up->k, I = down->k, C = T < EXPERT_ROWS ? T : EXPERT_ROWS;
    float *buf = malloc((size_t)C * ((size_t)H * 2 + 3 * (size_t)I) * sizeof(float));
    qact xa = {0};
    const int kq = (H > I ? H : I) + QB - 1; /* a quantized part (alone or in a stack) quantizes one row of its input */
    if (!buf || !lg_qact_alloc(&xa, 1, kq / QB * QB)) {
        free(buf);
        lg_qact_free(&xa);
        return -1;
    }
    float *xf = buf, *o = xf + (size_t)C * H, *g = o + (size_t)C * H, *a = g + (size_t)C * 2 * I;
    int rc = 0;
    for (int t0 = 0; t0 < T && rc == 0; t0 += C) {
        const int c = T - t0 < C ? T - t0 : C;
        for (int t = 0; t < c; t++) load_row(x, dtype, (size_t)(t0 + t) * H, H, xf + (size_t)t * H);
        rc = lg_mat_rows(gate_up, c, xf, dtype, &xa, g, nth);
        for (int t = 0; t < c && rc == 0; t++)
            for (int j = 0; j < I; j++) a[(size_t)t * I + j] = rnd(rnd(silu(g[(size_t)t * 2 * I + j]), dtype) * g[(size_t)t * 2 * I + I + j], dtype);
        if (rc == 0) rc = lg_mat_rows(down, c, a, dtype, &xa, o, nth);
        for (size_t i = 0; i < (size_t)c * H && rc == 0; i++) store(y, dtype, (size_t)t0 * H + i, o[i]);
    }
    free(buf);
    lg_qact_free(&xa);
    return rc;
}
