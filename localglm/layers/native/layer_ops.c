/* Per-token layer ops of CPU decoding: RMSNorm, RoPE (NeoX or interleaved), decode attention
 * (grouped-query, or MLA's over latent rows), the GLM router and the residual add of a MoE layer's outputs.
 *
 * Each runs alone (one ctypes call instead of a handful of torch ops: localglm/layers/norm.py,
 * rope.py, attention.py) and inside the fused decoder layer (localglm/models/native/decode_layer.c).
 * The row helpers work on float rows that hold values already rounded to the model dtype, so both
 * give the same numbers; their math and rounding points are localglm/layers/'s torch ops'.
 *
 * Model-side code: built with decode_layer.c and mla_attention.c into the library
 * localglm/layers/native.py loads, linked against quant's kernels (quant/native/lg_kernels.h for
 * the shared structs and helpers).
 */
#include "layer_ops.h"

/* sizeof of the structs ctypes mirrors (localglm/layers/native.py compares them at load):
 * 0 lg_layer, 1 lg_experts, 2 lg_mla, 3 lg_dsa; 0 past the end. */
size_t lg_layers_sizeof(int which) {
    switch (which) {
    case 0: return sizeof(lg_layer);
    case 1: return sizeof(lg_experts);
    case 2: return sizeof(lg_mla);
    case 3: return sizeof(lg_dsa);
    default: return 0;
    }
}

/* RMSNorm as transformers computes it: in fp32, cast back to the dtype, then times the weight (in
 * that dtype: the product rounded once). */
void lg_norm_row(const float *x, int n, const void *weight, int dtype, float eps, float *out) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float inv = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) {
        if (dtype == 1) out[i] = rnd(bf16_to_float(((const uint16_t *)weight)[i]) * rnd(x[i] * inv, 1), 1);
        else out[i] = ((const float *)weight)[i] * (x[i] * inv);
    }
}

/* One call instead of a handful of torch ops per norm, which is what a decode step on the CPU is made of. */
void lg_rms_norm(const void *x, int dtype, int rows, int n, const void *weight, float eps, void *out) {
    float *buf = malloc(2 * (size_t)n * sizeof(float));
    if (!buf) return; /* n is a hidden size: a failure here is the process's, not ours to report */
    for (int r = 0; r < rows; r++) {
        const size_t off = (size_t)r * n;
        load_row(x, dtype, off, n, buf);
        lg_norm_row(buf, n, weight, dtype, eps, buf + n);
        for (int i = 0; i < n; i++) store(out, dtype, off + i, buf[n + i]);
    }
    free(buf);
}

/* Rotary embedding of one row (one position) from x into out: the first `rot` dims rotate, each
 * product and the sum rounded to `dtype` as torch's elementwise ops do. Pair i is (x[i], x[i+half])
 * (NeoX: x * cos + rotate_half(x) * sin) or, interleaved, (x[2i], x[2i+1]) with the result
 * de-interleaved (layers/rope.py apply_rope_interleaved: its cos/sin column i for pair i). Either
 * way out[i] = a*cos - b*sin and out[i+half] = b*cos + a*sin (rotate_half's negation is exact). */
void lg_rope_into(const float *x, float *out, int rot, const void *cos, const void *sin, int dtype, int interleaved) {
    const int half = rot / 2;
    for (int i = 0; i < half; i++) {
        const float a = interleaved ? x[2 * i] : x[i], b = interleaved ? x[2 * i + 1] : x[i + half];
        const int j = interleaved ? i : i + half; /* the table column of the second output */
        out[i] = rnd(rnd(a * load_val(cos, dtype, i), dtype) - rnd(b * load_val(sin, dtype, i), dtype), dtype);
        out[i + half] = rnd(rnd(b * load_val(cos, dtype, j), dtype) + rnd(a * load_val(sin, dtype, j), dtype), dtype);
    }
}

/* Rotary embedding of one row in place (halves paired), the rest of the row passing through. `tmp` holds rot floats. */
void lg_rope_row(float *x, int rot, const void *cos, const void *sin, int dtype, float *tmp) {
    memcpy(tmp, x, (size_t)rot * sizeof(float));
    lg_rope_into(tmp, x, rot, cos, sin, dtype, 0);
}

