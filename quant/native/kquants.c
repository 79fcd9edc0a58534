/* llama.cpp's K-quant and legacy blocks multiplied as stored (quant/kquants.py holds the format
 * notes and the torch reference these kernels must agree with).
 *
 * Every block decodes into int8 codes q (one per weight), an fp32 scale per sub-block and, for
 * Q2_K / Q4_K / Q5_K, an fp32 offset per sub-block: w = scale * q - offset (Q4_1 / Q5_1 add their m:
 * the offset is -m, and x - (-m) == x + m exactly). The scales are computed
 * exactly as gguf.quants / llama.cpp compute them (fp16 -> fp32, times the sub-block's integer
 * scale: one fp32 product), so `kq_dequant` is bit-exact with them. `kq_matmul` multiplies the codes
 * with fp32 activations (no activation quantization): it agrees with dequantize + fp32 matmul to
 * fp32 rounding. Each block is decoded once per call and used for every token. `kq_matmul_q8`
 * multiplies them with int8 activations (the section below says how), the kernel the models run.
 *
 * Built by quant/kquants.py with quant/native.py's builder and flags (-O3 -march=native -fopenmp
 * -ffp-contract=off); AVX2 (+FMA) where the compiler targets it, portable C otherwise.
 */
#include "lg_kernels.h" /* lg_chunk, hsum256 (and immintrin.h under AVX2) */
#include "iq_grids.h"   /* the i-quant grids and sign table (quant/iq_tables.py) */
#ifdef __F16C__
#include <immintrin.h>
#endif

#define QK_K 256
#define KQ_MAX_ROWS 64 /* tokens per kq_matmul call (accumulators live on the stack) */

enum kq_type {
    KQ_Q4_0, KQ_Q5_0, KQ_Q2_K, KQ_Q3_K, KQ_Q4_K, KQ_Q5_K, KQ_Q6_K, KQ_IQ4_XS, KQ_Q4_1, KQ_Q5_1, KQ_IQ4_NL,
    KQ_IQ2_XXS, KQ_IQ2_XS, KQ_IQ2_S, KQ_IQ3_XXS, KQ_IQ3_S, KQ_IQ1_S, KQ_IQ1_M, KQ_NTYPES
};

typedef struct {
    int block, nbytes, sub, has_offset;
} kq_info;

/* weights per block, bytes per block, weights per sub-block, whether sub-blocks carry an offset */
static const kq_info INFO[KQ_NTYPES] = {
    {32, 18, 32, 0}, {32, 22, 32, 0}, {QK_K, 84, 16, 1}, {QK_K, 110, 16, 0},
    {QK_K, 144, 32, 1}, {QK_K, 176, 32, 1}, {QK_K, 210, 16, 0}, {QK_K, 136, 32, 0},
    {32, 20, 32, 1}, {32, 24, 32, 1}, {32, 18, 32, 0},
    {QK_K, 66, 32, 0}, {QK_K, 74, 16, 0}, {QK_K, 82, 16, 0}, {QK_K, 98, 32, 0}, {QK_K, 110, 32, 0}, {QK_K, 50, 32, 0}, {QK_K, 56, 16, 0},
};

/* The i-quants (IQ2_XXS ... IQ1_M): every weight is a value of a fixed grid (iq_grids.h) with a sign, times
 * its sub-block's scale; their codes are signed, as IQ4_XS's. */
static inline int iq_grid_type(int type) { return type >= KQ_IQ2_XXS && type <= KQ_IQ1_M; }
static inline int signed_codes(int type) { return type == KQ_IQ4_XS || iq_grid_type(type); }

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

#ifdef __AVX2__
/* The 32-weight blocks' codes, 16 bytes at a time (byte by byte, gcc left them scalar, with byte stores
 * read back as vectors: ~2 G weights/s dequantized). lo / hi: the bytes' low / high nibbles. */
static inline __m128i nib_lo(const uint8_t *p) { return _mm_and_si128(_mm_loadu_si128((const __m128i *)p), _mm_set1_epi8(15)); }
static inline __m128i nib_hi(const uint8_t *p) { return _mm_and_si128(_mm_srli_epi16(_mm_loadu_si128((const __m128i *)p), 4), _mm_set1_epi8(15)); }
/* 16 bits -> 16 bytes, 16 where the bit is set (Q5_0 / Q5_1's fifth bits, bit j for code j) */
static inline __m128i fifth_bits(uint32_t bits) {
    const __m128i v = _mm_shuffle_epi8(_mm_cvtsi32_si128((int)bits), _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
    const __m128i m = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
    return _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(v, m), m), _mm_set1_epi8(16));
}
static inline void store16(int8_t *q, __m128i v) { _mm_storeu_si128((__m128i *)q, v); }
#endif

static inline uint32_t rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}
static inline uint16_t rd16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* An i-quant block's scales, as gguf.quants / llama.cpp's dequantize_row_iq* compute them: sc[subs] (fp32,
 * bit for bit; IQ1's carry the 1/8 its codes are scaled by), and for the int8 products the same as an
 * integer per 16 weights isc[16] times one factor d (sc = d * isc, as real numbers). Either may be NULL. */
static void iq_scales(int type, const uint8_t *b, float *sc, int16_t *isc, float *d) {
    switch (type) {
    case KQ_IQ2_XXS:
    case KQ_IQ3_XXS: { /* 4 bits a sub-block of 32, the top of each 32-bit scale-and-signs word */
        const float f = f16(b), half = type == KQ_IQ2_XXS ? 0.25f : 0.5f;
        for (int s = 0; s < 8; s++) {
            const uint32_t ls = rd32(type == KQ_IQ2_XXS ? b + 6 + 8 * s : b + 66 + 4 * s) >> 28;
            if (sc) sc[s] = f * (0.5f + (float)ls) * half;
            if (isc) isc[2 * s] = isc[2 * s + 1] = (int16_t)(2 * ls + 1);
        }
        if (d) *d = f * (half * 0.5f);
        break;
    }
    case KQ_IQ2_XS:
    case KQ_IQ2_S: { /* 4 bits a sub-block of 16, two to a byte (low first) */
        const float f = f16(b);
        const uint8_t *scales = b + (type == KQ_IQ2_XS ? 66 : 74);
        for (int s = 0; s < 16; s++) {
            const int ls = (scales[s >> 1] >> (4 * (s & 1))) & 15;
            if (sc) sc[s] = f * (0.5f + (float)ls) * 0.25f;
            if (isc) isc[s] = (int16_t)(2 * ls + 1);
        }
        if (d) *d = f * 0.125f;
        break;
    }
    case KQ_IQ3_S: { /* d * (1 + 2 * 4 bits), a sub-block of 32 */
        const float f = f16(b);
        for (int s = 0; s < 8; s++) {
            const int ls = 1 + 2 * ((b[106 + (s >> 1)] >> (4 * (s & 1))) & 15);
            if (sc) sc[s] = f * (float)ls;
            if (isc) isc[2 * s] = isc[2 * s + 1] = (int16_t)ls;
        }
        if (d) *d = f;
        break;
    }
    case KQ_IQ1_S: { /* d * (2 * 3 bits + 1), a sub-block of 32 (bits 12-14 of its qh word) */
        const float f = f16(b);
        for (int s = 0; s < 8; s++) {
            const int ls = 2 * ((rd16(b + 34 + 2 * s) >> 12) & 7) + 1;
            if (sc) sc[s] = f * (float)ls * 0.125f;
            if (isc) isc[2 * s] = isc[2 * s + 1] = (int16_t)ls;
        }
        if (d) *d = f * 0.125f;
        break;
    }
    default: { /* KQ_IQ1_M: the fp16 d in the four scale words' top nibbles; d * (2 * 3 bits + 1) a sub-block of 16 */
        uint16_t u[4];
        memcpy(u, b + 48, 8);
        const uint16_t h = (uint16_t)((u[0] >> 12) | ((u[1] >> 8) & 0x00f0) | ((u[2] >> 4) & 0x0f00) | (u[3] & 0xf000));
        uint8_t hb[2];
        memcpy(hb, &h, 2);
        const float f = f16(hb);
        for (int s = 0; s < 16; s++) {
            const int ls = 2 * ((u[s >> 2] >> (3 * (s & 3))) & 7) + 1;
            if (sc) sc[s] = f * (float)ls * 0.125f;
            if (isc) isc[s] = (int16_t)ls;
        }
        if (d) *d = f * 0.125f;
    }
    }
}

/* The 8 grid values (one byte each) behind a uint64 / the 4 behind a uint32 row. */
#define GRID8(G, i) ((const uint8_t *)((G) + (i)))

/* Chunk c (weights 32c..32c+31) of an i-quant block: per group of 8 weights its grid row(s) `rows`
 * (uint64 rows: rows[l]; uint32 rows: rows[2l], rows[2l+1]) and the 32 sign bits (bit j: weight j
 * negated), or for IQ1 the delta's sign per group (delta[l], +-1). */
typedef struct {
    const uint8_t *rows[8];
    uint32_t signs;
    int8_t delta[4];
} iq_chunk;

static inline __attribute__((always_inline)) void iq_chunk_of(int type, const uint8_t *b, int c, iq_chunk *ch) {
    ch->signs = 0;
    switch (type) {
    case KQ_IQ2_XXS: { /* 4 grid bytes, then 4 x 7 sign bits and the scale */
        const uint32_t a0 = rd32(b + 2 + 8 * c), a1 = rd32(b + 6 + 8 * c);
        for (int l = 0; l < 4; l++) ch->rows[l] = GRID8(IQ2XXS_GRID, (a0 >> (8 * l)) & 255), ch->signs |= (uint32_t)KSIGNS[(a1 >> (7 * l)) & 127] << (8 * l);
        break;
    }
    case KQ_IQ2_XS: /* 9 grid bits and 7 sign bits a group */
        for (int l = 0; l < 4; l++) {
            const uint16_t v = rd16(b + 2 + 2 * (4 * c + l));
            ch->rows[l] = GRID8(IQ2XS_GRID, v & 511), ch->signs |= (uint32_t)KSIGNS[v >> 9] << (8 * l);
        }
        break;
    case KQ_IQ2_S: /* 8 grid bits + 2 from qh, the signs stored whole */
        for (int l = 0; l < 4; l++) ch->rows[l] = GRID8(IQ2S_GRID, b[2 + 4 * c + l] | (((b[66 + c] >> (2 * l)) & 3) << 8));
        ch->signs = rd32(b + 34 + 4 * c);
        break;
    case KQ_IQ3_XXS: { /* a byte a row of 4, the signs as IQ2_XXS's in the scale word */
        const uint32_t a = rd32(b + 66 + 4 * c);
        for (int i = 0; i < 8; i++) ch->rows[i] = (const uint8_t *)(IQ3XXS_GRID + b[2 + 8 * c + i]);
        for (int l = 0; l < 4; l++) ch->signs |= (uint32_t)KSIGNS[(a >> (7 * l)) & 127] << (8 * l);
        break;
    }
    case KQ_IQ3_S: /* 8 bits + 1 from qh a row of 4, the signs stored whole */
        for (int i = 0; i < 8; i++) ch->rows[i] = (const uint8_t *)(IQ3S_GRID + (b[2 + 8 * c + i] | (((b[66 + c] >> i) & 1) << 8)));
        ch->signs = rd32(b + 74 + 4 * c);
        break;
    case KQ_IQ1_S: { /* 8 bits + 3 from the sub-block's qh word; its top bit the delta's sign */
        const uint16_t h = rd16(b + 34 + 2 * c);
        for (int l = 0; l < 4; l++) ch->rows[l] = GRID8(IQ1S_GRID, b[2 + 4 * c + l] | (((h >> (3 * l)) & 7) << 8)), ch->delta[l] = h & 0x8000 ? -1 : 1;
        break;
    }
    default: /* KQ_IQ1_M: 8 bits + 3 from a qh nibble, whose fourth bit is the delta's sign */
        for (int l = 0; l < 4; l++) {
            const int j = 4 * c + l, nib = (b[32 + (j >> 1)] >> (4 * (j & 1))) & 15;
            ch->rows[l] = GRID8(IQ1S_GRID, b[j] | ((nib & 7) << 8)), ch->delta[l] = nib & 8 ? -1 : 1;
        }
    }
}

/* Chunk c's 32 signed codes: the grid values with their signs; IQ1: 8 * value + the delta's sign (the
 * scales carry the 1/8: d * (v + delta) == (d / 8) * (8 v + 8 delta) exactly). */
static inline __attribute__((always_inline)) void iq_codes32(int type, const uint8_t *b, int c, int8_t *q) {
    iq_chunk ch;
    iq_chunk_of(type, b, c, &ch);
    if (type == KQ_IQ1_S || type == KQ_IQ1_M) {
        for (int l = 0; l < 4; l++)
            for (int j = 0; j < 8; j++) q[8 * l + j] = (int8_t)(8 * (int8_t)ch.rows[l][j] + ch.delta[l]);
        return;
    }
    const int four = type == KQ_IQ3_XXS || type == KQ_IQ3_S; /* rows of 4 values */
    for (int j = 0; j < 32; j++) {
        const int v = four ? ch.rows[j >> 2][j & 3] : ch.rows[j >> 3][j & 7];
        q[j] = (int8_t)((ch.signs >> j) & 1 ? -v : v);
    }
}

#ifdef __AVX2__
/* 32 bits -> 32 bytes, 0xff where bit j is set (byte j). */
static inline __m256i bit_bytes(uint32_t x) {
    const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf), bit), bit);
}

