/* The fused GLM MoE decoder layer: T consecutive tokens of one sequence through one decoder layer
 * (pre-norm attention, then a dense SwiGLU MLP or the MoE's router, shared experts and, where they
 * sit in RAM, routed experts) in one call, and every layer of those tokens in one call. Why: a
 * decode step through torch is ~60 small ops per layer at ~6 us each; on the CPU that overhead, not
 * the arithmetic, was most of a token -- and of a prompt chunk or a speculative verification (T > 1).
 *
 * T tokens give each token exactly the one-token call's arithmetic (the same per-row activation
 * quantization, the same sums in the same order), so a T-token forward is bit-identical to T
 * one-token steps: token t writes its cache row at pos + t and attends [0, pos + t], one token after
 * the other inside the call, while the projections read each quantized weight row once for up to
 * four tokens (quant's lg_linear tiles, whose per-token result does not depend on the tile) and the
 * routed experts run once for all the tokens routed to them (lg_moe). The math and its rounding
 * points are localglm/layers/'s torch ops' (norm, rope, attention, router, mlp, experts);
 * quantized products are exactly quant's lg_linear's.
 *
 * The layer is the decoder skeleton shared by GLM's MoE models; the attention is a separate
 * function it calls, chosen by the layer's attn_kind: glm4_moe's grouped-query attention (here),
 * glm4_moe_lite's multi-head latent attention (mla_attention.c), or glm_moe_dsa's MLA over the
 * top-k its sparse-attention indexer picks (mla_attention.c with dsa_indexer.c). Built with
 * localglm/layers/native/layer_ops.c (the per-token ops it calls, the structs in layer_ops.h) into
 * the library localglm/layers/native.py loads, linked against quant's kernels (lg_matvec,
 * lg_swiglu_vec, lg_moe, lg_linear: quant/native/lg_kernels.h).
 */
#include "layer_ops.h"

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
#endif

/* y[t] = m . x[t] for T rows (x [T, m->k], y [T, m->n] floats), each row exactly lg_matvec's: one
 * row through lg_matvec itself (in a decode step the weights come from L3 or RAM, and its one
 * sequential stream was as fast as dense_rows' 4-row tiles there); more through lg_linear (a
 * quantized weight row read once for every tile of tokens) rounded as lg_matvec rounds, or, dense,
 * through dense_rows (tiles of weight rows x tokens, AVX2 or AVX-512; the portable build runs
 * lg_matvec row by row).
 * `xa` has room for one quantized row of m->k. Returns 0, or -1 when out of memory. */
static int rows_matvec(const lg_mat *m, int T, const float *x, int dt, qact *xa, float *y, int nth) {
    const int N = m->n, K = m->k;
    if (m->kind >= LG_MAT_GGML) return lg_mat_rows(m, T, x, dt, xa, y, nth); /* GGUF blocks read once for the T rows */
    if (lg_amx_takes(m, dt)) return lg_amx_rows(m, T, x, dt, y, nth);           /* AMX tiles: T tokens for the price of one */
    if (T > 1 && m->kind == 0) {
        if (lg_linear(&m->q, T, x, 0, m->bias, y, 0, nth)) return -1;
        for (size_t i = 0; i < (size_t)T * N; i++) y[i] = rnd(y[i], dt);
        return 0;
    }
#ifdef __AVX2__
    if (T > 1) {
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
        for (int t0 = 0; t0 < T; t0 += TMAX) {
            const int nt = T - t0 < TMAX ? T - t0 : TMAX, R = tile_rows(nt, T), blocks = (N + R - 1) / R;
            const int par = nth > 1 && (size_t)N * K * nt >= (1u << 16), chunk = lg_chunk(blocks, nth), chunks = (blocks + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nth) schedule(dynamic, 1) if (par)
            for (int c = 0; c < chunks; c++)
                dense_range(m, c * chunk, (c + 1) * chunk < blocks ? (c + 1) * chunk : blocks, R, xr + (size_t)t0 * K * es, nt, bh, dt, y + (size_t)t0 * N);
        }
        free(xs);
        return 0;
    }
#endif
    for (int t = 0; t < T; t++) lg_matvec(m, x + (size_t)t * K, dt, xa, y + (size_t)t * N, nth);
    return 0;
}