void lg_rope(const void *x, int dtype, int rows, int hd, int rot, const void *cos, const void *sin, void *out) {
    float *buf = malloc(((size_t)hd + (size_t)rot) * sizeof(float));
    if (!buf) return;
    for (int r = 0; r < rows; r++) {
        const size_t off = (size_t)r * hd;
        load_row(x, dtype, off, hd, buf);
        lg_rope_row(buf, rot, cos, sin, dtype, buf + hd);
        for (int i = 0; i < hd; i++) store(out, dtype, off + i, buf[i]);
    }
    free(buf);
}

#ifdef __AVX2__
/* e^x for eight floats (Cephes' expf: range reduction by ln 2, degree-5 polynomial; within 2 ulp
 * of expf over the softmax's range x <= 0, and 0 below -87). libm's expf, one value at a time,
 * was most of a long-context attention call. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

/* s[t] = exp(s[t] - mx) for t < n; returns their sum (in lane order, then the tail). */
static float exp_shift_sum(float *s, int n, float mx) {
    int t = 0;
    float sum = 0.0f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    const __m256 m = _mm256_set1_ps(mx);
    for (; t + 8 <= n; t += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
        _mm256_storeu_ps(s + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum256(acc);
#endif
    for (; t < n; t++) {
        s[t] = expf(s[t] - mx);
        sum += s[t];
    }
    return sum;
}

/* s[0..n) <- their softmax (fp32: the max, exp_shift_sum, one reciprocal times each): lg_attend's and
 * lg_attend_tokens' one order for it. */
static inline void softmax_in_place(float *s, int n) {
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) mx = s[i] > mx ? s[i] : mx;
    const float inv = 1.0f / exp_shift_sum(s, n, mx);
    for (int i = 0; i < n; i++) s[i] *= inv;
}

/* acc[i] += p[j] * rows[j][i] for j < n in order (rows of hv floats): a block of value rows weighted by their
 * probabilities, lg_attend's and lg_attend_tokens' one order for it. */
static inline void add_weighted_rows(const float *p, const float *rows, int n, int hv, float *acc) {
    int i = 0;
#ifdef __AVX2__
    if (n == AB) /* a whole block: four chunks' chains at once, the row count known (the same sums, in the same order) */
        for (; i + 32 <= hv; i += 32) {
            __m256 a[4];
            for (int c = 0; c < 4; c++) a[c] = _mm256_loadu_ps(acc + i + 8 * c);
            for (int j = 0; j < AB; j++) {
                const __m256 pj = _mm256_set1_ps(p[j]);
                for (int c = 0; c < 4; c++) a[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(rows + (size_t)j * hv + i + 8 * c), a[c]);
            }
            for (int c = 0; c < 4; c++) _mm256_storeu_ps(acc + i + 8 * c, a[c]);
        }
    for (; i + 8 <= hv; i += 8) {
        __m256 a = _mm256_loadu_ps(acc + i);
        for (int j = 0; j < n; j++) a = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(rows + (size_t)j * hv + i), a);
        _mm256_storeu_ps(acc + i, a);
    }
#endif
    for (; i < hv; i++) {
        float a = acc[i];
        for (int j = 0; j < n; j++) a += p[j] * rows[(size_t)j * hv + i];
        acc[i] = a;
    }
}

/* Query tokens a work item of lg_attend_tokens takes: their scores sit side by side (TQ x group x positions
 * floats) while each block of cached rows is converted once for all of them. */
#define ATTEND_TQ 16
/* The same for MLA's latent rows: every query head scores each row (16-20 heads against GQA's group of a
 * few), so 16 tokens' scores of a thread's heads (~800 KB at 1,550 cached tokens) left L2, and a 16-token
 * forward at GLM-5's widths ran slower than token after token (201 ms against 185-194). Zen 4, 2 threads, 16
 * tokens: GLM-5's widths after 1,550 tokens 186 / 176 / 182 ms at 2 / 4 / 8 tokens a slice, Flash's after
 * 4,096 165-168 at 4 and at 16. */
#define ATTEND_TQ_LATENT 4