static inline uint64_t row8(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* Four uint64 grid rows (8 one-byte values each) as one vector, row 0 lowest. */
static inline __m256i rows4(const uint64_t *g, unsigned i0, unsigned i1, unsigned i2, unsigned i3) {
    return _mm256_set_epi64x((long long)g[i3], (long long)g[i2], (long long)g[i1], (long long)g[i0]);
}

/* Four groups' 7 stored sign bits s7 (one group in the low byte of each 16- or 32-bit lane of s7, the lane's
 * other bytes 0) as +-1 bytes, group l's at bytes 8l..8l+7: the 8th sign is the parity of the 7 (the byte KSIGNS
 * holds), found by folding 7 bits to 4 and a 16-entry shuffle, no table loads; b0..b3 name the lanes' low bytes.
 * IQ2_XS's four 16-bit words: 0.76-0.79x the time of four KSIGNS_BYTES rows. */
static inline __m256i parity_signs(__m128i s7, __m128i fold4, int b0, int b1, int b2, int b3) {
    const __m128i odd = _mm_setr_epi8(0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0); /* 0x80 where 4 bits have odd parity */
    const __m128i full = _mm_or_si128(s7, _mm_shuffle_epi8(odd, fold4));
    const __m256i spread = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(full), _mm256_setr_epi8(b0, b0, b0, b0, b0, b0, b0, b0, b1, b1, b1, b1, b1, b1, b1, b1,
                                                                                                  b2, b2, b2, b2, b2, b2, b2, b2, b3, b3, b3, b3, b3, b3, b3, b3));
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    return _mm256_or_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(1));
}

/* Four groups' 7-bit sign indices packed in a (bits 0, 7, 14, 21: IQ2_XXS, IQ3_XXS) as +-1 bytes: four
 * KSIGNS_BYTES rows (parity_signs on the four fields was 1.08-1.13x the time here: the fields need a variable shift). */
static inline __m256i ksign_bytes(uint32_t a) {
    return rows4(KSIGNS_BYTES, a & 127, (a >> 7) & 127, (a >> 14) & 127, (a >> 21) & 127);
}

/* The grid types' (IQ2_*, IQ3_*) chunk c as its unsigned grid values g and their signs as +-1 bytes s: the
 * codes are sign(g, s) (g is never 0). The grid rows are gathered four (or eight) at a time and the signs come
 * as bytes (KSIGNS_BYTES, or the stored sign bits), as llama.cpp's AVX2 vec_dots take them. */
static inline __attribute__((always_inline)) void iq_grid_signs(int type, const uint8_t *b, int c, __m256i *g, __m256i *s) {
    const __m256i one = _mm256_set1_epi8(1);
    switch (type) {
    case KQ_IQ2_XXS: {
        const uint32_t a0 = rd32(b + 2 + 8 * c), a1 = rd32(b + 6 + 8 * c);
        *g = rows4(IQ2XXS_GRID, a0 & 255, (a0 >> 8) & 255, (a0 >> 16) & 255, a0 >> 24), *s = ksign_bytes(a1);
        break;
    }
    case KQ_IQ2_XS: { /* 9 grid bits and 7 sign bits a group */
        uint16_t v[4];
        memcpy(v, b + 2 + 8 * c, 8);
        *g = rows4(IQ2XS_GRID, v[0] & 511, v[1] & 511, v[2] & 511, v[3] & 511);
        const __m128i s7 = _mm_srli_epi16(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * c)), 9); /* 4 x 16-bit lanes */
        *s = parity_signs(s7, _mm_and_si128(_mm_xor_si128(s7, _mm_srli_epi16(s7, 4)), _mm_set1_epi16(15)), 0, 2, 4, 6);
        break;
    }
    case KQ_IQ2_S: {
        const unsigned h = b[66 + c];
        const uint8_t *qs = b + 2 + 4 * c;
        *g = rows4(IQ2S_GRID, qs[0] | ((h << 8) & 0x300), qs[1] | ((h << 6) & 0x300), qs[2] | ((h << 4) & 0x300), qs[3] | ((h << 2) & 0x300));
        *s = _mm256_or_si256(bit_bytes(rd32(b + 34 + 4 * c)), one);
        break;
    }
    case KQ_IQ3_XXS: { /* eight rows of 4, a byte each (a vpgatherdd of them was 1.31x the time) */
        const uint8_t *qs = b + 2 + 8 * c;
        *g = _mm256_setr_epi32((int)IQ3XXS_GRID[qs[0]], (int)IQ3XXS_GRID[qs[1]], (int)IQ3XXS_GRID[qs[2]], (int)IQ3XXS_GRID[qs[3]],
                               (int)IQ3XXS_GRID[qs[4]], (int)IQ3XXS_GRID[qs[5]], (int)IQ3XXS_GRID[qs[6]], (int)IQ3XXS_GRID[qs[7]]);
        *s = ksign_bytes(rd32(b + 66 + 4 * c));
        break;
    }
    default: { /* KQ_IQ3_S: 8 bits + the qh bit, the indices in a vector and one gather (0.85x the time of eight
                * scalar indices and loads), as llama.cpp's AVX2 loop takes them */
        const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * c)));
        const __m256i hi = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(b[66 + c]), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), _mm256_set1_epi32(1));
        *g = _mm256_i32gather_epi32((const int *)IQ3S_GRID, _mm256_or_si256(lo, _mm256_slli_epi32(hi, 8)), 4);
        *s = _mm256_or_si256(bit_bytes(rd32(b + 74 + 4 * c)), one);
    }
    }
}

static inline int iq_signed_grid(int type) { return type >= KQ_IQ2_XXS && type <= KQ_IQ3_S; }

/* iq_codes32 as one vector: the same bytes (the grid types: sign(g, s); IQ1: 8 v + delta). */
static inline __attribute__((always_inline)) __m256i iq_codes32_v(int type, const uint8_t *b, int c) {
    if (iq_signed_grid(type)) {
        __m256i g, s;
        iq_grid_signs(type, b, c, &g, &s);
        return _mm256_sign_epi8(g, s);
    }
    switch (type) {
    case KQ_IQ1_S: {
        const unsigned h = rd16(b + 34 + 2 * c);
        const uint8_t *qs = b + 2 + 4 * c;
        const __m256i g = rows4(IQ1S_GRID, qs[0] | ((h << 8) & 0x700), qs[1] | ((h << 5) & 0x700), qs[2] | ((h << 2) & 0x700), qs[3] | ((h >> 1) & 0x700));
        const __m256i g2 = _mm256_add_epi8(g, g), g4 = _mm256_add_epi8(g2, g2);
        return _mm256_add_epi8(_mm256_add_epi8(g4, g4), _mm256_set1_epi8((char)(1 - 2 * (int)(h >> 15)))); /* 8 v + delta (no branch: random bits) */
    }
    default: { /* KQ_IQ1_M */
        const unsigned h0 = b[32 + 2 * c], h1 = b[33 + 2 * c];
        const uint8_t *qs = b + 4 * c;
        const __m256i g = rows4(IQ1S_GRID, qs[0] | ((h0 << 8) & 0x700), qs[1] | ((h0 << 4) & 0x700), qs[2] | ((h1 << 8) & 0x700), qs[3] | ((h1 << 4) & 0x700));
        const __m256i g2 = _mm256_add_epi8(g, g), g4 = _mm256_add_epi8(g2, g2);
        /* the deltas' signs, bit 3 of each nibble, as bytes: h0 to bytes 0-15, h1 to 16-31, bit 3 / 7 picked per 8 */
        const __m256i hb = _mm256_shuffle_epi8(_mm256_set1_epi16((short)(h0 | (h1 << 8))),
                                               _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1));
        const __m256i bit = _mm256_setr_epi8(8, 8, 8, 8, 8, 8, 8, 8, -128, -128, -128, -128, -128, -128, -128, -128, 8, 8, 8, 8, 8, 8, 8, 8, -128, -128,
                                             -128, -128, -128, -128, -128, -128);
        const __m256i delta = _mm256_or_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, bit), bit), _mm256_set1_epi8(1)); /* -1 where set, else +1 */
        return _mm256_add_epi8(_mm256_add_epi8(g4, g4), delta);
    }
    }
}
#endif

