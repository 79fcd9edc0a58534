/* The fused GLM MoE decoder layer: T consecutive tokens of one sequence through one decoder layer
 * (pre-norm attention, then a dense SwiGLU MLP or the MoE's router, shared experts and, where they
 * sit in RAM, routed experts) in one call, and every layer of those tokens in one call. Why: a
 * decode step through torch is ~60 small ops per layer at ~6 us each; on the CPU that overhead, not
 * the arithmetic, was most of a token -- and of a prompt chunk or a speculative verification (T > 1).
 *
 * T tokens give each token exactly the one-token call's arithmetic (the same per-row activation
 * quantization, the same sums in the same order), so a T-token forward is bit-identical to T
 * one-token steps: token t writes its cache row at pos + t and attends [0, pos + t], one token after
 * the other inside the call, while the projections read each weight row once for up to four tokens
 * (quant's lg_mat_rows: lg_linear's tiles for quantized rows, tiles of rows x tokens for dense ones,
 * whose per-token result does not depend on the tile) and the routed experts run once for all the
 * tokens routed to them (lg_moe). The math and its rounding
 * points are localglm/layers/'s torch ops' (norm, rope, attention, router, mlp, experts);
 * quantized products are exactly quant's lg_linear's.
 *
 * The layer is the decoder skeleton shared by GLM's MoE models; the attention is a separate
 * function it calls, chosen by the layer's attn_kind: glm4_moe's grouped-query attention (here),
 * glm4_moe_lite's multi-head latent attention (mla_attention.c), or glm_moe_dsa's MLA over the
 * top-k its sparse-attention indexer picks (mla_attention.c with dsa_indexer.c). Built with
 * localglm/layers/native/layer_ops.c (the per-token ops it calls, the structs in layer_ops.h) into
 * the library localglm/layers/native.py loads, linked against quant's kernels (lg_matvec,
 * lg_mat_rows, lg_swiglu_vec, lg_moe: quant/native/lg_kernels.h).
 */
#include "layer_ops.h"

/* y = m . x for T rows of floats (x [T, m->k], y [T, m->n]), each row exactly lg_matvec's, whatever T:
 * lg_mat_rows for a caller outside the layer (the lm_head: a speculative verification's logits are
 * then a decode step's bit for bit). Returns 0, or -1 when out of memory. */