/* Attention of T consecutive query tokens of one sequence against the KV cache: per (token, head), scores =
 * q.k * scale (fp32), softmax (fp32), out = sum p v (rounded to dtype) -- what localglm/layers/attention.py
 * does with torch ops. q: token t's head h at q + t * q_stride + h * hk (floats); k, v of `dtype`: kv head g,
 * position s at g * stride_head + s * stride_pos, keys of hk values and values of hv (MLA reads its latent rows
 * as both: keys latent | rope key, values the latent, hv < hk); out: token t's head h at out + t * o_stride +
 * h * hv. Token t reads positions 0..len0 + t - 1, or, with idx (one token: DSA's top-k, read in that order; a
 * position masked out of torch's form adds an exact 0 to its sums, so the math is the same), idx[0..len0).
 *
 * Cached rows are read AB at a time (converted to floats, or, bh, scored as the bf16 rows they are by
 * dot_block_bh) and used by every query head of their group and every token of a slice of tq: a long
 * prompt's 128-token chunks spent about a third of their attention converting rows once per token (perf, the
 * default model at 1,920 tokens). Per (token, head) the operations and their order do not depend on T, the
 * slice or the split (rows a token does not see are real rows here, zeros or the block's first row there:
 * their scores are never read; the same scale, max, exp_shift_sum, normalisation and p v accumulation block
 * after block), so a token's output is bit for bit its one-token call's (tests/test_fused_prefill.py). Work
 * items are (kv head, slice of tokens, share of the group's query heads), so every thread has some even with
 * fewer kv heads than threads. Returns 0, or -1 when out of memory. */