/* One block -> codes q[block] (skipped when q is NULL: the AVX2 kernels make codes themselves),
 * scale sc[subs], offset mn[subs] (offset types only). */
static inline __attribute__((always_inline)) void decode(int type, const uint8_t *b, int8_t *q, float *sc, float *mn) {
    switch (type) {
    case KQ_Q4_0: {
#ifdef __AVX2__
        if (q) {
            store16(q, _mm_sub_epi8(nib_lo(b + 2), _mm_set1_epi8(8)));
            store16(q + 16, _mm_sub_epi8(nib_hi(b + 2), _mm_set1_epi8(8)));
        }
#else
        if (q) for (int j = 0; j < 16; j++) {
            q[j] = (int8_t)((b[2 + j] & 15) - 8);
            q[j + 16] = (int8_t)((b[2 + j] >> 4) - 8);
        }
#endif
        sc[0] = f16(b);
        break;
    }
    case KQ_Q5_0:
    case KQ_Q5_1: {
        const int o = type == KQ_Q5_1 ? 2 : 0, zero = type == KQ_Q5_1 ? 0 : 16;
        uint32_t qh;
        memcpy(&qh, b + 2 + o, 4);
#ifdef __AVX2__
        if (q) {
            const __m128i z = _mm_set1_epi8((char)zero);
            store16(q, _mm_sub_epi8(_mm_or_si128(nib_lo(b + 6 + o), fifth_bits(qh & 0xffff)), z));
            store16(q + 16, _mm_sub_epi8(_mm_or_si128(nib_hi(b + 6 + o), fifth_bits(qh >> 16)), z));
        }
#else
        if (q) {
            uint8_t hb[32]; /* the fifth bits, one byte each (bit j of qh for code j) */
            for (int j = 0; j < 32; j++) hb[j] = (uint8_t)(((qh >> j) & 1) << 4);
            for (int j = 0; j < 16; j++) {
                q[j] = (int8_t)(((b[6 + o + j] & 15) | hb[j]) - zero);
                q[j + 16] = (int8_t)(((b[6 + o + j] >> 4) | hb[j + 16]) - zero);
            }
        }
#endif
        sc[0] = f16(b);
        if (o) mn[0] = -f16(b + 2);
        break;
    }
    case KQ_Q4_1: {
#ifdef __AVX2__
        if (q) {
            store16(q, nib_lo(b + 4));
            store16(q + 16, nib_hi(b + 4));
        }
#else
        if (q) for (int j = 0; j < 16; j++) {
            q[j] = (int8_t)(b[4 + j] & 15);
            q[j + 16] = (int8_t)(b[4 + j] >> 4);
        }
#endif
        sc[0] = f16(b);
        mn[0] = -f16(b + 2);
        break;
    }
    case KQ_IQ4_NL: {
#ifdef __AVX2__
        if (q) {
            const __m128i lut = _mm_loadu_si128((const __m128i *)IQ4_VALUES);
            store16(q, _mm_shuffle_epi8(lut, nib_lo(b + 2)));
            store16(q + 16, _mm_shuffle_epi8(lut, nib_hi(b + 2)));
        }
#else
        if (q) for (int j = 0; j < 16; j++) {
            q[j] = IQ4_VALUES[b[2 + j] & 15];
            q[j + 16] = IQ4_VALUES[b[2 + j] >> 4];
        }
#endif
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
        if (q && type == KQ_Q5_K) /* the fifth bit of code 32 c + l is bit c of qh[l]: a constant shift per c, so the loop vectorises */
            for (int c = 0; c < 8; c++)
                for (int l = 0; l < 32; l++) q[c * 32 + l] = (int8_t)(q[c * 32 + l] | (((qh[l] >> c) & 1) << 4));
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
#ifdef __AVX2__
        if (q) {
            const __m128i lut = _mm_loadu_si128((const __m128i *)IQ4_VALUES);
            for (int s = 0; s < 8; s++) {
                store16(q + s * 32, _mm_shuffle_epi8(lut, nib_lo(qs + s * 16)));
                store16(q + s * 32 + 16, _mm_shuffle_epi8(lut, nib_hi(qs + s * 16)));
            }
        }
#else
        if (q) for (int s = 0; s < 8; s++)
            for (int l = 0; l < 16; l++) {
                q[s * 32 + l] = IQ4_VALUES[qs[s * 16 + l] & 15];
                q[s * 32 + 16 + l] = IQ4_VALUES[qs[s * 16 + l] >> 4];
            }
#endif
        break;
    }
    default: /* the i-quants */
        iq_scales(type, b, sc, NULL, NULL);
#ifdef __AVX2__
        if (q) for (int c = 0; c < 8; c++) _mm256_storeu_si256((__m256i *)(q + 32 * c), iq_codes32_v(type, b, c));
#else
        if (q) for (int c = 0; c < 8; c++) iq_codes32(type, b, c, q + 32 * c);
#endif
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
        /* A sub-block at a time with its scale (and offset) hoisted: the loop vectorises for the 16-weight
         * sub-blocks too (written as one loop over the block with sc[s] inside, gcc kept Q2_K / Q3_K / Q6_K
         * scalar: 3 G weights/s against Q4_K's 8.8). x - 0 is x (also -0), so one form serves both kinds. */
        for (int s = 0; s < in.block / in.sub; s++) {
            const float a = sc[s], m = in.has_offset ? mn[s] : 0.0f;
            const int8_t *qs = q + s * in.sub;
            float *os = o + s * in.sub;
#pragma GCC ivdep
            for (int i = 0; i < in.sub; i++) os[i] = a * (float)qs[i] - m;
        }
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
        DEQUANT_OF(KQ_IQ2_XXS) DEQUANT_OF(KQ_IQ2_XS) DEQUANT_OF(KQ_IQ2_S) DEQUANT_OF(KQ_IQ3_XXS) DEQUANT_OF(KQ_IQ3_S) DEQUANT_OF(KQ_IQ1_S)
        DEQUANT_OF(KQ_IQ1_M)
    }
    return 0;
}

/* Rows [n0, n1) of W as bf16 into out [(n1 - n0), k]: kq_dequant's floats rounded to nearest even (a prompt's
 * bf16 GEMM tile: quant/native.py bf16_tiled_linear). 0, or -1 for a bad type / shape / range. */
#define DEQUANT_BF16_OF(TYPE)                                                                                        \
    case TYPE:                                                                                                       \
        _Pragma("omp parallel for num_threads(nth) schedule(dynamic, lg_chunk(n1 - n0, nth))") for (int r = n0; r < n1; r++) { \
            float *tmp = malloc((size_t)k * sizeof(float));                                                          \
            uint16_t *o = out + (size_t)(r - n0) * k;                                                                \
            if (!tmp) { /* out of memory: NaNs, seen, not a silently wrong product */                                \
                for (int i = 0; i < k; i++) o[i] = 0x7fc0;                                                           \
                continue;                                                                                            \
            }                                                                                                        \
            dequant_row(TYPE, w + (size_t)r * row_bytes, k, tmp);                                                    \
            row_to_bf16(tmp, k, o);                                                                                  \
            free(tmp);                                                                                               \
        }                                                                                                            \
        break;

int kq_dequant_bf16(int type, const uint8_t *w, int n, int k, int n0, int n1, uint16_t *out, int nth) {
    if (!valid(type, n, k) || n0 < 0 || n1 > n || n0 > n1) return -1;
    const size_t row_bytes = (size_t)(k / INFO[type].block) * INFO[type].nbytes;
    if ((size_t)(n1 - n0) * k < (1u << 16)) nth = 1;
    switch (type) {
        DEQUANT_BF16_OF(KQ_Q4_0) DEQUANT_BF16_OF(KQ_Q5_0) DEQUANT_BF16_OF(KQ_Q2_K) DEQUANT_BF16_OF(KQ_Q3_K) DEQUANT_BF16_OF(KQ_Q4_K)
        DEQUANT_BF16_OF(KQ_Q5_K) DEQUANT_BF16_OF(KQ_Q6_K) DEQUANT_BF16_OF(KQ_IQ4_XS) DEQUANT_BF16_OF(KQ_Q4_1) DEQUANT_BF16_OF(KQ_Q5_1)
        DEQUANT_BF16_OF(KQ_IQ4_NL) DEQUANT_BF16_OF(KQ_IQ2_XXS) DEQUANT_BF16_OF(KQ_IQ2_XS) DEQUANT_BF16_OF(KQ_IQ2_S) DEQUANT_BF16_OF(KQ_IQ3_XXS)
        DEQUANT_BF16_OF(KQ_IQ3_S) DEQUANT_BF16_OF(KQ_IQ1_S) DEQUANT_BF16_OF(KQ_IQ1_M)
    }
    return 0;
}

