/* Multi-head latent attention of one decoded token: glm4_moe_lite's (GLM-4.7-Flash) over every cached
 * row, glm_moe_dsa's (GLM-5) over its indexer's top-k rows (dsa_indexer.c). For the fused decoder
 * layer (decode_layer.c picks it by the layer's attn_kind) and, as lg_mla_decode_attention, for the
 * absorbed form of localglm/layers/mla.py's torch decode path.
 *
 * The math is localglm/layers/mla.py's absorbed form, rounded where its `_absorbed_attention`
 * docstring says a native kernel must round: kv_b is folded into the query (W_UK) and the output
 * (W_UV), so a token reads each cached row (normed latent | roped shared key) once and never expands
 * the context. The attention itself is lg_attend's with one kv head: keys are the whole row against
 * [q_lat | q_rope], values its latent part -- exactly steps 2-4 of that docstring (fp32 scores times
 * the scale, fp32 softmax, the latent sum rounded to the dtype).
 *
 * Why torch's decode path calls this file too: the fold, the attention and the unfold are fp32 sums,
 * and torch's bmm adds them up in another order; both round to the dtype at the same points, but a
 * sum that straddles a rounding boundary lands one bf16 ulp apart (on a model with hidden 256 and
 * 250 tokens of context, 20 of 256 outputs of one layer did). One core (`absorbed`) for both paths
 * makes the fused and the torch decode the same bits by construction, as lg_attend does for GQA.
 *
 * Work per token and layer: heads * (nope + v) * kv_lora multiply-adds for the fold and unfold
 * (dense kv_b of the dtype, read once), and heads * (2 kv_lora + rope) per position attended.
 */
#include "layer_ops.h"

#ifdef __AVX2__
/* Eight values of a dtype row as floats. */
static inline __m256 load8(const void *w, int dt, size_t i) {
    if (dt == 1) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i))), 16));
    return _mm256_loadu_ps((const float *)w + i);
}
#endif

#define VM_ROWS 16 /* rows a pass of vec_mat streams (contiguous memory); 16 x 64 columns measured best here */

/* out[c] = sum_n a[n] * W[n][c] (c < width), summed over n in order in fp32: a vector times a
 * matrix of `rows` rows of `width` values of the dtype at w + off -- q_nope[h] . W_UK[h]. Passes of
 * VM_ROWS rows read memory in order (a column-at-a-time walk over all rows was a third slower,
 * bandwidth-bound on a model whose weights do not fit in cache); each column's sum continues from
 * the last pass, so the order of the sum is the same. */
static void vec_mat(const float *a, const void *w, int dt, size_t off, int rows, int width, float *out) {
    for (int c = 0; c < width; c++) out[c] = 0.0f;
    for (int n0 = 0; n0 < rows; n0 += VM_ROWS) {
        const int n1 = n0 + VM_ROWS < rows ? n0 + VM_ROWS : rows;
        int c = 0;
#ifdef __AVX2__
        for (; c + 64 <= width; c += 64) {
            __m256 s[8];
            for (int j = 0; j < 8; j++) s[j] = _mm256_loadu_ps(out + c + 8 * j);
            for (int n = n0; n < n1; n++) {
                const __m256 an = _mm256_set1_ps(a[n]);
                const size_t at = off + (size_t)n * width + c;
                for (int j = 0; j < 8; j++) s[j] = _mm256_fmadd_ps(an, load8(w, dt, at + 8 * (size_t)j), s[j]);
            }
            for (int j = 0; j < 8; j++) _mm256_storeu_ps(out + c + 8 * j, s[j]);
        }
        for (; c + 8 <= width; c += 8) {
            __m256 s = _mm256_loadu_ps(out + c);
            for (int n = n0; n < n1; n++) s = _mm256_fmadd_ps(_mm256_set1_ps(a[n]), load8(w, dt, off + (size_t)n * width + c), s);
            _mm256_storeu_ps(out + c, s);
        }
#endif
        for (; c < width; c++) {
            float s = out[c];
            for (int n = n0; n < n1; n++) s += a[n] * load_val(w, dt, off + (size_t)n * width + c);
            out[c] = s;
        }
    }
}

