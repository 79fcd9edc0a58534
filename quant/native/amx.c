/* bf16 weight rows x bf16 activations on Intel AMX tiles (Sapphire Rapids and later Xeons; Xeon W).
 *
 * Why: a speculative verification runs 2-5 tokens through every weight row. The vector units'
 * cost grows with the tokens (vdpbf16ps / FMA bound: one more token of a 4 MB lm_head is ~60 us on
 * this Xeon), a tile's does not: TDPBF16PS multiplies 16 rows x 32 values by 32 values x up to 16
 * tokens in ~16 cycles, ~64 bytes of weights a cycle -- more than memory delivers. So up to 16
 * tokens cost what one does, which is what makes drafting pay on a CPU (and is how ktransformers
 * runs experts on these Xeons; oneDNN's bf16 GEMMs use the same tiles).
 *
 * Numbers: a (row, token) sum depends only on that row and that token -- not on how many tokens
 * share the tile or where the row's 16-row block starts (tested) -- so a token verified among
 * others gets the one-token call's numbers, and speculative greedy output equals plain decoding.
 * The hardware's own accumulation order (fp32, denormals flushed) differs from the AVX-512 paths'
 * by an ulp here and there: one process uses one path for a matrix (lg_amx_takes), whatever T.
 *
 * Linux asks each process to request the tile state (arch_prctl ARCH_REQ_XCOMP_PERM); lg_set_amx
 * does, once, and where the request fails (an old kernel, a VM that hides it) the vector paths run.
 */
#define _GNU_SOURCE
#include "lg_kernels.h"
#include <omp.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define LG_AMX 1
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#endif

#ifdef LG_AMX
static int amx_granted = -1; /* the kernel's answer to the tile-state request: -1 not asked yet */
#endif
static int amx_on = 0; /* lg_set_amx's last word: a process-wide switch, like a thread count */

/* Turn the tile path on (want = 1: asks the kernel for the tile state the first time) or off;
 * returns whether it is on. Tests switch it to compare the two paths in one process. */
int lg_set_amx(int want) {
#ifdef LG_AMX
    if (want && amx_granted < 0) amx_granted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    amx_on = want && amx_granted == 1;
#else
    (void)want;
    amx_on = 0;
#endif
    return amx_on;
}

/* Whether lg_amx_rows takes m for activations of this dtype: bf16 rows, bf16 activations, whole
 * 32-value blocks a row. A matrix the tiles take goes through them whatever the token count. */
int lg_amx_takes(const lg_mat *m, int dtype) {
    return amx_on && m->kind == LG_MAT_BF16 && dtype == 1 && m->k % 32 == 0 && m->k > 0;
}

#ifdef LG_AMX
typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Tiles: 0, 1 two 16-row blocks' sums; 2-5 weights (two steps of K, 32 values each, double
 * buffered: a step's loads need not wait for the previous step's products, as they would with one
 * weight tile a block -- at one token the tiles then waited on memory, ~10% behind the vector
 * path); 6, 7 the activations of the two steps. nt tokens (columns). */
static void configure(int nt) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) c.rows[i] = 16;
    c.colsb[0] = c.colsb[1] = c.colsb[6] = c.colsb[7] = (uint16_t)(nt * 4);
    c.colsb[2] = c.colsb[3] = c.colsb[4] = c.colsb[5] = 64;
    _tile_loadconfig(&c);
}

/* x rows (nt tokens, K floats of bf16 values, K apart) -> the activation tile's layout: for each
 * 32-value step, 16 rows of (token, pair) -- [K/32][16][nt][2], i.e. the [nt][K/2] pairs transposed.
 * One token: the row itself. tmp holds nt * K bf16 values. (Denormals: the tiles read them as zero
 * whichever conversion flushed them first.) */
static void pack_tokens(const float *x, int nt, int K, uint16_t *xp, uint16_t *tmp) {
    if (nt == 1) {
        row_to_bf16(x, K, xp);
        return;
    }
    for (int t = 0; t < nt; t++) row_to_bf16(x + (size_t)t * K, K, tmp + (size_t)t * K);
    const uint32_t *src = (const uint32_t *)tmp;
    uint32_t *dst = (uint32_t *)xp;
    for (int j = 0; j < K / 2; j++)
        for (int t = 0; t < nt; t++) dst[(size_t)j * nt + t] = src[(size_t)t * (K / 2) + j];
}

/* 16 floats rounded to bf16 values as rnd() rounds (to nearest even, NaN to the one quiet NaN). */
static inline __m512 rnd16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
    r = _mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    return _mm512_castsi512_ps(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc00000)));
}

/* A tile's sums (rows x nt, nt apart in `out`) into y with the bias, rounded to bf16 values (the
 * tiles take only bf16 activations, lg_amx_takes): sixteen rows of a token at a time (several tokens:
 * gathered nt apart), the rest one by one. */
static void emit(const lg_mat *m, int n, int rows, int nt, const float *out, float *y) {
    int r = 0;
    const __m512i lanes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(nt));
    for (; r + 16 <= rows; r += 16) {
        const __m512 b = m->bias ? _mm512_loadu_ps(m->bias + n + r) : _mm512_setzero_ps();
        for (int t = 0; t < nt; t++) {
            const __m512 v = nt == 1 ? _mm512_loadu_ps(out + r) : _mm512_i32gather_ps(lanes, out + (size_t)r * nt + t, 4);
            _mm512_storeu_ps(y + (size_t)t * m->n + n + r, rnd16(_mm512_add_ps(v, b))); /* + 0 without a bias, as rnd(v + 0.0f) below */
        }
    }
    for (; r < rows; r++) {
        const float b = m->bias ? m->bias[n + r] : 0.0f;
        for (int t = 0; t < nt; t++) y[(size_t)t * m->n + n + r] = rnd(out[r * nt + t] + b, 1);
    }
}