static int attend_tokens(const float *q, long q_stride, const void *k, const void *v, int dtype, int heads, int kv_heads, int len0, int T,
                         const int32_t *idx, int hk, int hv, long stride_head, long stride_pos, float scale, float *out, long o_stride, int nth,
                         int bh, int tq) {
    tq = tq < T ? tq : T; /* a slice's scores' room: one token takes one token's */
    const int group = heads / kv_heads, slices = (T + tq - 1) / tq;
    int split = nth / (kv_heads * slices);
    split = split < 1 ? 1 : split > group ? group : split;
    const int chunk = (group + split - 1) / split, items = kv_heads * slices * split;
    const int padded = (len0 + T - 1 + AB - 1) / AB * AB, hr = hk > hv ? hk : hv;
    const size_t per_item = (size_t)tq * (size_t)chunk * (size_t)padded + (size_t)AB * (size_t)hr +
                            (bh ? ((size_t)tq * (size_t)chunk * (size_t)hk + 1) / 2 : 0); /* bh: the queries as bf16 */
    int failed = 0;
    const int par = nth > 1 && items > 1 && (long)heads * (len0 + T - 1) * hk * T >= (1L << 15);
#pragma omp parallel for num_threads(nth) schedule(dynamic, 1) if (par)
    for (int it = 0; it < items; it++) {
        float *sc = malloc(sizeof(float) * per_item);
        if (!sc) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        float *rows = sc + (size_t)tq * (size_t)chunk * (size_t)padded;
        const int g = it / (slices * split), sl = (it / split) % slices, h0 = g * group + (it % split) * chunk;
        const int h1 = h0 + chunk < (g + 1) * group ? h0 + chunk : (g + 1) * group;
        const int t0 = sl * tq, t1 = t0 + tq < T ? t0 + tq : T;
        const int last = len0 + t1 - 1; /* positions the slice's last token sees */
        const size_t base = (size_t)g * (size_t)stride_head;
#define SCORES(t, h) (sc + ((size_t)((t) - t0) * (size_t)chunk + (size_t)((h) - h0)) * (size_t)padded)
#define AT(p) (base + (size_t)(idx ? idx[p] : (p)) * (size_t)stride_pos) /* position p's row */
#ifdef LG_DPBF16
        uint16_t *qb = (uint16_t *)(rows + (size_t)AB * (size_t)hr);
#define QBH(t, h) (qb + ((size_t)((t) - t0) * (size_t)chunk + (size_t)((h) - h0)) * (size_t)hk)
        if (bh)
            for (int t = t0; t < t1; t++)
                for (int h = h0; h < h1; h++) row_to_bf16(q + (size_t)t * (size_t)q_stride + (size_t)h * hk, hk, QBH(t, h)); /* exact: bf16 values */
#endif
        for (int b0 = 0; b0 < last; b0 += AB) {
            const int nb = last - b0 < AB ? last - b0 : AB;
#ifdef LG_DPBF16
            const uint16_t *rp[AB];
            if (bh)
                for (int j = 0; j < AB; j++) rp[j] = (const uint16_t *)k + AT(b0 + (j < nb ? j : 0));
            else
#endif
                for (int j = 0; j < AB; j++) {
                    if (j < nb) load_row(k, dtype, AT(b0 + j), hk, rows + (size_t)j * hk);
                    else memset(rows + (size_t)j * hk, 0, (size_t)hk * sizeof(float));
                }
            for (int t = t0; t < t1; t++) {
                const int len = len0 + t, nt = len - b0 < AB ? len - b0 : AB;
                if (nt <= 0) continue;
                for (int h = h0; h < h1; h++) {
                    float *s = SCORES(t, h) + b0;
#ifdef LG_DPBF16
                    if (bh) dot_block_bh(QBH(t, h), rp, hk, s);
                    else
#endif
                        dot_block(q + (size_t)t * (size_t)q_stride + (size_t)h * hk, rows, hk, s);
                    for (int j = 0; j < nt; j++) s[j] *= scale;
                }
            }
        }
#ifdef LG_DPBF16
#undef QBH
#endif
        for (int t = t0; t < t1; t++)
            for (int h = h0; h < h1; h++) {
                const int len = len0 + t;
                softmax_in_place(SCORES(t, h), len);
                float *acc = out + (size_t)t * (size_t)o_stride + (size_t)h * hv;
                for (int i = 0; i < hv; i++) acc[i] = 0.0f;
            }
        for (int b0 = 0; b0 < last; b0 += AB) {
            const int nb = last - b0 < AB ? last - b0 : AB;
            for (int j = 0; j < nb; j++) load_row(v, dtype, AT(b0 + j), hv, rows + (size_t)j * hv);
            for (int t = t0; t < t1; t++) {
                const int len = len0 + t, nt = len - b0 < AB ? len - b0 : AB;
                if (nt <= 0) continue;
                for (int h = h0; h < h1; h++) add_weighted_rows(SCORES(t, h) + b0, rows, nt, hv, out + (size_t)t * (size_t)o_stride + (size_t)h * hv);
            }
        }
#undef SCORES
#undef AT
        for (int t = t0; t < t1; t++)
            for (int h = h0; h < h1; h++)
                for (int i = 0; i < hv; i++) {
                    float *o = out + (size_t)t * (size_t)o_stride + (size_t)h * hv + i;
                    *o = rnd(*o, dtype);
                }
        free(sc);
    }
    return failed ? -1 : 0;
}

int lg_attend(const float *q, const void *k, const void *v, int dtype, int heads, int kv_heads, int len, const int32_t *idx,
              int hk, int hv, long stride_head, long stride_pos, float scale, float *out, int nth) {
    return attend_tokens(q, 0, k, v, dtype, heads, kv_heads, len, 1, idx, hk, hv, stride_head, stride_pos, scale, out, 0, nth, 0, 1);
}

int lg_attend_tokens(const float *q, long q_stride, const void *k, const void *v, int dtype, int heads, int kv_heads, int len0, int T,
                     int hd, long stride_head, long stride_pos, float scale, float *out, long o_stride, int nth) {
    return attend_tokens(q, q_stride, k, v, dtype, heads, kv_heads, len0, T, NULL, hd, hd, stride_head, stride_pos, scale, out, o_stride, nth, 0,
                         ATTEND_TQ);
}

/* Whether MLA's latent rows take vdpbf16ps for q . k (lg_attend_latent, lg_attend_latent_tokens: one rule, one order). */
static int latent_bh(int dtype, int hk) {
#ifdef LG_DPBF16
    return dtype == 1 && hk % 32 == 0;
#else
    (void)dtype, (void)hk;
    return 0;
#endif
}