/* Floats of scratch `absorbed` takes: the latent-space queries [heads, row] and their attention outputs [heads, kv_lora]. */
static size_t absorbed_scratch(const lg_mla *M, int heads) {
    return (size_t)heads * ((size_t)M->kv_lora + (size_t)M->rope) + (size_t)heads * (size_t)M->kv_lora;
}

/* Step 1 of mla.py's `_absorbed_attention` for n query rows (tokens after one another, `heads` rows each):
 * q [n, nope + rope] (floats of dtype values, the rope part roped; row i is head i % heads) -> ql [n, kv_lora
 * + rope], each row's query in latent space: q_nope . W_UK (rounded) | q_rope. */
static void fold_queries(const lg_mla *M, int heads, int n, int dt, const float *q, float *ql, int nth) {
    const int lat = M->kv_lora, rope = M->rope, qk = M->nope + rope, row = lat + rope;
    const int par = nth > 1 && (size_t)n * (size_t)(M->nope + M->v) * (size_t)lat >= (1u << 16);
#pragma omp parallel for num_threads(nth) schedule(dynamic, lg_chunk(n, nth)) if (par)
    for (int i = 0; i < n; i++) {
        float *qh = ql + (size_t)i * row;
        vec_mat(q + (size_t)i * qk, M->w_uk, dt, (size_t)(i % heads) * (size_t)M->head_stride, M->nope, lat, qh);
        for (int c = 0; c < lat; c++) qh[c] = rnd(qh[c], dt);
        memcpy(qh + lat, q + (size_t)i * qk + M->nope, (size_t)rope * sizeof(float));
    }
}

/* Step 5 for n rows: olat [n, kv_lora] (floats of dtype values) -> out [n, v], row i = W_UV[i % heads] .
 * o_lat[i] (a dense [v, kv_lora] matrix-vector product, rounded). */
static void unfold_values(const lg_mla *M, int heads, int n, int dt, const float *olat, float *out, int nth) {
    const int lat = M->kv_lora;
    const size_t es = dt == 1 ? 2 : 4;
    const int par = nth > 1 && (size_t)n * (size_t)(M->nope + M->v) * (size_t)lat >= (1u << 16);
#pragma omp parallel for num_threads(nth) schedule(dynamic, lg_chunk(n, nth)) if (par)
    for (int i = 0; i < n; i++) {
        const lg_mat uv = {.kind = dt == 1 ? 1 : 2, .n = M->v, .k = lat, .w = (const char *)M->w_uv + (size_t)(i % heads) * (size_t)M->head_stride * es};
        lg_matvec(&uv, olat + (size_t)i * lat, dt, NULL, out + (size_t)i * M->v, 1);
    }
}

/* Steps 1-5 of mla.py's `_absorbed_attention` for one token: q [heads, nope + rope] (floats of dtype
 * values, the rope part roped) against `len` cached rows (latent | rope key at rows + t *
 * stride_pos; t = 0..len-1, or idx[0..len)) -> out [heads, v] floats of dtype values: fold_queries,
 * attention of [q_lat | q_rope] (lg_attend_latent), unfold_values. Returns 0, or -1 when out of memory. */
static int absorbed(const lg_mla *M, int heads, int dt, const float *q, const void *rows, long stride_pos, int len, const int32_t *idx,
                    float *scratch, float *out, int nth) {
    const int lat = M->kv_lora, row = lat + M->rope;
    float *ql = scratch, *olat = ql + (size_t)heads * row;
    fold_queries(M, heads, heads, dt, q, ql, nth);
    const int rc = lg_attend_latent(ql, rows, dt, heads, len, idx, row, lat, stride_pos, M->scale, olat, nth);
    if (rc) return rc;
    unfold_values(M, heads, heads, dt, olat, out, nth);
    return 0;
}

/* The projections of one token: qa = norm(q_a(hn)) [q_lora] (unused without q_lora), q =
 * q_b(qa) or q_proj(hn) [heads, nope + rope] (not yet roped), kv = kv_a(hn) [latent + rope] (raw). */