/* y = m . x for T rows of floats (x [T, m->k], y [T, m->n]), each row exactly lg_matvec's, whatever T:
 * rows_matvec for a caller outside the layer (the lm_head: a speculative verification's logits are
 * then a decode step's bit for bit). Returns 0, or -1 when out of memory. */
int lg_rows_linear(const lg_mat *m, int T, const float *x, int dt, float *y, int nth) {
    qact xa = {0};
    if ((m->kind == LG_MAT_Q || m->kind == LG_MAT_STACK) && !lg_qact_alloc(&xa, 1, (m->k + QB - 1) / QB * QB)) return -1;
    const int rc = rows_matvec(m, T, x, dt, &xa, y, nth);
    lg_qact_free(&xa);
    return rc;
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); } /* qkernels.c's, for lg_swiglu_vec's bits */

/* SwiGLU of T rows h [T, H] into out [T, H]: each row lg_swiglu_vec's numbers. g holds T * 3I
 * floats (gate | up, then the products). Returns 0, or -1 when out of memory. */
static int rows_swiglu(const lg_mat *gate_up, const lg_mat *down, int T, const float *h, int dt, qact *xa, float *g, float *out, int nth) {
    if (T == 1) {
        lg_swiglu_vec(gate_up, down, dt, h, xa, g, out, nth);
        return 0;
    }
    const int I = down->k;
    float *a = g + (size_t)T * 2 * I;
    if (rows_matvec(gate_up, T, h, dt, xa, g, nth)) return -1;
    for (int t = 0; t < T; t++)
        for (int j = 0; j < I; j++) a[(size_t)t * I + j] = rnd(rnd(silu(g[(size_t)t * 2 * I + j]), dt) * g[(size_t)t * 2 * I + I + j], dt);
    return rows_matvec(down, T, a, dt, xa, out, nth);
}

/* glm4_moe's grouped-query attention, the part before attending, of one token at `pos` after its
 * projection: qkv (this token's q | k | v row, floats of dtype values) gets its q/k norm and RoPE in
 * place, and its k and v are written to the cache at pos. `tmp` holds hd floats. */
static void gqa_prepare(const lg_layer *L, float *qkv, const void *cos, const void *sin, void *k_cache, void *v_cache, long stride_head,
                        long stride_pos, int pos, float *tmp) {
    const int hd = L->hd, dt = L->dtype, nq = L->heads * hd, nkv = L->kv_heads * hd;
    const float *k = qkv + nq, *v = k + nkv;
    for (int r = 0; r < L->heads + L->kv_heads; r++) {
        float *row = qkv + (size_t)r * hd;
        const void *nw = r < L->heads ? L->q_norm : L->k_norm;
        if (nw) {
            memcpy(tmp, row, (size_t)hd * sizeof(float));
            lg_norm_row(tmp, hd, nw, dt, L->eps, row);
        }
        if (L->rot > 0) lg_rope_row(row, L->rot, cos, sin, dt, tmp);
    }
    for (int gk = 0; gk < L->kv_heads; gk++) {
        const size_t at = (size_t)gk * (size_t)stride_head + (size_t)pos * (size_t)stride_pos;
        for (int i = 0; i < hd; i++) {
            store(k_cache, dt, at + i, k[(size_t)gk * hd + i]);
            store(v_cache, dt, at + i, v[(size_t)gk * hd + i]);
        }
    }
}

/* Where the T tokens' rotary rows and DSA selections are: token t's cos / sin at cos + t * rot_stride
 * values, its selection at sel + t * sel_stride int32s. */
typedef struct {
    const void *cos, *sin;
    long rot_stride;
    lg_selection *sel;
    long sel_stride;
} token_rows;

static inline const void *row_at(const void *base, int dt, long stride, int t) { return (const char *)base + (size_t)t * (size_t)stride * (dt == 1 ? 2 : 4); }
static inline lg_selection *sel_at(const token_rows *R, int t) { return R->sel ? (lg_selection *)((int32_t *)R->sel + (size_t)t * (size_t)R->sel_stride) : NULL; }