int lg_attend_latent(const float *q, const void *rows, int dtype, int heads, int len, const int32_t *idx, int hk, int hv, long stride_pos,
                     float scale, float *out, int nth) {
    return attend_tokens(q, 0, rows, rows, dtype, heads, 1, len, 1, idx, hk, hv, 0, stride_pos, scale, out, 0, nth, latent_bh(dtype, hk), 1);
}

int lg_attend_latent_tokens(const float *q, long q_stride, const void *rows, int dtype, int heads, int len0, int T, int hk, int hv,
                            long stride_pos, float scale, float *out, long o_stride, int nth) {
    return attend_tokens(q, q_stride, rows, rows, dtype, heads, 1, len0, T, NULL, hk, hv, 0, stride_pos, scale, out, o_stride, nth,
                         latent_bh(dtype, hk), ATTEND_TQ_LATENT);
}

/* lg_attend on a q of `dtype`, out of `dtype`: the single op localglm/layers/attention.py calls. */
int lg_decode_attention(const void *q, const void *k, const void *v, int dtype, int heads, int kv_heads, int len, int hd,
                        long stride_head, long stride_pos, float scale, void *out, int nth) {
    const size_t n = (size_t)heads * hd;
    float *buf = malloc(2 * n * sizeof(float));
    if (!buf) return -1;
    load_row(q, dtype, 0, (int)n, buf);
    const int rc = lg_attend(buf, k, v, dtype, heads, kv_heads, len, NULL, hd, hd, stride_head, stride_pos, scale, buf + n, nth);
    if (rc == 0)
        for (size_t i = 0; i < n; i++) store(out, dtype, i, buf[n + i]);
    free(buf);
    return rc;
}

/* GLM's sigmoid router (localglm/layers/router.py): choose by score + correction bias within the best
 * topk_group groups (a group scores the sum of its two best), weight by the unbiased scores. Ties go
 * to the lower index. `sc` holds 2E floats. */
void lg_route(const lg_layer *L, const float *h, float *sc, int64_t *ids, float *wts, int nth) {
    const int E = L->n_experts, H = L->hidden, k = L->top_k;
    float *choice = sc + E;
    const int par = nth > 1 && (size_t)E * H >= (1u << 16);
#pragma omp parallel for num_threads(nth) schedule(dynamic, lg_chunk(E, nth)) if (par)
    for (int e = 0; e < E; e++) {
        sc[e] = 1.0f / (1.0f + expf(-dotf(L->router_w + (size_t)e * H, h, H)));
        choice[e] = sc[e] + L->router_bias[e];
    }
    if (L->n_group > 1) {
        const int G = L->n_group, per = E / G;
        float gscore[G];
        int keep[G];
        for (int g = 0; g < G; g++) {
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int e = g * per; e < (g + 1) * per; e++) {
                const float c = choice[e];
                if (c > b1) { b2 = b1; b1 = c; } else if (c > b2) b2 = c;
            }
            gscore[g] = per > 1 ? b1 + b2 : b1;
            keep[g] = 0;
        }
        for (int j = 0; j < L->topk_group && j < G; j++) {
            int best = -1;
            for (int g = 0; g < G; g++)
                if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
            keep[best] = 1;
        }
        for (int e = 0; e < E; e++)
            if (!keep[e / per]) choice[e] = -INFINITY;
    }
    unsigned char taken[E];
    memset(taken, 0, (size_t)E);
    float sum = 0.0f;
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || choice[e] > choice[best])) best = e;
        taken[best] = 1;
        ids[j] = best;
        wts[j] = sc[best];
        sum += wts[j];
    }
    for (int j = 0; j < k; j++) wts[j] = (L->norm_topk ? wts[j] / (sum + 1e-20f) : wts[j]) * L->scaling;
}

/* x = x + (a + b), or x + a without b: the residual add of a MoE layer's routed and shared outputs,
 * rounded as torch rounds `x + (routed + shared)`. All of `dtype`, n values. */
void lg_residual_add(void *x, const void *a, const void *b, int dtype, int n) {
    for (int i = 0; i < n; i++) store(x, dtype, i, load_val(x, dtype, i) + moe_output(a, b, dtype, i));
}