static void mla_project(const lg_layer *L, const float *hn, qact *xa, float *qa, float *q, float *kv, int nth) {
    const lg_mla *M = L->mla;
    const int dt = L->dtype;
    if (M->q_lora) {
        lg_matvec(&M->q_a, hn, dt, xa, qa, nth);
        lg_norm_row(qa, M->q_lora, M->q_a_norm, dt, M->latent_eps, qa); /* in place: each value is read before it is written */
        lg_matvec(&M->q_b, qa, dt, xa, q, nth);
    } else {
        lg_matvec(&M->q_b, hn, dt, xa, q, nth);
    }
    lg_matvec(&M->kv_a, hn, dt, xa, kv, nth);
}

/* One token's q rope parts roped per head (in place), and its row norm(latent) | roped key (kv, in place)
 * written to rows at pos * stride_pos; kr holds `rope` floats. */
static void rope_and_write(const lg_layer *L, float *q, float *kv, const void *cos, const void *sin, void *rows, long stride_pos, int pos, float *kr) {
    const lg_mla *M = L->mla;
    const int dt = L->dtype, heads = L->heads, lat = M->kv_lora, rope = M->rope, qk = M->nope + rope, row = lat + rope;
    for (int h = 0; h < heads; h++) {
        float *qr = q + (size_t)h * qk + M->nope;
        lg_rope_into(qr, kr, rope, cos, sin, dt, M->interleave);
        memcpy(qr, kr, (size_t)rope * sizeof(float));
    }
    lg_norm_row(kv, lat, M->kv_a_norm, dt, M->latent_eps, kv);
    lg_rope_into(kv + lat, kr, rope, cos, sin, dt, M->interleave);
    memcpy(kv + lat, kr, (size_t)rope * sizeof(float));
    const size_t at = (size_t)pos * (size_t)stride_pos;
    for (int i = 0; i < row; i++) store(rows, dt, at + i, kv[i]);
}

/* T consecutive tokens at pos.. through layer L's MLA after their projections (mla_project's qa, q, kv, or
 * lg_mat_rows', each row's numbers whoever computed them), into ov before o_proj: every token's row written first (token t reads
 * rows up to pos + t only, which the later tokens' rows do not touch) -- on a full DSA layer its indexer key too,
 * then its pick into its selection (token t's at sel + t * sel_stride int32s; a pick reads keys 0..pos + t only, so
 * the later tokens' keys written before it change nothing; none while the context fits the top-k; torch.topk's
 * ties as over a prompt chunk's rows of picks_end keys, or as each token's one-token step where picks_end is 0:
 * dsa_indexer.c) -- the queries
 * folded for all of them (q_b's absorbed halves read once, not once a token), then one lg_attend_latent_tokens
 * where no token has a pick (a cached row read once for the tokens) or each token's lg_attend_latent over its
 * picked rows, then the values unfolded for all: each token's numbers its one-token call's. hn [T, hidden]; qa [T,
 * q_lora] (the indexer's query latent); q [T, heads * (nope + rope)], kv [T, kv_lora + rope] (changed in place);
 * cos / sin token t's at t * rot_stride values of dtype; ov [T, heads * v]; `scratch` holds
 * lg_mla_tokens_scratch(L, T) floats. Returns 0, or -1 when out of memory. */