/* Floats of MLA's projections of one token: qa [q_lora], q [heads, nope + rope], the row [latent + rope], ov [heads, v]. */
static size_t mla_rows(const lg_layer *L) {
    const lg_mla *M = L->mla;
    return (size_t)M->q_lora + (size_t)L->heads * (size_t)(M->nope + M->rope) + (size_t)(M->kv_lora + M->rope) + (size_t)L->heads * M->v;
}

/* Floats of scratch `attention` takes for T tokens. */
static size_t attn_scratch(const lg_layer *L, int T) {
    if (L->attn_kind != LG_ATTN_GQA) return T == 1 ? lg_mla_scratch(L) : (size_t)T * mla_rows(L) + lg_mla_token_scratch(L);
    return (size_t)T * ((size_t)(L->heads + 2 * L->kv_heads) * L->hd + (size_t)L->heads * L->hd) + (size_t)L->hd;
}

/* The layer's attention of T tokens at pos.. on their normed hidden states hn [T, hidden], into
 * o [T, hidden], token after token (each attends up to itself), the projections (GQA's q/k/v and o,
 * MLA's q_a, q_b, kv_a and o) for every token at once; a DSA full layer's pick lands in that
 * token's selection. `scratch` holds attn_scratch(L, T) floats. Returns 0, or -1 when out of memory. */
static int attention(const lg_layer *L, int T, const float *hn, const token_rows *R, void *k_cache, void *v_cache, long stride_head,
                     long stride_pos, int pos, void *index_keys, qact *xa, float *scratch, float *o, int nth) {
    const int H = L->hidden, dt = L->dtype;
    if (L->attn_kind != LG_ATTN_GQA && T == 1)
        return lg_mla_attention(L, hn, R->cos, R->sin, k_cache, stride_pos, pos, index_keys, sel_at(R, 0), xa, scratch, o, nth);
    if (L->attn_kind != LG_ATTN_GQA) { /* the projections for every token at once, then token after token */
        const lg_mla *M = L->mla;
        const int qn = L->heads * (M->nope + M->rope), row = M->kv_lora + M->rope, vn = L->heads * M->v;
        float *qa = scratch, *q = qa + (size_t)T * M->q_lora, *kv = q + (size_t)T * qn, *ov = kv + (size_t)T * row, *rest = ov + (size_t)T * vn;
        if (M->q_lora) {
            if (rows_matvec(&M->q_a, T, hn, dt, xa, qa, nth)) return -1;
            for (int t = 0; t < T; t++) lg_norm_row(qa + (size_t)t * M->q_lora, M->q_lora, M->q_a_norm, dt, M->latent_eps, qa + (size_t)t * M->q_lora);
        }
        if (rows_matvec(&M->q_b, T, M->q_lora ? qa : hn, dt, xa, q, nth) || rows_matvec(&M->kv_a, T, hn, dt, xa, kv, nth)) return -1;
        for (int t = 0; t < T; t++) {
            const int rc = lg_mla_token(L, hn + (size_t)t * H, qa + (size_t)t * M->q_lora, q + (size_t)t * qn, kv + (size_t)t * row,
                                        row_at(R->cos, dt, R->rot_stride, t), row_at(R->sin, dt, R->rot_stride, t), k_cache, stride_pos, pos + t,
                                        index_keys, sel_at(R, t), xa, rest, ov + (size_t)t * vn, nth);
            if (rc) return rc;
        }
        return rows_matvec(&L->o, T, ov, dt, xa, o, nth);
    }
    const int nq = L->heads * L->hd, row = nq + 2 * L->kv_heads * L->hd;
    float *qkv = scratch, *att = qkv + (size_t)T * row, *tmp = att + (size_t)T * nq;
    if (rows_matvec(&L->qkv, T, hn, dt, xa, qkv, nth)) return -1;
    /* Every token's k and v go to the cache first: token t reads positions up to pos + t only, which the
     * later tokens' rows do not touch. Then one call attends for all of them (lg_attend_tokens: each
     * cached row converted once for the tokens, not once a token; the numbers are one-token calls'). */
    for (int t = 0; t < T; t++)
        gqa_prepare(L, qkv + (size_t)t * row, row_at(R->cos, dt, R->rot_stride, t), row_at(R->sin, dt, R->rot_stride, t), k_cache, v_cache,
                    stride_head, stride_pos, pos + t, tmp);
    const float scale = (float)(1.0 / sqrt((double)L->hd));
    const int rc = T == 1 ? lg_attend(qkv, k_cache, v_cache, dt, L->heads, L->kv_heads, pos + 1, NULL, L->hd, L->hd, stride_head, stride_pos, scale, att, nth)
                          : lg_attend_tokens(qkv, row, k_cache, v_cache, dt, L->heads, L->kv_heads, pos + 1, T, L->hd, stride_head, stride_pos, scale, att, nq, nth);
    if (rc) return rc;
    return rows_matvec(&L->o, T, att, dt, xa, o, nth);
}