/* ---- int8 activations: codes times int8 x as integers (llama.cpp's vec_dot approach) ----
 * The activations are rounded to int8 per block of `act_block` values, as llama.cpp's Q8_K / Q8_0
 * do: 256 for the K-quant types (one scale per super-block, so a super-block's code products and
 * integer sub-block scales are summed as integers and converted to float once per token), 32 for
 * the 32-weight types. Per block dx = amax / 127, xq = round-half-even(x * (1 / dx)), and the
 * integer sums of xq per 16 (K types: their offsets and the Q3_K / Q6_K code bias) or per 32. So
 * kq_matmul_q8 equals (x rounded to that grid) @ W.T to fp32 rounding (quant/kquants.py int8_grid):
 * the activation rounding is the price of the integer product (what llama.cpp pays too).
 *
 * Tokens run 4 or 8 at a time per weight row (TILE_K, TILE_32), the rest in tiles of 4, 3, 2 or 1 (KQ_REST):
 * each block's codes are unpacked once and multiplied with every token of the tile (the row stays in L1
 * between tiles). A token's own operations -- its integer sums, its float accumulator and their order --
 * are the same alone or in a tile of any width, so its result is bit-identical whatever the number of
 * tokens in the call. */

#define KQ_TILE 8 /* most tokens per tile (the accumulators' arrays) */
/* tokens per tile by kind, measured (2-core Zen 2): the 32-weight types unpack 8 blocks' codes per
 * group and gain from sharing them wider; the K types with 4-bit codes keep their accumulators in
 * registers at 4 */
#define TILE_32 8
#define TILE_K(TYPE) ((TYPE) == KQ_Q6_K || (TYPE) == KQ_Q3_K ? 8 : 4)

static inline int act_block(int type) { return INFO[type].block == QK_K ? QK_K : 32; }
static inline int act_sum(int type) { return INFO[type].block == QK_K ? 16 : 32; } /* values per integer sum */

/* Software prefetch this far ahead of the block being read. A one-token product streams each weight
 * row from memory once; the hardware prefetcher alone kept one thread at ~10 GB/s on Q4_K, 2 KiB
 * ahead reached ~13 (1 thread, Zen 2; 512 B / 1 KiB gave less, 3-6 KiB the same). Past the row's end
 * it fetches the next row's start, past the matrix's end nothing that faults. */
#define KQ_PREFETCH 2048
static inline void prefetch_ahead(const uint8_t *p, int bytes) {
    for (int o = 0; o < bytes; o += 64) __builtin_prefetch(p + KQ_PREFETCH + o, 0, 3);
}

/* x [k] -> int8 xq, per qa values the scale dx, per ss values the integer sum xs of the codes.
 * AVX2: the same operations lane by lane (|x| maxima, x * (1 / d) rounded to nearest-even by
 * cvtps as lrintf rounds, integer sums), so the same bytes; a decode call spent ~3% here scalar. */
static void quant_act(const float *x, int k, int qa, int ss, int8_t *xq, float *dx, int16_t *xs) {
#ifdef __AVX2__
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int b = 0; b < k / qa; b++) {
        const float *xb = x + (size_t)b * qa;
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < qa; i += 8) m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)), m); /* a NaN lane is skipped, as the scalar compare skips it */
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h), d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        const __m256 idv = _mm256_set1_ps(id);
        for (int i = 0; i < qa; i += 32) {
            __m256i q[4];
            for (int j = 0; j < 4; j++) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8 * j), idv));
            /* |codes| <= 127: the saturating packs are exact; they interleave 128-bit lanes, `order` undoes it */
            const __m256i v = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), order);
            _mm256_storeu_si256((__m256i *)(xq + (size_t)b * qa + i), v);
            __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16); /* 8 sums of 4 codes */
            s = _mm256_hadd_epi32(s, s), s = _mm256_hadd_epi32(s, s);             /* lane 0: codes 0..15, lane 4: 16..31 */
            const int lo = _mm256_extract_epi32(s, 0), hi = _mm256_extract_epi32(s, 4);
            if (ss == 16)
                xs[((size_t)b * qa + i) / 16] = (int16_t)lo, xs[((size_t)b * qa + i) / 16 + 1] = (int16_t)hi;
            else
                xs[((size_t)b * qa + i) / 32] = (int16_t)(lo + hi);
        }
        dx[b] = d;
    }
#else
    for (int b = 0; b < k / qa; b++) {
        const float *xb = x + (size_t)b * qa;
        float amax = 0.0f;
        for (int i = 0; i < qa; i++) amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
        const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        for (int i = 0; i < qa; i += ss) {
            int s = 0;
            for (int j = i; j < i + ss; j++) {
                const int8_t v = (int8_t)lrintf(xb[j] * id);
                xq[(size_t)b * qa + j] = v;
                s += v;
            }
            xs[((size_t)b * qa + i) / ss] = (int16_t)s;
        }
        dx[b] = d;
    }
#endif
}

/* A K-quant block's integer sub-block scales isc[16] and offsets imn[16] (the 8-sub-block types
 * repeat each entry twice, so both line up with the activations' sums per 16) and its fp16 factors
 * d (times isc) and dmin (times imn): w = d * isc * q - dmin * imn, the same integers decode() scales. */
static inline __attribute__((always_inline)) void kscales(int type, const uint8_t *b, int16_t *isc, int16_t *imn, float *d, float *dmin) {
    switch (type) {
    case KQ_Q2_K:
        for (int s = 0; s < 16; s++) isc[s] = (int16_t)(b[s] & 15), imn[s] = (int16_t)(b[s] >> 4);
        *d = f16(b + 80), *dmin = f16(b + 82);
        break;
    case KQ_Q3_K: {
        const uint8_t *s = b + 96;
        for (int i = 0; i < 16; i++) {
            const int lo = i < 8 ? s[i] & 15 : s[i - 8] >> 4, hi = (s[8 + (i & 3)] >> (2 * (i >> 2))) & 3;
            isc[i] = (int16_t)((lo | (hi << 4)) - 32);
        }
        *d = f16(b + 108);
        break;
    }
    case KQ_Q4_K:
    case KQ_Q5_K: {
        const uint8_t *s = b + 4;
        for (int j = 0; j < 8; j++) {
            isc[2 * j] = isc[2 * j + 1] = (int16_t)(j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 2) & 48));
            imn[2 * j] = imn[2 * j + 1] = (int16_t)(j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 2) & 48));
        }
        *d = f16(b), *dmin = f16(b + 2);
        break;
    }
    case KQ_Q6_K:
        for (int s = 0; s < 16; s++) isc[s] = (int16_t)(int8_t)b[192 + s];
        *d = f16(b + 208);
        break;
    case KQ_IQ4_XS: {
        const unsigned sh = (unsigned)b[2] | ((unsigned)b[3] << 8);
        for (int j = 0; j < 8; j++) isc[2 * j] = isc[2 * j + 1] = (int16_t)((((b[4 + (j >> 1)] >> (4 * (j & 1))) & 15) | (((sh >> (2 * j)) & 3) << 4)) - 32);
        *d = f16(b);
        break;
    }
    default: /* the i-quants */
        iq_scales(type, b, NULL, isc, d);
    }
}

#ifdef __AVX2__
/* 16 bytes -> 32 codes: low nibbles are elements 0..15, high nibbles 16..31 (the legacy/IQ4 order). */
static inline __m256i nib32(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

/* bytes >> s (each byte; s < 8), masked */
static inline __m256i shr_mask(__m256i v, int s, int mask) {
    return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(s)), _mm256_set1_epi8((char)mask));
}

static inline __m256i ld(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* Codes of chunk j (weights 32j..32j+31) of block b as bytes: unsigned (the stored code, before
 * any bias: Q3_K's -4 where the high bit is clear and Q6_K's -32 come back through the activation
 * sums, Q4_0's -8 and Q5_0's -16 too), signed for the IQ4 types (their table values). */
static inline __m256i codes32(int type, const uint8_t *b, int j) {
    const __m256i iq4 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_VALUES)), b16 = _mm256_set1_epi8(16);
    switch (type) {
    case KQ_Q4_0: return nib32(b + 2);
    case KQ_Q4_1: return nib32(b + 4);
    case KQ_IQ4_NL: return _mm256_shuffle_epi8(iq4, nib32(b + 2));
    case KQ_Q5_0: return _mm256_or_si256(nib32(b + 6), _mm256_and_si256(bit_bytes(rd32(b + 2)), b16));
    case KQ_Q5_1: return _mm256_or_si256(nib32(b + 8), _mm256_and_si256(bit_bytes(rd32(b + 4)), b16));
    case KQ_Q2_K: return shr_mask(ld(b + 16 + (j >> 2) * 32), 2 * (j & 3), 3);
    case KQ_Q3_K: return _mm256_or_si256(shr_mask(ld(b + 32 + (j >> 2) * 32), 2 * (j & 3), 3), _mm256_slli_epi16(shr_mask(ld(b), j, 1), 2));
    case KQ_Q4_K: return shr_mask(ld(b + 16 + (j >> 1) * 32), 4 * (j & 1), 15);
    case KQ_Q5_K: return _mm256_or_si256(shr_mask(ld(b + 48 + (j >> 1) * 32), 4 * (j & 1), 15), _mm256_slli_epi16(shr_mask(ld(b + 16), j, 1), 4));
    case KQ_Q6_K: {
        const int h = j >> 2, jj = j & 3;
        const __m256i lo = shr_mask(ld(b + h * 64 + (jj & 1) * 32), 4 * (jj >> 1), 15), hi = shr_mask(ld(b + 128 + h * 32), 2 * jj, 3);
        return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
    }
    case KQ_IQ4_XS: return _mm256_shuffle_epi8(iq4, nib32(b + 8 + j * 16));
    default: return iq_codes32_v(type, b, j); /* the i-quants */
    }
}

/* 8 vectors of int32 -> one: lane i holds the sum of p[i]'s lanes. */
static inline __m256i sum8x8(const __m256i *p) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/* Eight sub-block scales of 32 (int32 lanes) -> sixteen int16 per 16 weights, each twice. */
static inline __m256i twice16(__m256i v32) { return _mm256_or_si256(v32, _mm256_slli_epi32(v32, 16)); }

/* iq_scales' integer scales isc[16] and d as one vector (not IQ1_M's), without the scalar stores a
 * vector load would then wait on. */