int lg_mla_tokens(const lg_layer *L, int T, const float *hn, const float *qa, float *q, float *kv, const void *cos, const void *sin, long rot_stride,
                  void *rows, long stride_pos, int pos, void *index_keys, void *sel, long sel_stride, int picks_end, qact *xa, float *scratch, float *ov,
                  int nth) {
    const lg_mla *M = L->mla;
    const int dt = L->dtype, heads = L->heads, lat = M->kv_lora, row = lat + M->rope, qn = heads * (M->nope + M->rope);
    const size_t es = dt == 1 ? 2 : 4;
    const int dsa = L->attn_kind == LG_ATTN_DSA && sel != NULL, full = dsa && L->dsa != NULL;
    float *kr = scratch, *ql = kr + M->rope, *olat = ql + (size_t)T * heads * row;
#define TOKEN_ROT(base, t) ((const char *)(base) + (size_t)(t) * (size_t)rot_stride * es)
#define TOKEN_SEL(t) ((lg_selection *)((int32_t *)sel + (size_t)(t) * (size_t)sel_stride))
    for (int t = 0; t < T; t++)
        rope_and_write(L, q + (size_t)t * qn, kv + (size_t)t * row, TOKEN_ROT(cos, t), TOKEN_ROT(sin, t), rows, stride_pos, pos + t, kr);
    if (full) { /* the indexer's keys, then the picks of the tokens past the top-k (the projections read once for them) */
        const lg_dsa *D = L->dsa;
        if (lg_dsa_keys(D, T, hn, dt, cos, sin, rot_stride, xa, (char *)index_keys + (size_t)pos * (size_t)D->head_dim * es, nth)) return -1;
        const int first = D->topk - pos > 0 ? (D->topk - pos < T ? D->topk - pos : T) : 0; /* tokens before it fit the top-k */
        for (int t = 0; t < first; t++) TOKEN_SEL(t)->n = 0;
        if (first < T && lg_dsa_select_tokens(D, T - first, hn + (size_t)first * L->hidden, qa + (size_t)first * M->q_lora, dt, TOKEN_ROT(cos, first),
                                              TOKEN_ROT(sin, first), rot_stride, index_keys, pos + first + 1, picks_end, xa, TOKEN_SEL(first), sel_stride,
                                              nth))
            return -1;
    }
    int picked = 0; /* tokens attending a pick, not every row up to them */
    for (int t = 0; t < T && dsa; t++) picked += TOKEN_SEL(t)->n > 0;
    fold_queries(M, heads, T * heads, dt, q, ql, nth);
    int rc = 0;
    if (!picked) { /* one token: lg_attend_latent's numbers, as every token's are */
        rc = lg_attend_latent_tokens(ql, (long)heads * row, rows, dt, heads, pos + 1, T, row, lat, stride_pos, M->scale, olat, (long)heads * lat, nth);
    } else {
        for (int t = 0; t < T && rc == 0; t++) {
            const lg_selection *st = TOKEN_SEL(t);
            rc = lg_attend_latent(ql + (size_t)t * heads * row, rows, dt, heads, st->n > 0 ? st->n : pos + t + 1, st->n > 0 ? st->pos : NULL, row, lat,
                                  stride_pos, M->scale, olat + (size_t)t * heads * lat, nth);
        }
    }
#undef TOKEN_ROT
#undef TOKEN_SEL
    if (rc) return rc;
    unfold_values(M, heads, T * heads, dt, olat, ov, nth);
    return 0;
}

size_t lg_mla_tokens_scratch(const lg_layer *L, int T) {
    const lg_mla *M = L->mla;
    return (size_t)M->rope + (size_t)T * (size_t)L->heads * ((size_t)M->kv_lora + (size_t)M->rope + (size_t)M->kv_lora);
}

/* Floats of scratch: q_a's output, q [heads, nope + rope], this token's row, the values [heads, v],
 * and lg_mla_tokens' for one token. */
size_t lg_mla_scratch(const lg_layer *L) {
    const lg_mla *M = L->mla;
    const size_t heads = (size_t)L->heads, row = (size_t)M->kv_lora + (size_t)M->rope;
    return (size_t)M->q_lora + heads * ((size_t)M->nope + (size_t)M->rope) + row + heads * (size_t)M->v + lg_mla_tokens_scratch(L, 1);
}

/* One token at `pos` through layer L's MLA: hn (the input-normed hidden state, floats of dtype
 * values) -> mla_project, lg_mla_tokens, o_proj into o [hidden]. `xa` has room for one quantized row
 * of hidden, q_lora and heads * v. Returns 0, or -1 when out of memory. */