int lg_rows_linear(const lg_mat *m, int T, const float *x, int dt, float *y, int nth) {
    qact xa = {0};
    if ((m->kind == LG_MAT_Q || m->kind == LG_MAT_STACK) && !lg_qact_alloc(&xa, 1, (m->k + QB - 1) / QB * QB)) return -1;
    const int rc = lg_mat_rows(m, T, x, dt, &xa, y, nth);
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
    if (lg_mat_rows(gate_up, T, h, dt, xa, g, nth)) return -1;
    for (int t = 0; t < T; t++)
        for (int j = 0; j < I; j++) a[(size_t)t * I + j] = rnd(rnd(silu(g[(size_t)t * 2 * I + j]), dt) * g[(size_t)t * 2 * I + I + j], dt);
    return lg_mat_rows(down, T, a, dt, xa, out, nth);
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
 * values, its selection at sel + t * sel_stride int32s; picks_end: the keys of the rows DSA's top-k ties
 * are broken over (a prompt chunk's end; 0: each token's own, as a decode step's; dsa_indexer.c). */
typedef struct {
    const void *cos, *sin;
    long rot_stride;
    lg_selection *sel;
    long sel_stride;
    int picks_end;
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
    if (L->attn_kind != LG_ATTN_GQA) {
        if (T == 1) return lg_mla_scratch(L);
        return (size_t)T * mla_rows(L) + lg_mla_tokens_scratch(L, T);
    }
    return (size_t)T * ((size_t)(L->heads + 2 * L->kv_heads) * L->hd + (size_t)L->heads * L->hd) + (size_t)L->hd;
}

/* The layer's attention of T tokens at pos.. on their normed hidden states hn [T, hidden], into
 * o [T, hidden], each token attending up to itself (GQA's lg_attend_tokens, MLA's lg_mla_tokens: together where
 * no DSA pick applies, each over its own picks past a DSA layer's top-k), the projections (GQA's q/k/v and o,
 * MLA's q_a, q_b, kv_a and o) for every token at once; a DSA full layer's pick lands in that
 * token's selection. `scratch` holds attn_scratch(L, T) floats. Returns 0, or -1 when out of memory. */
static int attention(const lg_layer *L, int T, const float *hn, const token_rows *R, void *k_cache, void *v_cache, long stride_head,
                     long stride_pos, int pos, void *index_keys, qact *xa, float *scratch, float *o, int nth) {
    const int dt = L->dtype;
    if (L->attn_kind != LG_ATTN_GQA && T == 1)
        return lg_mla_attention(L, hn, R->cos, R->sin, k_cache, stride_pos, pos, index_keys, sel_at(R, 0), xa, scratch, o, nth);
    if (L->attn_kind != LG_ATTN_GQA) { /* the projections for every token at once, then lg_mla_tokens */
        const lg_mla *M = L->mla;
        const int qn = L->heads * (M->nope + M->rope), row = M->kv_lora + M->rope, vn = L->heads * M->v;
        float *qa = scratch, *q = qa + (size_t)T * M->q_lora, *kv = q + (size_t)T * qn, *ov = kv + (size_t)T * row, *rest = ov + (size_t)T * vn;
        if (M->q_lora) {
            if (lg_mat_rows(&M->q_a, T, hn, dt, xa, qa, nth)) return -1;
            for (int t = 0; t < T; t++) lg_norm_row(qa + (size_t)t * M->q_lora, M->q_lora, M->q_a_norm, dt, M->latent_eps, qa + (size_t)t * M->q_lora);
        }
        if (lg_mat_rows(&M->q_b, T, M->q_lora ? qa : hn, dt, xa, q, nth) || lg_mat_rows(&M->kv_a, T, hn, dt, xa, kv, nth)) return -1;
        if (lg_mla_tokens(L, T, hn, qa, q, kv, R->cos, R->sin, R->rot_stride, k_cache, stride_pos, pos, index_keys, R->sel, R->sel_stride, R->picks_end, xa, rest, ov,
                          nth))
            return -1;
        return lg_mat_rows(&L->o, T, ov, dt, xa, o, nth);
    }
    const int nq = L->heads * L->hd, row = nq + 2 * L->kv_heads * L->hd;
    float *qkv = scratch, *att = qkv + (size_t)T * row, *tmp = att + (size_t)T * nq;
    if (lg_mat_rows(&L->qkv, T, hn, dt, xa, qkv, nth)) return -1;
    /* Every token's k and v go to the cache first: token t reads positions up to pos + t only, which the
     * later tokens' rows do not touch. Then one call attends for all of them (lg_attend_tokens: each
     * cached row converted once for the tokens, not once a token; the numbers are one-token calls'). */
    for (int t = 0; t < T; t++)
        gqa_prepare(L, qkv + (size_t)t * row, row_at(R->cos, dt, R->rot_stride, t), row_at(R->sin, dt, R->rot_stride, t), k_cache, v_cache,
                    stride_head, stride_pos, pos + t, tmp);
    const float scale = (float)(1.0 / sqrt((double)L->hd));
    const int rc = lg_attend_tokens(qkv, row, k_cache, v_cache, dt, L->heads, L->kv_heads, pos + 1, T, L->hd, stride_head, stride_pos, scale, att, nq, nth);
    if (rc) return rc;
    return lg_mat_rows(&L->o, T, att, dt, xa, o, nth);
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
 * selections sel_stride int32s apart (each with room for a count and the top-k), their ties as over
 * rows of picks_end keys (token_rows). For a backend that runs the routed experts itself between the layers. */
int lg_decode_layer(const lg_layer *L, int T, void *x, const void *add_a, const void *add_b, const void *cos, const void *sin, long rot_stride,
                    void *k_cache, void *v_cache, long stride_head, long stride_pos, int pos, void *index_keys, lg_selection *sel, long sel_stride,
                    int picks_end, void *h_out, int64_t *ids, float *wts, void *mlp_out, const lg_experts *ex, void *routed_out, int nth) {
    const token_rows R = {cos, sin, rot_stride, sel, sel_stride, picks_end};
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
                     long sel_stride, int picks_end, const lg_experts *experts, int nth) {
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
    const token_rows R = {cos, sin, rot_stride, sel, sel_stride, picks_end};
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