static inline __attribute__((always_inline)) __m256i iq_scales_v(int type, const uint8_t *b, float *d) {
    const __m256i one = _mm256_set1_epi32(1);
    switch (type) {
    case KQ_IQ2_XXS: { /* the top 4 bits of the odd words of the 8 (grid, signs) pairs */
        const __m256i idx = _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7);
        const __m256i lo = _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i *)(b + 2)), idx);
        const __m256i hi = _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i *)(b + 34)), idx);
        *d = f16(b) * 0.125f;
        return twice16(_mm256_add_epi32(_mm256_slli_epi32(_mm256_srli_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), 28), 1), one));
    }
    case KQ_IQ3_XXS:
        *d = f16(b) * 0.25f;
        return twice16(_mm256_add_epi32(_mm256_slli_epi32(_mm256_srli_epi32(_mm256_loadu_si256((const __m256i *)(b + 66)), 28), 1), one));
    case KQ_IQ2_XS:
    case KQ_IQ2_S: { /* 16 nibbles, low first byte by byte */
        uint64_t x;
        memcpy(&x, b + (type == KQ_IQ2_XS ? 66 : 74), 8);
        const __m128i v = _mm_cvtsi64_si128((long long)x), m = _mm_set1_epi8(15);
        const __m256i n = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m)));
        *d = f16(b) * 0.125f;
        return _mm256_add_epi16(_mm256_slli_epi16(n, 1), _mm256_set1_epi16(1));
    }
    case KQ_IQ3_S: { /* 8 nibbles, 1 + 2 s */
        uint32_t x;
        memcpy(&x, b + 106, 4);
        const __m128i v = _mm_cvtsi32_si128((int)x), m = _mm_set1_epi8(15);
        const __m256i n = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m)));
        *d = f16(b);
        return twice16(_mm256_add_epi32(_mm256_slli_epi32(n, 1), one));
    }
    case KQ_IQ1_M: { /* 3 bits at 0, 3, 6, 9 of each of the 4 scale words: moved to bits 9-11 by a multiply, then down */
        uint16_t u[4];
        memcpy(u, b + 48, 8);
        const uint16_t h = (uint16_t)((u[0] >> 12) | ((u[1] >> 8) & 0x00f0) | ((u[2] >> 4) & 0x0f00) | (u[3] & 0xf000));
        uint8_t hb[2];
        memcpy(hb, &h, 2);
        *d = f16(hb) * 0.125f;
        uint64_t all;
        memcpy(&all, u, 8);
        const __m256i w = _mm256_shuffle_epi8(_mm256_set1_epi64x((long long)all), /* each word to four lanes */
                                              _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 4, 5, 4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7));
        const __m256i up = _mm256_mullo_epi16(w, _mm256_setr_epi16(512, 64, 8, 1, 512, 64, 8, 1, 512, 64, 8, 1, 512, 64, 8, 1));
        const __m256i ls = _mm256_and_si256(_mm256_srli_epi16(up, 9), _mm256_set1_epi16(7));
        return _mm256_add_epi16(_mm256_slli_epi16(ls, 1), _mm256_set1_epi16(1));
    }
    default: { /* KQ_IQ1_S: bits 12-14 of the 8 qh words */
        const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(b + 34)));
        *d = f16(b) * 0.125f;
        return twice16(_mm256_add_epi32(_mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 12), _mm256_set1_epi32(7)), 1), one));
    }
    }
}

/* kscales() as vectors (16 int16 each), the common types without a scalar loop: Q4_K / Q5_K's 6-bit
 * scales and mins unpacked as llama.cpp does (32-bit masks), Q2_K's nibbles, Q6_K's bytes. */
static inline __attribute__((always_inline)) void kscales_v(int type, const uint8_t *b, __m256i *sc, __m256i *mn, float *d, float *dmin) {
    if (type == KQ_Q4_K || type == KQ_Q5_K) {
        uint32_t u[4];
        memcpy(u, b + 4, 12);
        u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
        const uint32_t m03 = u[1] & 0x3f3f3f3f;
        u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
        u[2] = m03;
        u[0] &= 0x3f3f3f3f;
        const __m128i v = _mm_loadu_si128((const __m128i *)u); /* bytes: 8 scales, 8 mins */
        *sc = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(v, v)), *mn = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(v, v));
        *d = f16(b), *dmin = f16(b + 2);
    } else if (type == KQ_Q2_K) {
        const __m128i v = _mm_loadu_si128((const __m128i *)b), m = _mm_set1_epi8(15);
        *sc = _mm256_cvtepu8_epi16(_mm_and_si128(v, m)), *mn = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), m));
        *d = f16(b + 80), *dmin = f16(b + 82);
    } else if (type == KQ_IQ4_XS) { /* 8 x (4 low bits from b[4..7], 2 high from b[2..3]) - 32, one byte each */
        uint32_t lo;
        memcpy(&lo, b + 4, 4);
        uint64_t l = (lo & 0xffffu) | ((uint64_t)(lo >> 16) << 32), h = (uint64_t)b[2] | ((uint64_t)b[3] << 32);
        l = (l | (l << 8)) & 0x00ff00ff00ff00ffULL, l = (l | (l << 4)) & 0x0f0f0f0f0f0f0f0fULL;
        h = (h | (h << 12)) & 0x000f000f000f000fULL, h = (h | (h << 6)) & 0x0303030303030303ULL;
        const __m128i v = _mm_cvtsi64_si128((long long)(l | (h << 4)));
        *sc = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(v, v)), _mm256_set1_epi16(32));
        *d = f16(b);
    } else if (type == KQ_Q3_K) { /* 16 x (4 low bits from b[96..103], 2 high from b[104..107]) - 32, as llama.cpp unpacks them */
        uint32_t a[3];
        memcpy(a, b + 96, 12);
        const uint32_t m4 = 0x0f0f0f0f, m2 = 0x03030303;
        const __m128i v = _mm_setr_epi32((int)((a[0] & m4) | ((a[2] & m2) << 4)), (int)((a[1] & m4) | (((a[2] >> 2) & m2) << 4)),
                                         (int)(((a[0] >> 4) & m4) | (((a[2] >> 4) & m2) << 4)), (int)(((a[1] >> 4) & m4) | (((a[2] >> 6) & m2) << 4)));
        *sc = _mm256_sub_epi16(_mm256_cvtepu8_epi16(v), _mm256_set1_epi16(32));
        *d = f16(b + 108);
    } else if (type == KQ_Q6_K) {
        *sc = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));
        *d = f16(b + 208);
    } else if (iq_grid_type(type)) {
        *sc = iq_scales_v(type, b, d);
    } else {
        int16_t isc[16], imn[16];
        kscales(type, b, isc, imn, d, dmin);
        *sc = _mm256_loadu_si256((const __m256i *)isc);
    }
}

/* Chunk c's scales from kscales_v's 16: sub-block 2c in the low 8 int16, 2c + 1 in the high 8. */
static inline __m256i chunk_scales(__m256i lo8, __m256i hi8, int c) {
    const __m256i pick = _mm256_add_epi8(_mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3),
                                         _mm256_set1_epi8((char)(4 * (c & 3))));
    return _mm256_shuffle_epi8(c < 4 ? lo8 : hi8, pick);
}

/* A K-quant block unpacked: per chunk its codes and scale vector (chunk_scales), the scales and offsets
 * as vectors (kscales_v) and d, dmin. */
typedef struct {
    __m256i codes[8], sc[8], sc16, mn16;
    float d, dmin, pad_[6];
} kq_block;

static inline __attribute__((always_inline)) void kblock_unpack(const int type, const uint8_t *blk, kq_block *u) {
    u->mn16 = _mm256_setzero_si256(), u->dmin = 0.0f;
    kscales_v(type, blk, &u->sc16, &u->mn16, &u->d, &u->dmin);
    const __m256i sc_lo = _mm256_permute2x128_si256(u->sc16, u->sc16, 0x00), sc_hi = _mm256_permute2x128_si256(u->sc16, u->sc16, 0x11);
    for (int c = 0; c < 8; c++) u->codes[c] = codes32(type, blk, c), u->sc[c] = chunk_scales(sc_lo, sc_hi, c);
}

/* acc + madd(p, s): one vpdpwssd where AVX512-VNNI (with VL) or AVX-VNNI has it, else madd then add --
 * the same int32 lanes either way (both wrap alike). */
static inline __m256i madd_acc(__m256i acc, __m256i p, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, p, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpwssd_avx_epi32(acc, p, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, s));
#endif
}

/* A grid-type block (IQ2_*, IQ3_*) against one token, as kblock_tokens computes it -- the same int32 lanes
 * (each lane the same bytes' products), so the same float steps and bits -- with the signs applied to the
 * activations (maddubs(g, sign(x, s))) and a chunk's scale broadcast from a scalar where it has one per 32
 * weights (IQ2_XXS, IQ3_*; IQ2_XS / IQ2_S, a scale per 16, pick theirs from the block's scale vector), two
 * chunks a step into two accumulators, as llama.cpp's i-quant loops run: the decode step's product. */
/* IQ2_XS: one block's 32 grid indices (gi) and its 8 chunks' signs as +-1 bytes (signs[c], iq_grid_signs' s), 16
 * groups a vector -- the parity fold and the index mask once per 16 groups instead of once per chunk's 4, as
 * llama.cpp's AVX2 loop takes them (one token, one thread: IQ2_XS was 0.86-0.91x its speed chunk by chunk). */
static inline __attribute__((always_inline)) void iq2xs_block_signs(const uint8_t *b, uint16_t *gi, __m256i *signs) {
    const __m256i odd = _mm256_setr_epi8(0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0,
                                         0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0); /* 0x80: 4 bits of odd parity */
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL), one = _mm256_set1_epi8(1);
    const __m256i first = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6);
    const __m256i second = _mm256_add_epi8(first, _mm256_set1_epi8(8));
    for (int h = 0; h < 2; h++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(b + 2 + 32 * h)); /* groups 16h..16h+15, a 16-bit word each */
        _mm256_storeu_si256((__m256i *)(gi + 16 * h), _mm256_and_si256(q, _mm256_set1_epi16(511)));
        const __m256i s7 = _mm256_srli_epi16(q, 9); /* the 7 stored signs; the 8th is their parity: fold 7 bits to 4, look it up */
        const __m256i full = _mm256_or_si256(s7, _mm256_shuffle_epi8(odd, _mm256_and_si256(_mm256_xor_si256(s7, _mm256_srli_epi16(s7, 4)), _mm256_set1_epi16(15))));
        const __m256i lo = _mm256_permute2x128_si256(full, full, 0x00), hi = _mm256_permute2x128_si256(full, full, 0x11);
        const __m256i halves[4] = {_mm256_shuffle_epi8(lo, first), _mm256_shuffle_epi8(lo, second), _mm256_shuffle_epi8(hi, first), _mm256_shuffle_epi8(hi, second)};
        for (int j = 0; j < 4; j++) signs[4 * h + j] = _mm256_or_si256(_mm256_cmpeq_epi8(_mm256_and_si256(halves[j], bit), bit), one);
    }
}