int lg_mla_attention(const lg_layer *L, const float *hn, const void *cos, const void *sin, void *rows, long stride_pos, int pos,
                     void *index_keys, lg_selection *sel, qact *xa, float *scratch, float *o, int nth) {
    const lg_mla *M = L->mla;
    const int heads = L->heads, qk = M->nope + M->rope, row = M->kv_lora + M->rope;
    float *qa = scratch, *q = qa + M->q_lora, *kv = q + (size_t)heads * qk, *ov = kv + row, *rest = ov + (size_t)heads * M->v;
    mla_project(L, hn, xa, qa, q, kv, nth);
    const int rc = lg_mla_tokens(L, 1, hn, qa, q, kv, cos, sin, 0, rows, stride_pos, pos, index_keys, sel, 0, 0, xa, rest, ov, nth);
    if (rc == 0) lg_matvec(&L->o, ov, L->dtype, xa, o, nth);
    return rc;
}

/* Steps 2-4 of mla.py's absorbed form for T > 1 query tokens, the last T of `len` cached rows (latent | rope
 * key at rows + s * stride_pos), token t reading rows 0..len - T + t: ql [T, heads, kv_lora + rope] of dtype (the
 * queries in latent space, folded by the caller) -> olat [T, heads, kv_lora] of dtype, lg_attend_latent_tokens'
 * numbers (on bf16 rows, the scores by vdpbf16ps on the rows as cached). For an append of many tokens through
 * torch, whose fold and unfold stay torch's batched matmuls. Returns 0, or -1 when out of memory. */
int lg_mla_latent_attention(const void *ql, int dtype, int T, int heads, int kv_lora, int rope, const void *rows, long stride_pos, int len, float scale,
                            void *olat, int nth) {
    const size_t row = (size_t)kv_lora + (size_t)rope, nq = (size_t)T * (size_t)heads * row, no = (size_t)T * (size_t)heads * (size_t)kv_lora;
    float *q = malloc((nq + no) * sizeof(float));
    if (!q) return -1;
    float *o = q + nq;
    load_row(ql, dtype, 0, (int)nq, q);
    const int rc = lg_attend_latent_tokens(q, (long)(heads * row), rows, dtype, heads, len - T + 1, T, (int)row, kv_lora, stride_pos, scale, o,
                                           (long)heads * kv_lora, nth);
    if (rc == 0)
        for (size_t i = 0; i < no; i++) store(olat, dtype, i, o[i]);
    free(q);
    return rc;
}

/* mla.py's absorbed form of one token, for its torch decode path: the fused layer's own core.
 * q_nope / q_rope (roped) of dtype, head h's at h * nope_stride / h * rope_stride; W_UK, W_UV and
 * head_stride as lg_mla's; `len` cached rows (latent | rope key at rows + t * stride_pos; t =
 * 0..len-1, or idx[0..len)) -> out [heads, v] of dtype, before o_proj. Returns 0, or -1 when out of memory. */
int lg_mla_decode_attention(const void *q_nope, long nope_stride, const void *q_rope, long rope_stride, int dtype, int heads, int kv_lora,
                            int nope, int rope, int v, const void *w_uk, const void *w_uv, long head_stride, float scale,
                            const void *rows, long stride_pos, int len, const int32_t *idx, void *out, int nth) {
    const lg_mla M = {.kv_lora = kv_lora, .nope = nope, .rope = rope, .v = v, .scale = scale, .w_uk = w_uk, .w_uv = w_uv, .head_stride = head_stride};
    const size_t qk = (size_t)nope + (size_t)rope, nv = (size_t)heads * (size_t)v;
    float *buf = malloc(((size_t)heads * qk + nv + absorbed_scratch(&M, heads)) * sizeof(float));
    if (!buf) return -1;
    float *q = buf, *ov = q + (size_t)heads * qk;
    for (int h = 0; h < heads; h++) {
        load_row(q_nope, dtype, (size_t)h * (size_t)nope_stride, nope, q + (size_t)h * qk);
        load_row(q_rope, dtype, (size_t)h * (size_t)rope_stride, rope, q + (size_t)h * qk + nope);
    }
    const int rc = absorbed(&M, heads, dtype, q, rows, stride_pos, len, idx, ov + nv, ov, nth);
    if (rc == 0)
        for (size_t i = 0; i < nv; i++) store(out, dtype, i, ov[i]);
    free(buf);
    return rc;
}