/* Experts of lg_mat tables (dense in RAM, or GGUF blocks) for T tokens into routed [T, H] (dtype): each
 * expert once, for all the tokens that chose it (rows_swiglu), in id order; so each token's products,
 * rounded to the experts' dtype (the model's, or fp32 with ex->fp32), are summed in fp32 in the order
 * of its experts' ids -- localglm.layers.experts.combine_experts' order for one token, and the
 * one-token call's. xs, ye, acc hold T * H floats, g rows_swiglu's T * 3I.
 * Returns 0, or -1 when out of memory. */
static int dense_experts(const lg_layer *L, const lg_experts *ex, int T, const float *hn, const int64_t *ids, const float *wts, qact *xa,
                         float *xs, float *g, float *ye, float *acc, void *routed, int nth) {
    const int H = L->hidden, dt = L->dtype, kk = L->top_k, de = ex->fp32 ? 0 : dt; /* de: the experts' own dtype */
    int tok[T];
    float w[T];
    for (size_t i = 0; i < (size_t)T * H; i++) acc[i] = 0.0f;
    for (int e = 0; e < L->n_experts; e++) {
        int n = 0;
        for (int t = 0; t < T; t++)
            for (int j = 0; j < kk; j++)
                if (ids[(size_t)t * kk + j] == e) {
                    tok[n] = t;
                    w[n++] = wts[(size_t)t * kk + j];
                }
        if (n == 0) continue;
        for (int j = 0; j < n; j++) memcpy(xs + (size_t)j * H, hn + (size_t)tok[j] * H, (size_t)H * sizeof(float));
        if (rows_swiglu(&ex->d_gate_up[e], &ex->d_down[e], n, xs, de, xa, g, ye, nth)) return -1;
        for (int j = 0; j < n; j++)
            for (int i = 0; i < H; i++) acc[(size_t)tok[j] * H + i] += rnd(ye[(size_t)j * H + i] * w[j], de);
    }
    for (size_t i = 0; i < (size_t)T * H; i++) store(routed, dt, i, acc[i]);
    return 0;
}

/* T consecutive tokens through layer L at positions pos..pos+T-1. x [T, hidden] (dtype) is the
 * residual stream, updated in place; add_a / add_b ([T, hidden] or NULL) are the previous MoE
 * layer's routed and shared outputs, added first. Token t's rotary rows and (DSA) selection are
 * R's. k_cache / v_cache point at this layer's cache (kv head g, position p at g * stride_head +
 * p * stride_pos, dtype); token t's k and v are written at pos + t before it attends [0, pos + t].
 * MLA's cache is one row a position, k_cache (latent | rope key at p * stride_pos); v_cache is
 * NULL. A DSA layer's selection is shared by the layers of one token (a full layer writes it, the
 * shared ones after it read it), and a full one writes its indexer keys to index_keys ([pos, D],
 * dtype; NULL otherwise). A dense layer finishes its MLP here; a MoE layer writes the
 * post-attention normed hidden states h_out [T, hidden] (dtype), the routing (ids int64 / wts fp32
 * [T, top_k]) and, with shared experts, their output mlp_out [T, hidden] (dtype), and leaves the
 * routed experts to the caller -- unless it passes them in `ex` (quantized or dense tables), then
 * they run here too (into routed_out [T, hidden], dtype) and x comes back with the whole layer
 * added. Every token's numbers are those of the same call with T = 1. Returns 0, or -1 when out of memory. */