/* iq_block_1tok's step: chunks c and c + 1 into the accumulators s1 and s2 (IQ2_XS: from iq2xs_block_signs' gi
 * and signs, the same values iq_grid_signs gives). */
static inline __attribute__((always_inline)) void iq_chunks_1tok(const int type, const uint8_t *blk, const int8_t *x, int c, const int16_t *isc, __m256i lo8,
                                                                 __m256i hi8, const uint16_t *gi, const __m256i *signs, __m256i *s1, __m256i *s2) {
    __m256i g1, g2, sg1, sg2;
    if (type == KQ_IQ2_XS) {
        g1 = rows4(IQ2XS_GRID, gi[4 * c], gi[4 * c + 1], gi[4 * c + 2], gi[4 * c + 3]), sg1 = signs[c];
        g2 = rows4(IQ2XS_GRID, gi[4 * c + 4], gi[4 * c + 5], gi[4 * c + 6], gi[4 * c + 7]), sg2 = signs[c + 1];
    } else {
        iq_grid_signs(type, blk, c, &g1, &sg1);
        iq_grid_signs(type, blk, c + 1, &g2, &sg2);
    }
    const __m256i p1 = _mm256_maddubs_epi16(g1, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(x + 32 * c)), sg1));
    const __m256i p2 = _mm256_maddubs_epi16(g2, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(x + 32 * c + 32)), sg2));
    const __m256i sc1 = INFO[type].sub == 16 ? chunk_scales(lo8, hi8, c) : _mm256_set1_epi16(isc[2 * c]);
    const __m256i sc2 = INFO[type].sub == 16 ? chunk_scales(lo8, hi8, c + 1) : _mm256_set1_epi16(isc[2 * c + 2]);
    *s1 = madd_acc(*s1, p1, sc1);
    *s2 = madd_acc(*s2, p2, sc2);
}

static inline __attribute__((always_inline)) void iq_block_1tok(const int type, const uint8_t *blk, const int8_t *x, float dt, __m256 *acc) {
    int16_t isc[16];
    float d;
    __m256i lo8 = _mm256_setzero_si256(), hi8 = lo8;
    if (INFO[type].sub == 16) {
        const __m256i sc16 = iq_scales_v(type, blk, &d);
        lo8 = _mm256_permute2x128_si256(sc16, sc16, 0x00), hi8 = _mm256_permute2x128_si256(sc16, sc16, 0x11);
    } else {
        iq_scales(type, blk, NULL, isc, &d);
    }
    __m256i s1 = _mm256_setzero_si256(), s2 = s1, signs[8];
    uint16_t gi[32];
    if (type == KQ_IQ2_XS) iq2xs_block_signs(blk, gi, signs);
    if (type == KQ_IQ2_S) { /* unrolled: 0.8x the time for IQ2_S; 1.05-1.17x for IQ2_XS / IQ3_XXS, which keep the loop */
#pragma GCC unroll 4
        for (int c = 0; c < 8; c += 2) iq_chunks_1tok(type, blk, x, c, isc, lo8, hi8, gi, signs, &s1, &s2);
    } else {
        for (int c = 0; c < 8; c += 2) iq_chunks_1tok(type, blk, x, c, isc, lo8, hi8, gi, signs, &s1, &s2);
    }
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s1, s2)), _mm256_set1_ps(d * dt), *acc);
}

/* NT tokens' step over block b (token t's activations at xq + t * k, block scales dx + t * nb, sums per 16
 * xs + t * k / 16): the codes times activations and sub-block scales summed as int32 (maddubs, madd),
 * then one fma per 8 lanes into acc[t]. The block comes unpacked (u), or packed (blk, u NULL: unpacked
 * as it goes; always inlined, so the choice folds away): the same operations per token either way. */
static inline __attribute__((always_inline)) void kblock_tokens(const int type, const int NT, const uint8_t *blk, const kq_block *u, int b, int nb,
                                                                int k, const int8_t *xq, const float *dx, const int16_t *xs, __m256 *acc) {
    if (NT == 1 && !u && iq_signed_grid(type)) {
        iq_block_1tok(type, blk, xq + (size_t)b * QK_K, dx[b], acc);
        return;
    }
    const int is_iq4 = signed_codes(type), bias_shift = type == KQ_Q3_K ? 2 : type == KQ_Q6_K ? 5 : 0;
    __m256i sc16, mn16 = _mm256_setzero_si256(), sc_lo = _mm256_setzero_si256(), sc_hi = sc_lo;
    float d, dmin = 0.0f;
    if (u) {
        sc16 = u->sc16, mn16 = u->mn16, d = u->d, dmin = u->dmin;
    } else {
        kscales_v(type, blk, &sc16, &mn16, &d, &dmin);
        sc_lo = _mm256_permute2x128_si256(sc16, sc16, 0x00), sc_hi = _mm256_permute2x128_si256(sc16, sc16, 0x11);
    }
    /* one token: even and odd chunks into two int32 accumulators (one chain of 8 dependent multiply-adds was the
     * block's critical path: 0.91-0.94x the time for Q2_K-Q5_K and IQ4_XS, measured in one process against one
     * chain); a tile's tokens already interleave their chains. Integer sums in any order are the same sums. */
    __m256i sumi[KQ_TILE], sumj[KQ_TILE];
    for (int t = 0; t < NT; t++) sumi[t] = sumj[t] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int c = 0; c < 8; c++) {
        const __m256i v = u ? u->codes[c] : codes32(type, blk, c), av = is_iq4 ? _mm256_sign_epi8(v, v) : v;
        const __m256i sc = u ? u->sc[c] : chunk_scales(sc_lo, sc_hi, c);
        for (int t = 0; t < NT; t++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (size_t)t * k + (size_t)b * QK_K + c * 32));
            const __m256i p = _mm256_maddubs_epi16(av, is_iq4 ? _mm256_sign_epi8(xv, v) : xv);
            if ((c & 1) && NT == 1)
                sumj[t] = madd_acc(sumj[t], p, sc);
            else
                sumi[t] = madd_acc(sumi[t], p, sc);
        }
    }
    for (int t = 0; t < NT; t++) sumi[t] = _mm256_add_epi32(sumi[t], sumj[t]);
    if (bias_shift) /* codes were stored + 4 (Q3_K) / + 32 (Q6_K): subtract scale * bias * sum(x) */
        for (int t = 0; t < NT; t++) {
            const __m256i s = _mm256_loadu_si256((const __m256i *)(xs + (size_t)t * (k / 16) + (size_t)b * 16));
            sumi[t] = _mm256_sub_epi32(sumi[t], _mm256_slli_epi32(_mm256_madd_epi16(sc16, s), bias_shift));
        }
    for (int t = 0; t < NT; t++) {
        const float dt = dx[(size_t)t * nb + b];
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_set1_ps(d * dt), acc[t]);
        if (INFO[type].has_offset) {
            const __m256i s = _mm256_loadu_si256((const __m256i *)(xs + (size_t)t * (k / 16) + (size_t)b * 16));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(mn16, s)), _mm256_set1_ps(-(dmin * dt)), acc[t]);
        }
    }
}

/* One K-quant weight row (nb blocks) against NT tokens: y[t * ystride]. `unpacked` (kq_row_alloc's
 * blocks, filled by rowk_unpack) when the row was unpacked for many tiles, else NULL: the blocks are
 * unpacked as they go. The same operations per token either way. */
static inline __attribute__((always_inline)) void rowk_any(const int type, const int NT, const uint8_t *row, const kq_block *unpacked, int nb, int k,
                                                           const int8_t *xq, const float *dx, const int16_t *xs, float *y, size_t ystride) {
    __m256 acc[KQ_TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        if (!unpacked) prefetch_ahead(row + (size_t)b * INFO[type].nbytes, INFO[type].nbytes);
        kblock_tokens(type, NT, unpacked ? NULL : row + (size_t)b * INFO[type].nbytes, unpacked ? unpacked + b : NULL, b, nb, k, xq, dx, xs, acc);
    }
    for (int t = 0; t < NT; t++) y[(size_t)t * ystride] = hsum256(acc[t]);
}

static inline __attribute__((always_inline)) void rowk(const int type, const int NT, const uint8_t *row, int nb, int k, const int8_t *xq,
                                                       const float *dx, const int16_t *xs, float *y, size_t ystride) {
    rowk_any(type, NT, row, NULL, nb, k, xq, dx, xs, y, ystride);
}

/* A K-quant row unpacked once for many tiles of tokens: [nb] blocks (aligned for the vectors). */
static kq_block *kq_row_alloc(int nb) { return aligned_alloc(32, sizeof(kq_block) * (size_t)nb); }

static inline __attribute__((always_inline)) void rowk_unpack(const int type, const uint8_t *row, int nb, kq_block *u) {
    for (int b = 0; b < nb; b++) prefetch_ahead(row + (size_t)b * INFO[type].nbytes, INFO[type].nbytes), kblock_unpack(type, row + (size_t)b * INFO[type].nbytes, u + b);
}

static inline __attribute__((always_inline)) void rowk_unpacked(const int type, const int NT, const kq_block *u, int nb, int k, const int8_t *xq,
                                                                const float *dx, const int16_t *xs, float *y, size_t ystride) {
    rowk_any(type, NT, NULL, u, nb, k, xq, dx, xs, y, ystride);
}

/* The fp16 at `at` of up to 8 blocks `stride` bytes apart as 8 floats (0 past `count`): packed into
 * integer registers and converted together (8 scalar stores and a vector load would stall). */
static inline __m256 f16x8(const uint8_t *p, size_t stride, int at, int count) {
#ifndef __F16C__
    float f[8] = {0};
    for (int i = 0; i < count; i++) f[i] = f16(p + (size_t)i * stride + at);
    return _mm256_loadu_ps(f);
#else
    uint64_t h[2] = {0, 0};
    for (int i = 0; i < count; i++) {
        uint16_t v;
        memcpy(&v, p + (size_t)i * stride + at, 2);
        h[i >> 2] |= (uint64_t)v << (16 * (i & 3));
    }
    return _mm256_cvtph_ps(_mm_set_epi64x((long long)h[1], (long long)h[0]));
#endif
}