/* Rows of nb (1 or 2) 16-row blocks from W (rows `stride` bytes apart) against the packed tokens;
 * their sums into out (rows nt apart). Every row's sum is the same chain of TDPBF16PS over K in order,
 * whatever the blocking. */
static void tile_blocks(const uint16_t *W, size_t stride, int K, int nb, const uint16_t *xp, int nt, float *out) {
    const uint16_t *W1 = W + 16 * stride / sizeof(uint16_t);
    _tile_zero(0);
    _tile_zero(1);
    int k = 0;
    for (; k + 64 <= K; k += 64) {
        _tile_loadd(6, xp + (size_t)k * nt, nt * 4);
        _tile_loadd(2, W + k, stride);
        if (nb > 1) _tile_loadd(3, W1 + k, stride);
        _tile_loadd(7, xp + (size_t)(k + 32) * nt, nt * 4);
        _tile_loadd(4, W + k + 32, stride);
        if (nb > 1) _tile_loadd(5, W1 + k + 32, stride);
        _tile_dpbf16ps(0, 2, 6);
        if (nb > 1) _tile_dpbf16ps(1, 3, 6);
        _tile_dpbf16ps(0, 4, 7);
        if (nb > 1) _tile_dpbf16ps(1, 5, 7);
    }
    if (k < K) {
        _tile_loadd(6, xp + (size_t)k * nt, nt * 4);
        _tile_loadd(2, W + k, stride);
        _tile_dpbf16ps(0, 2, 6);
        if (nb > 1) {
            _tile_loadd(3, W1 + k, stride);
            _tile_dpbf16ps(1, 3, 6);
        }
    }
    _tile_stored(0, out, nt * 4);
    if (nb > 1) _tile_stored(1, out + 16 * nt, nt * 4);
}

/* Work item i of amx_tokens: rows 32 i.. (one or two 16-row blocks), or (i == items) the padded
 * last N % 16 rows. */
static void tile_item(const lg_mat *m, const uint16_t *W, const uint16_t *pad, size_t stride, int i, int items, int full, int rem,
                      const uint16_t *xp, int nt, float *y) {
    float out[32 * 16];
    const int K = m->k;
    if (i == items) {
        if (rem) {
            tile_blocks(pad, stride, K, 1, xp, nt, out);
            emit(m, full, rem, nt, out, y);
        }
        return;
    }
    const int n = i * 32, nb = full - n >= 32 ? 2 : 1;
    tile_blocks(W + (size_t)n * K, stride, K, nb, xp, nt, out);
    emit(m, n, 16 * nb, nt, out, y);
}

/* nt <= 16 tokens (packed) through every row of m into y ([nt, N], rows N apart). Rows in items of
 * 32; the last N % 16 through a zero-padded copy (a row's sums do not depend on its neighbours). */
static int amx_tokens(const lg_mat *m, const uint16_t *xp, int nt, float *y, int nth) {
    const int N = m->n, K = m->k, full = N / 16 * 16, rem = N - full, items = (full / 16 + 1) / 2;
    const size_t stride = (size_t)K * sizeof(uint16_t);
    const uint16_t *W = (const uint16_t *)m->w;
    uint16_t *pad = NULL;
    if (rem) {
        if (!(pad = calloc((size_t)16 * K, sizeof(uint16_t)))) return -1;
        memcpy(pad, W + (size_t)full * K, (size_t)rem * stride);
    }
    const int par = nth > 1 && (size_t)N * K >= (1u << 16);
    if (!par) { /* one thread: no parallel region to open (a decode step makes ~30 of these calls) */
        configure(nt);
        for (int i = 0; i <= items; i++) tile_item(m, W, pad, stride, i, items, full, rem, xp, nt, y);
        _tile_release();
    } else {
#pragma omp parallel num_threads(nth)
        {
            configure(nt);
#pragma omp for schedule(dynamic, lg_chunk(items + 1, nth))
            for (int i = 0; i <= items; i++) tile_item(m, W, pad, stride, i, items, full, rem, xp, nt, y);
            _tile_release();
        }
    }
    free(pad);
    return 0;
}
#endif

/* y [T, N] = m . x [T, K] (+ bias), each value rounded to bf16 (dt: 1, lg_amx_takes), on the tiles:
 * 16 tokens a pass. Returns 0, or -1 when out of memory (or the tiles do not take m). */
int lg_amx_rows(const lg_mat *m, int T, const float *x, int dt, float *y, int nth) {
#ifdef LG_AMX
    if (!lg_amx_takes(m, dt)) return -1;
    const int K = m->k, chunk = T < 16 ? T : 16;
    const size_t need = (size_t)K * chunk * (chunk > 1 ? 2 : 1); /* the packed tokens, and (several) their rows in bf16 */
    uint16_t stack[8192], *xp = need <= 8192 ? stack : malloc(need * sizeof(uint16_t));
    if (!xp) return -1;
    int rc = 0;
    for (int t0 = 0; t0 < T && rc == 0; t0 += 16) {
        const int nt = T - t0 < 16 ? T - t0 : 16;
        pack_tokens(x + (size_t)t0 * K, nt, K, xp, xp + (size_t)K * chunk);
        rc = amx_tokens(m, xp, nt, y + (size_t)t0 * m->n, nth);
    }
    if (xp != stack) free(xp);
    return rc;
#else
    (void)m, (void)T, (void)x, (void)dt, (void)y, (void)nth;
    return -1;
#endif
}