static int forward_layer(const lg_layer *L, int T, void *x, const void *add_a, const void *add_b, const token_rows *R, void *k_cache, void *v_cache,
                         long stride_head, long stride_pos, int pos, void *index_keys, void *h_out, int64_t *ids, float *wts, void *mlp_out,
                         const lg_experts *ex, void *routed_out, int nth) {
    const int H = L->hidden, dt = L->dtype, kk = L->top_k;
    const int dense_ex = L->moe && ex && ex->d_gate_up, E = L->moe ? L->n_experts : 0;
    int inter2 = L->has_mlp ? L->gate_up.n : 0;
    if (dense_ex && 2 * ex->inter > inter2) inter2 = 2 * ex->inter;
    int kmax = H > L->o.k ? H : L->o.k; /* the widest quantized input: hidden, o_proj's, MLA's q_b's or the MLP's down */
    if (L->attn_kind != LG_ATTN_GQA && L->mla->q_b.k > kmax) kmax = L->mla->q_b.k; /* DSA's wq_b reads the same q latent */
    if (L->has_mlp && L->down.k > kmax) kmax = L->down.k;
    if (dense_ex && ex->inter > kmax) kmax = ex->inter; /* an expert's down (quantized, or a stack's quantized part) */
    const size_t TH = (size_t)T * H;
    const size_t nf = TH * 6 + (size_t)T * (size_t)inter2 * 3 / 2 + (size_t)inter2 + 2 * (size_t)E + attn_scratch(L, T);
    float *buf = malloc(nf * sizeof(float));
    qact xa = {0};
    if (!buf || !lg_qact_alloc(&xa, 1, (kmax + QB - 1) / QB * QB)) {
        free(buf);
        lg_qact_free(&xa);
        return -1;
    }
    float *xf = buf, *hn = xf + TH, *o = hn + TH, *mo = o + TH, *ye = mo + TH, *acc = ye + TH; /* ye, acc: dense routed experts' */
    float *g = acc + TH, *sc = g + (size_t)T * (size_t)inter2 * 3 / 2 + (size_t)inter2, *att_scratch = sc + 2 * E;
    for (int t = 0; t < T; t++) {
        float *xt = xf + (size_t)t * H;
        load_row(x, dt, (size_t)t * H, H, xt);
        if (add_a)
            for (int i = 0; i < H; i++) xt[i] = rnd(xt[i] + moe_output(add_a, add_b, dt, (size_t)t * H + i), dt);
        lg_norm_row(xt, H, L->input_norm, dt, L->eps, hn + (size_t)t * H);
    }
    int rc = attention(L, T, hn, R, k_cache, v_cache, stride_head, stride_pos, pos, index_keys, &xa, att_scratch, o, nth);
    if (rc == 0) {
        for (size_t i = 0; i < TH; i++) xf[i] = rnd(xf[i] + o[i], dt);
        /* feed-forward */
        for (int t = 0; t < T; t++) lg_norm_row(xf + (size_t)t * H, H, L->post_norm, dt, L->eps, hn + (size_t)t * H);
        if (!L->moe) {
            rc = rows_swiglu(&L->gate_up, &L->down, T, hn, dt, &xa, g, mo, nth);
            for (size_t i = 0; i < TH && rc == 0; i++) xf[i] = rnd(xf[i] + mo[i], dt);
        } else {
            for (size_t i = 0; i < TH; i++) store(h_out, dt, i, hn[i]);
            for (int t = 0; t < T; t++) lg_route(L, hn + (size_t)t * H, sc, ids + (size_t)t * kk, wts + (size_t)t * kk, nth);
            if (L->has_mlp) {
                rc = rows_swiglu(&L->gate_up, &L->down, T, hn, dt, &xa, g, mo, nth);
                for (size_t i = 0; i < TH && rc == 0; i++) store(mlp_out, dt, i, mo[i]);
            }
            if (rc == 0 && dense_ex) {
                rc = dense_experts(L, ex, T, hn, ids, wts, &xa, o, g, ye, acc, routed_out, nth); /* o is free again: the experts' inputs */
            } else if (rc == 0 && ex && ex->q_gate_up) {
                rc = lg_moe(T, H, ex->inter, h_out, dt, kk, ids, wts, ex->q_gate_up, ex->q_down, L->n_experts, routed_out, nth);
            }
            if (ex && (ex->d_gate_up || ex->q_gate_up)) {
                for (size_t i = 0; i < TH && rc == 0; i++) {
                    const float r = load_val(routed_out, dt, i);
                    xf[i] = rnd(xf[i] + (L->has_mlp ? rnd(r + mo[i], dt) : r), dt);
                }
            }
        }
        for (size_t i = 0; i < TH && rc == 0; i++) store(x, dt, i, xf[i]);
    }
    free(buf);
    lg_qact_free(&xa);
    return rc;
}