/* One row of a 32-weight type (nb blocks) against NT tokens (token t at xq + t * k, scales dx + t * nb,
 * sums per 32 xs + t * nb). Blocks go 8 at a time: each block's codes times activations summed as
 * int32, the 8 sums gathered in one vector (sum8x8), converted and scaled by the 8 blocks' d * dx in
 * one fma. xq and xs must be readable 256 bytes / 8 sums past the last token (the tail group's unused
 * blocks read there: times codes 0, or masked off). */
/* NT tokens over one group of 8 blocks of a 32-weight row, from the group's codes v (av: what maddubs
 * takes), fp16 scales dwv / mwv and existing lanes `live`: each block's codes times activations summed
 * as int32, the 8 sums gathered in one vector, converted and scaled by the 8 blocks' d * dx in one fma. */
static inline __attribute__((always_inline)) void group32(const int type, const int NT, const __m256i *v, const __m256i *av, __m256 dwv, __m256 mwv,
                                                          __m256i live, int g, int nb, int k, const int8_t *xq, const float *dx, const int16_t *xs,
                                                          __m256 *acc) {
    const int is_iq4 = type == KQ_IQ4_NL, bias_shift = type == KQ_Q4_0 ? 3 : type == KQ_Q5_0 ? 4 : 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    /* Two blocks a zmm: vpdpbusd sums 4 code x activation products into each int32 lane, and a transposing
     * reduction gathers the 8 blocks' sums. Integer sums are exact in any order, and the maddubs path's
     * int16 steps never saturate (its comments), so the 8 sums -- and every float step after them -- are
     * the same bits; at 2-8 tokens (a verification) this is ~half the instructions a token. */
    __m512i cz[4];
    __mmask64 neg[4];
    for (int j = 0; j < 4; j++) {
        const __m512i vz = _mm512_inserti64x4(_mm512_castsi256_si512(v[2 * j]), v[2 * j + 1], 1);
        cz[j] = _mm512_inserti64x4(_mm512_castsi256_si512(av[2 * j]), av[2 * j + 1], 1);
        neg[j] = is_iq4 ? _mm512_movepi8_mask(vz) : 0; /* IQ4_NL: codes < 0 take the activation negated (sign_epi8's job) */
    }
#else
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    for (int t = 0; t < NT; t++) {
        const int8_t *xt = xq + (size_t)t * k + (size_t)g * 32;
        __m256i s;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        __m512i d[4];
        for (int j = 0; j < 4; j++) {
            __m512i xv = _mm512_loadu_si512((const void *)(xt + j * 64));
            if (is_iq4) xv = _mm512_mask_sub_epi8(xv, neg[j], _mm512_setzero_si512(), xv);
            d[j] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), cz[j], xv);
        }
        /* per 128-bit lane L: e = (sum of d0's 4 lanes in L, d1's, d2's, d3's); block 2j is d_j's lanes 0-1, block 2j + 1 its lanes 2-3 */
        const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(d[0], d[1]), _mm512_unpackhi_epi32(d[0], d[1]));
        const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(d[2], d[3]), _mm512_unpackhi_epi32(d[2], d[3]));
        const __m512i e = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
        const __m512i lanes02 = _mm512_shuffle_i32x4(e, e, 0x08), lanes13 = _mm512_shuffle_i32x4(e, e, 0x0d); /* (L0, L2), (L1, L3) */
        const __m256i blocks = _mm256_add_epi32(_mm512_castsi512_si256(lanes02), _mm512_castsi512_si256(lanes13)); /* 0 2 4 6 | 1 3 5 7 */
        s = _mm256_permutevar8x32_epi32(blocks, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
#else
        __m256i p[8];
        for (int i = 0; i < 8; i++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xt + i * 32));
            p[i] = _mm256_maddubs_epi16(av[i], is_iq4 ? _mm256_sign_epi8(xv, v[i]) : xv);
        }
        if (is_iq4) { /* pair sums up to 2 * 127 * 127: widen at once */
            for (int i = 0; i < 8; i++) p[i] = _mm256_madd_epi16(p[i], ones);
            s = sum8x8(p);
        } else { /* unsigned codes < 32: sums of 8 products stay within int16, so add pairs twice before widening */
            const __m256i a = _mm256_madd_epi16(_mm256_hadd_epi16(_mm256_hadd_epi16(p[0], p[1]), _mm256_hadd_epi16(p[2], p[3])), ones);
            const __m256i b = _mm256_madd_epi16(_mm256_hadd_epi16(_mm256_hadd_epi16(p[4], p[5]), _mm256_hadd_epi16(p[6], p[7])), ones);
            s = _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
        }
#endif
        const __m256i xsum = _mm256_and_si256(live, _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(xs + (size_t)t * nb + g))));
        if (bias_shift) s = _mm256_sub_epi32(s, _mm256_slli_epi32(xsum, bias_shift)); /* codes stored + 8 / + 16 */
        const __m256 dxv = _mm256_maskload_ps(dx + (size_t)t * nb + g, live);
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dwv, dxv), acc[t]);
        if (INFO[type].has_offset) acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(xsum), _mm256_mul_ps(mwv, dxv), acc[t]); /* + m * sum(x) */
    }
}

static inline __m256i live_lanes(int G) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(G), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }

/* One group's codes (zero past the row's last block) and fp16 scales. */
static inline __attribute__((always_inline)) void group32_unpack(const int type, const uint8_t *blk0, int G, __m256i *v, __m256 *dwv, __m256 *mwv) {
    const kq_info in = INFO[type];
    prefetch_ahead(blk0, 8 * in.nbytes);
    *dwv = f16x8(blk0, in.nbytes, 0, G), *mwv = in.has_offset ? f16x8(blk0, in.nbytes, 2, G) : _mm256_setzero_ps();
    for (int i = 0; i < 8; i++) v[i] = i < G ? codes32(type, blk0 + (size_t)i * in.nbytes, 0) : _mm256_setzero_si256();
}

/* One row of a 32-weight type (nb blocks) against NT tokens (token t at xq + t * k, scales dx + t * nb,
 * sums per 32 xs + t * nb), 8 blocks at a time. xq and xs must be readable 256 bytes / 8 sums past the
 * last token (the tail group's unused blocks read there: times codes 0, or masked off). */
static inline __attribute__((always_inline)) void row32(const int type, const int NT, const uint8_t *row, int nb, int k, const int8_t *xq,
                                                        const float *dx, const int16_t *xs, float *y, size_t ystride) {
    __m256 acc[KQ_TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int g = 0; g < nb; g += 8) {
        const int G = nb - g < 8 ? nb - g : 8;
        __m256i v[8], av[8];
        __m256 dwv, mwv;
        group32_unpack(type, row + (size_t)g * INFO[type].nbytes, G, v, &dwv, &mwv);
        for (int i = 0; i < 8; i++) av[i] = type == KQ_IQ4_NL ? _mm256_sign_epi8(v[i], v[i]) : v[i];
        group32(type, NT, v, av, dwv, mwv, live_lanes(G), g, nb, k, xq, dx, xs, acc);
    }
    for (int t = 0; t < NT; t++) y[(size_t)t * ystride] = hsum256(acc[t]);
}

/* A 32-weight row unpacked once for many tiles of tokens: per group of 8 blocks the codes (8 vectors)
 * and the fp16 scales as floats. */
typedef struct {
    __m256i codes[8];
    __m256 dw, mw;
} kq_group;

static kq_group *kq_row32_alloc(int nb) { return aligned_alloc(32, sizeof(kq_group) * (size_t)((nb + 7) / 8)); }

static inline __attribute__((always_inline)) void row32_unpack(const int type, const uint8_t *row, int nb, kq_group *u) {
    for (int g = 0; g < nb; g += 8) group32_unpack(type, row + (size_t)g * INFO[type].nbytes, nb - g < 8 ? nb - g : 8, u[g / 8].codes, &u[g / 8].dw, &u[g / 8].mw);
}

/* row32 on an unpacked row (kq_row32_alloc, row32_unpack): the same operations per token, in the same order. */
static inline __attribute__((always_inline)) void row32_unpacked(const int type, const int NT, const kq_group *u, int nb, int k, const int8_t *xq,
                                                                 const float *dx, const int16_t *xs, float *y, size_t ystride) {
    __m256 acc[KQ_TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int g = 0; g < nb; g += 8) {
        const __m256i *v = u[g / 8].codes;
        __m256i av[8];
        for (int i = 0; i < 8; i++) av[i] = type == KQ_IQ4_NL ? _mm256_sign_epi8(v[i], v[i]) : v[i];
        group32(type, NT, v, av, u[g / 8].dw, u[g / 8].mw, live_lanes(nb - g < 8 ? nb - g : 8), g, nb, k, xq, dx, xs, acc);
    }
    for (int t = 0; t < NT; t++) y[(size_t)t * ystride] = hsum256(acc[t]);
}
#else
/* The portable path: per block and token the integer sums exactly as above, then the same float
 * steps per block (K types: d * dx * isum - dmin * dx * msum; 32-weight types: d * dx * isum + m * dx * sum). */
static inline __attribute__((always_inline)) void rowk(const int type, const int NT, const uint8_t *row, int nb, int k, const int8_t *xq,
                                                       const float *dx, const int16_t *xs, float *y, size_t ystride) {
    const kq_info in = INFO[type];
    float acc[KQ_TILE], sc[16], mn[16];
    int8_t q[QK_K];
    for (int t = 0; t < NT; t++) acc[t] = 0.0f;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = row + (size_t)b * in.nbytes;
        int16_t isc[16], imn[16];
        float d, dmin = 0.0f;
        kscales(type, blk, isc, imn, &d, &dmin);
        decode(type, blk, q, sc, mn); /* signed codes: no bias to take back */
        for (int t = 0; t < NT; t++) {
            const int8_t *xb = xq + (size_t)t * k + (size_t)b * QK_K;
            const int16_t *sb = xs + (size_t)t * (k / 16) + (size_t)b * 16;
            int32_t isum = 0, msum = 0;
            for (int h = 0; h < 16; h++) {
                int32_t s = 0;
                for (int i = 0; i < 16; i++) s += (int32_t)q[h * 16 + i] * xb[h * 16 + i];
                isum += isc[h] * s;
                if (in.has_offset) msum += imn[h] * sb[h];
            }
            const float dt = dx[(size_t)t * nb + b];
            acc[t] += d * dt * (float)isum;
            if (in.has_offset) acc[t] -= dmin * dt * (float)msum;
        }
    }
    for (int t = 0; t < NT; t++) y[(size_t)t * ystride] = acc[t];
}