/* T tokens through one layer (forward_layer): cos / sin rows rot_stride values apart, DSA's
 * selections sel_stride int32s apart (each with room for a count and the top-k). For a backend
 * that runs the routed experts itself between the layers. */
int lg_decode_layer(const lg_layer *L, int T, void *x, const void *add_a, const void *add_b, const void *cos, const void *sin, long rot_stride,
                    void *k_cache, void *v_cache, long stride_head, long stride_pos, int pos, void *index_keys, lg_selection *sel, long sel_stride,
                    void *h_out, int64_t *ids, float *wts, void *mlp_out, const lg_experts *ex, void *routed_out, int nth) {
    const token_rows R = {cos, sin, rot_stride, sel, sel_stride};
    return forward_layer(L, T, x, add_a, add_b, &R, k_cache, v_cache, stride_head, stride_pos, pos, index_keys, h_out, ids, wts, mlp_out, ex,
                         routed_out, nth);
}

/* Every layer of T tokens in one call (layers[0..n)), for a model whose routed experts all sit in
 * RAM (experts[i]: layer i's tables, all NULL for a dense layer): no return to the caller between
 * layers. Layer i's cache is at k_base / v_base + i * stride_layer (v_base NULL for MLA). DSA's
 * indexer keys: the j-th full layer's at index_base + j * index_stride (DsaCache's slots are the
 * full layers in order); each token's selection carries a full layer's pick to the shared layers
 * after it. Returns 0, or -1 when out of memory. */
int lg_decode_layers(const lg_layer *layers, int n, int T, void *x, const void *cos, const void *sin, long rot_stride, void *k_base, void *v_base,
                     long stride_layer, long stride_head, long stride_pos, int pos, void *index_base, long index_stride, lg_selection *sel,
                     long sel_stride, const lg_experts *experts, int nth) {
    int H = 0, kmax = 0, es = 2;
    for (int i = 0; i < n; i++) {
        H = layers[i].hidden > H ? layers[i].hidden : H;
        kmax = layers[i].top_k > kmax ? layers[i].top_k : kmax;
        es = layers[i].dtype == 1 ? 2 : 4;
    }
    const size_t TH = (size_t)T * H;
    char *buf = malloc(TH * es * 3 + (size_t)T * kmax * (sizeof(int64_t) + sizeof(float)));
    if (!buf) return -1;
    void *h = buf, *shared = buf + TH * es, *routed = buf + 2 * TH * es;
    int64_t *ids = (int64_t *)(buf + 3 * TH * es);
    float *wts = (float *)(ids + (size_t)T * kmax);
    const token_rows R = {cos, sin, rot_stride, sel, sel_stride};
    int rc = 0, slot = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        const size_t off = (size_t)i * (size_t)stride_layer * (size_t)es;
        void *keys = layers[i].dsa ? (char *)index_base + (size_t)slot++ * (size_t)index_stride * (size_t)es : NULL;
        rc = forward_layer(&layers[i], T, x, NULL, NULL, &R, (char *)k_base + off, v_base ? (char *)v_base + off : NULL, stride_head, stride_pos, pos,
                           keys, h, ids, wts, shared, &experts[i], routed, nth);
    }
    free(buf);
    return rc;
}