static inline __attribute__((always_inline)) void row32(const int type, const int NT, const uint8_t *row, int nb, int k, const int8_t *xq,
                                                        const float *dx, const int16_t *xs, float *y, size_t ystride) {
    const kq_info in = INFO[type];
    float acc[KQ_TILE], sc[1], mn[1];
    int8_t q[32];
    for (int t = 0; t < NT; t++) acc[t] = 0.0f;
    for (int b = 0; b < nb; b++) {
        decode(type, row + (size_t)b * in.nbytes, q, sc, mn);
        for (int t = 0; t < NT; t++) {
            const int8_t *xb = xq + (size_t)t * k + (size_t)b * 32;
            int32_t isum = 0;
            for (int i = 0; i < 32; i++) isum += (int32_t)q[i] * xb[i];
            const float dt = dx[(size_t)t * nb + b];
            acc[t] += sc[0] * dt * (float)isum;
            if (in.has_offset) acc[t] -= mn[0] * dt * (float)xs[(size_t)t * nb + b];
        }
    }
    for (int t = 0; t < NT; t++) y[(size_t)t * ystride] = acc[t];
}
#endif

/* One call of the row function FN on NT tokens from token t (SRC: the packed row, or the unpacked one). */
#define KQ_ROW(FN, TYPE, NT, SRC, t) FN(TYPE, (NT), SRC, nb, k, xq + (size_t)(t) * k, dx + (size_t)(t) * nb, xs + (size_t)(t) * ns, y + (size_t)(t) * n + r, (size_t)n)

/* The tokens left after the whole tiles (fewer than TILE) in at most two calls, 4 then 3, 2 or 1 tokens:
 * each call decodes the row once for all its tokens. One by one, a 2-7 token product (a speculative
 * verification) decoded every block once per token and cost ~4x one token at 4 tokens (bench_gguf_kquant
 * --kernels --tokens 4). A token's numbers are the same in a call of any width (see above). */
#define KQ_REST(FN, TYPE, TILE, SRC, t, t1)                                                                          \
    while (t < t1) {                                                                                                 \
        const int left_ = t1 - t;                                                                                    \
        if ((TILE) > 4 && left_ >= 4) KQ_ROW(FN, TYPE, 4, SRC, t), t += 4;                                          \
        else if (left_ >= 3) KQ_ROW(FN, TYPE, 3, SRC, t), t += 3;                                                  \
        else if (left_ == 2) KQ_ROW(FN, TYPE, 2, SRC, t), t += 2;                                                  \
        else KQ_ROW(FN, TYPE, 1, SRC, t), t += 1;                                                                  \
    }

/* Every row against tokens [t0, t1): TILE tokens at a time, then the rest (KQ_REST). */
#define TILED(ROW, TYPE, TILE)                                                                                             \
    case TYPE:                                                                                                       \
        _Pragma("omp parallel for num_threads(nth) schedule(dynamic, lg_chunk(n, nth))") for (int r = 0; r < n; r++) { \
            const uint8_t *row = w + (size_t)r * row_bytes;                                                          \
            int t = t0;                                                                                              \
            for (; t + (TILE) <= t1; t += (TILE)) KQ_ROW(ROW, TYPE, (TILE), row, t);                                 \
            KQ_REST(ROW, TYPE, (TILE), row, t, t1);                                                                  \
        }                                                                                                            \
        break;

#ifdef __AVX2__
/* TILED where a pass holds two tiles or more: each thread unpacks its row once (ALLOC'd buffer, UNPACK)
 * and every tile reads it (UROW); a thread whose buffer could not be had runs ROW on the packed row:
 * the same numbers. */
#define TILED_U_BODY(TYPE, TILE, ROW, UROW, ALLOC, UNPACK)                                                                \
        _Pragma("omp parallel num_threads(nth)") {                                                                   \
            void *u = t1 - t0 >= 2 * (TILE) ? ALLOC(nb) : NULL;                                                      \
            _Pragma("omp for schedule(dynamic, lg_chunk(n, nth))") for (int r = 0; r < n; r++) {                    \
                const uint8_t *row = w + (size_t)r * row_bytes;                                                      \
                int t = t0;                                                                                          \
                if (u) {                                                                                             \
                    UNPACK(TYPE, row, nb, u);                                                                        \
                    for (; t + (TILE) <= t1; t += (TILE)) KQ_ROW(UROW, TYPE, (TILE), u, t);                          \
                    KQ_REST(UROW, TYPE, (TILE), u, t, t1);                                                           \
                } else {                                                                                             \
                    for (; t + (TILE) <= t1; t += (TILE)) KQ_ROW(ROW, TYPE, (TILE), row, t);                         \
                    KQ_REST(ROW, TYPE, (TILE), row, t, t1);                                                          \
                }                                                                                                    \
            }                                                                                                        \
            free(u);                                                                                                 \
        }
#define TILED_U(TYPE, TILE, ROW, UROW, ALLOC, UNPACK) \
    case TYPE:                                    \
        TILED_U_BODY(TYPE, TILE, ROW, UROW, ALLOC, UNPACK) \
        break;
#define TILED_K(TYPE) TILED_U(TYPE, TILE_K(TYPE), rowk, rowk_unpacked, kq_row_alloc, rowk_unpack)
/* Q6_K and Q3_K (TILE_K 8): 8 tokens a tile while a pass holds fewer than 16 (one decode of the row serves them
 * all), 4 from 16 on, which measured faster there. Zen 4, 1 thread, ms of a 64-token product, tiles of 8 -> this
 * (bench_gguf_kquant --kernels --tokens 64, alternating): AVX2 build Q6_K 1024 x 4096 8.4 -> 5.7, 4096 x 4096
 * 27.9 -> 21.8, Q3_K 1408 x 4096 9.3 -> 7.3; AVX-512 build 4.7-5.3 -> 4.9-5.2, 22.0-22.6 -> 20.1-21.4, 6.9-7.0 ->
 * 5.5-6.4. At 8 tokens tiles of 4 were slower (Q6_K 1024 x 4096 0.45 -> 0.58 ms, Q3_K 0.64 -> 0.83); 16 about even. */
#define TILED_KW(TYPE)                                                                                               \
    case TYPE:                                                                                                       \
        if (t1 - t0 >= 16) {                                                                                         \
            TILED_U_BODY(TYPE, 4, rowk, rowk_unpacked, kq_row_alloc, rowk_unpack)                                    \
        } else {                                                                                                     \
            TILED_U_BODY(TYPE, TILE_K(TYPE), rowk, rowk_unpacked, kq_row_alloc, rowk_unpack)                         \
        }                                                                                                            \
        break;
#define TILED_32(TYPE) TILED_U(TYPE, TILE_32, row32, row32_unpacked, kq_row32_alloc, row32_unpack)
#else
#define TILED_K(TYPE) TILED(rowk, TYPE, TILE_K(TYPE))
#define TILED_KW(TYPE) TILED_K(TYPE)
#define TILED_32(TYPE) TILED(row32, TYPE, TILE_32)
#endif

/* Tokens per pass over the weight: their int8 activations (KQ_PASS_BYTES in all) stay in L2 while every
 * row goes by; the weight is read once per pass. */
#define KQ_PASS_BYTES (192 * 1024)

/* y[t, r] = sum_k W[r, k] xq[t, k] dx for any number of tokens T >= 1: the product with int8
 * activations (see above). Returns 0, -1 for a bad type / shape / token count, -2 when out of memory. */
int kq_matmul_q8(int type, const uint8_t *w, int n, int k, const float *x, int T, float *y, int nth) {
    if (!valid(type, n, k) || T < 1) return -1;
    const size_t row_bytes = (size_t)(k / INFO[type].block) * INFO[type].nbytes;
    const int qa = act_block(type), ss = act_sum(type), nb = k / qa, ns = k / ss;
    int8_t *xq = malloc((size_t)T * k + QK_K); /* + the tail group's reads past the last token (row32; xs too) */
    float *dx = malloc(sizeof(float) * (size_t)T * nb);
    int16_t *xs = malloc(sizeof(int16_t) * ((size_t)T * ns + 8));
    if (!xq || !dx || !xs) {
        free(xq), free(dx), free(xs);
        return -2;
    }
    memset(xq + (size_t)T * k, 0, QK_K), memset(xs + (size_t)T * ns, 0, sizeof(int16_t) * 8);
#pragma omp parallel for num_threads(nth) schedule(static) if (T > 1)
    for (int t = 0; t < T; t++) quant_act(x + (size_t)t * k, k, qa, ss, xq + (size_t)t * k, dx + (size_t)t * nb, xs + (size_t)t * ns);
    const int pass = k * KQ_TILE >= KQ_PASS_BYTES ? KQ_TILE : KQ_PASS_BYTES / k / KQ_TILE * KQ_TILE;
    for (int t0 = 0; t0 < T; t0 += pass) {
        const int t1 = T - t0 < pass ? T : t0 + pass;
        switch (type) {
                TILED_32(KQ_Q4_0) TILED_32(KQ_Q5_0) TILED_32(KQ_Q4_1) TILED_32(KQ_Q5_1) TILED_32(KQ_IQ4_NL)
            TILED_K(KQ_Q2_K) TILED_KW(KQ_Q3_K) TILED_K(KQ_Q4_K) TILED_K(KQ_Q5_K) TILED_KW(KQ_Q6_K) TILED_K(KQ_IQ4_XS)
            TILED_K(KQ_IQ2_XXS) TILED_K(KQ_IQ2_XS) TILED_K(KQ_IQ2_S) TILED_K(KQ_IQ3_XXS) TILED_K(KQ_IQ3_S) TILED_K(KQ_IQ1_S) TILED_K(KQ_IQ1_M)
        }
    }
    free(xq), free(dx), free(xs);
    return 0;
}
