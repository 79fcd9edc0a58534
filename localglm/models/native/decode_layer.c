/* The fused GLM MoE decoder layer: one token through one decoder layer (pre-norm attention, then a
 * dense SwiGLU MLP or the MoE's router, shared experts and, where they sit in RAM, routed experts)
 * in one call, and every layer of a token in one call. Why: a decode step through torch is ~60
 * small ops per layer at ~6 us each; on the CPU that overhead, not the arithmetic, was most of a
 * token. The math and its rounding points are localglm/layers/'s torch ops' (norm, rope,
 * attention, router, mlp, experts); quantized products are exactly quant's lg_linear's.
 *
 * The layer is the decoder skeleton shared by GLM's MoE models; the attention is a separate
 * function it calls, chosen by the layer's attn_kind: glm4_moe's grouped-query attention (here),
 * glm4_moe_lite's multi-head latent attention (mla_attention.c), or glm_moe_dsa's MLA over the
 * top-k its sparse-attention indexer picks (mla_attention.c with dsa_indexer.c). Built with
 * localglm/layers/native/layer_ops.c (the per-token ops it calls, the structs in layer_ops.h) into
 * the library localglm/layers/native.py loads, linked against quant's kernels (lg_matvec,
 * lg_swiglu_vec, lg_moe: quant/native/lg_kernels.h).
 */
#include "layer_ops.h"

/* The layer's SwiGLU MLP: the dense MLP, or a MoE layer's shared experts. */
static void mlp_vec(const lg_layer *L, const float *h, qact *xa, float *g, float *out, int nth) {
    lg_swiglu_vec(&L->gate_up, &L->down, L->dtype, h, xa, g, out, nth);
}

/* Floats of scratch gqa_attention takes: q, k, v, the attention output, one head. */
static size_t gqa_scratch(const lg_layer *L) {
    const size_t nq = (size_t)L->heads * L->hd, nkv = (size_t)L->kv_heads * L->hd;
    return nq * 2 + nkv * 2 + (size_t)L->hd;
}

/* glm4_moe's grouped-query attention for one token at `pos`: hn (the input-normed hidden state,
 * floats of dtype values) -> q/k/v, q/k norm, RoPE, this token's k and v written to the cache,
 * attention over positions [0, pos], o_proj into o [hidden] (not yet added to the residual).
 * `xa` has room for one quantized row of hidden and of heads * hd. Returns 0, or -1 when out of memory. */
static int gqa_attention(const lg_layer *L, const float *hn, const void *cos, const void *sin, void *k_cache, void *v_cache,
                         long stride_head, long stride_pos, int pos, qact *xa, float *scratch, float *o, int nth) {
    const int hd = L->hd, dt = L->dtype, nq = L->heads * hd, nkv = L->kv_heads * hd;
    float *qkv = scratch, *att = qkv + nq + 2 * nkv, *tmp = att + nq;
    lg_matvec(&L->qkv, hn, dt, xa, qkv, nth);
    float *q = qkv, *k = qkv + nq, *v = k + nkv;
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
    const int rc = lg_attend(q, k_cache, v_cache, dt, L->heads, L->kv_heads, pos + 1, NULL, hd, hd, stride_head, stride_pos, (float)(1.0 / sqrt((double)hd)), att, nth);
    if (rc == 0) lg_matvec(&L->o, att, dt, xa, o, nth);
    return rc;
}

/* The layer's attention on the normed hidden state hn, into o [hidden]; `scratch` holds attn_scratch(L) floats. */
static int attention(const lg_layer *L, const float *hn, const void *cos, const void *sin, void *k_cache, void *v_cache,
                     long stride_head, long stride_pos, int pos, void *index_keys, lg_selection *sel, qact *xa, float *scratch, float *o,
                     int nth) {
    if (L->attn_kind != LG_ATTN_GQA) return lg_mla_attention(L, hn, cos, sin, k_cache, stride_pos, pos, index_keys, sel, xa, scratch, o, nth);
    return gqa_attention(L, hn, cos, sin, k_cache, v_cache, stride_head, stride_pos, pos, xa, scratch, o, nth);
}

static size_t attn_scratch(const lg_layer *L) { return L->attn_kind != LG_ATTN_GQA ? lg_mla_scratch(L) : gqa_scratch(L); }

/* One token through layer L at position `pos`. x [hidden] (dtype) is the residual stream, updated
 * in place; add_a / add_b (or NULL) are the previous MoE layer's routed and shared outputs, added
 * first. cos / sin [rot] (dtype) are this position's rotary table. k_cache / v_cache point at this
 * layer's cache (kv head g, position t at g * stride_head + t * stride_pos, dtype); this token's
 * k and v are written at pos. MLA's cache is one row a position, k_cache (latent | rope key at
 * t * stride_pos); v_cache is NULL. A DSA layer also takes `sel`, the top-k shared by the layers of
 * one token (a full layer writes it, the shared ones after it read it), and a full one its
 * indexer-key cache index_keys ([T, index_head_dim], dtype; NULL otherwise). A dense layer finishes its MLP here; a MoE layer writes the
 * post-attention normed hidden state h_out (dtype), the routing (ids int64 / wts fp32 [top_k]) and,
 * with shared experts, their output mlp_out (dtype), and leaves the routed experts to the caller --
 * unless it passes them in `ex` (quantized or dense tables), then they run here too (into
 * routed_out, dtype) and x comes back with the whole layer added. Dense experts are summed as
 * localglm.layers.experts.combine_experts sums one token's: in fp32, in expert order, each product
 * rounded to the dtype first. Returns 0, or -1 when out of memory. */
int lg_decode_layer(const lg_layer *L, void *x, const void *add_a, const void *add_b, const void *cos, const void *sin,
                    void *k_cache, void *v_cache, long stride_head, long stride_pos, int pos, void *index_keys, lg_selection *sel,
                    void *h_out, int64_t *ids, float *wts, void *mlp_out, const lg_experts *ex, void *routed_out, int nth) {
    const int H = L->hidden, dt = L->dtype;
    const int dense_ex = L->moe && ex && ex->d_gate_up, E = L->moe ? L->n_experts : 0;
    int inter2 = L->has_mlp ? L->gate_up.n : 0;
    if (dense_ex && 2 * ex->inter > inter2) inter2 = 2 * ex->inter;
    int kmax = H > L->o.k ? H : L->o.k; /* the widest quantized input: hidden, o_proj's, MLA's q_b's or the MLP's down */
    if (L->attn_kind != LG_ATTN_GQA && L->mla->q_b.k > kmax) kmax = L->mla->q_b.k; /* DSA's wq_b reads the same q latent */
    if (L->has_mlp && L->down.k > kmax) kmax = L->down.k;
    const size_t nf = (size_t)H * 5 + (size_t)inter2 + 2 * (size_t)E + attn_scratch(L);
    float *buf = malloc(nf * sizeof(float));
    qact xa = {0};
    if (!buf || !lg_qact_alloc(&xa, 1, (kmax + QB - 1) / QB * QB)) {
        free(buf);
        lg_qact_free(&xa);
        return -1;
    }
    float *xf = buf, *hn = xf + H, *o = hn + H, *mo = o + H, *ye = mo + H; /* ye: one routed expert's output */
    float *g = ye + H, *sc = g + inter2, *att_scratch = sc + 2 * E;
    load_row(x, dt, 0, H, xf);
    if (add_a)
        for (int i = 0; i < H; i++) xf[i] = rnd(xf[i] + moe_output(add_a, add_b, dt, i), dt);
    lg_norm_row(xf, H, L->input_norm, dt, L->eps, hn);
    int rc = attention(L, hn, cos, sin, k_cache, v_cache, stride_head, stride_pos, pos, index_keys, sel, &xa, att_scratch, o, nth);
    if (rc == 0) {
        for (int i = 0; i < H; i++) xf[i] = rnd(xf[i] + o[i], dt);
        /* feed-forward */
        lg_norm_row(xf, H, L->post_norm, dt, L->eps, hn);
        if (!L->moe) {
            mlp_vec(L, hn, &xa, g, mo, nth);
            for (int i = 0; i < H; i++) xf[i] = rnd(xf[i] + mo[i], dt);
        } else {
            for (int i = 0; i < H; i++) store(h_out, dt, i, hn[i]);
            lg_route(L, hn, sc, ids, wts, nth);
            if (L->has_mlp) {
                mlp_vec(L, hn, &xa, g, mo, nth);
                for (int i = 0; i < H; i++) store(mlp_out, dt, i, mo[i]);
            }
            if (dense_ex) {
                const int kk = L->top_k;
                int ord[kk];
                for (int j = 0; j < kk; j++) ord[j] = j;
                for (int a = 1; a < kk; a++) /* the chosen experts in id order (insertion sort: k is small) */
                    for (int b = a; b > 0 && ids[ord[b]] < ids[ord[b - 1]]; b--) { const int t = ord[b]; ord[b] = ord[b - 1]; ord[b - 1] = t; }
                float *acc = o; /* o is free again: the routed sum */
                for (int i = 0; i < H; i++) acc[i] = 0.0f;
                for (int j = 0; j < kk; j++) {
                    const int e = (int)ids[ord[j]];
                    const float w = wts[ord[j]];
                    lg_swiglu_vec(&ex->d_gate_up[e], &ex->d_down[e], dt, hn, &xa, g, ye, nth);
                    for (int i = 0; i < H; i++) acc[i] += rnd(ye[i] * w, dt);
                }
                for (int i = 0; i < H; i++) store(routed_out, dt, i, acc[i]);
            } else if (ex && ex->q_gate_up) {
                rc = lg_moe(1, H, ex->inter, h_out, dt, L->top_k, ids, wts, ex->q_gate_up, ex->q_down, L->n_experts, routed_out, nth);
            }
            if (ex && (ex->d_gate_up || ex->q_gate_up)) {
                for (int i = 0; i < H && rc == 0; i++) {
                    const float r = load_val(routed_out, dt, i);
                    xf[i] = rnd(xf[i] + (L->has_mlp ? rnd(r + mo[i], dt) : r), dt);
                }
            }
        }
        for (int i = 0; i < H; i++) store(x, dt, i, xf[i]);
    }
    free(buf);
    lg_qact_free(&xa);
    return rc;
}

/* Every layer of one token in one call (layers[0..n)), for a model whose routed experts all sit in
 * RAM (experts[i]: layer i's tables, all NULL for a dense layer): no return to the caller between
 * layers. Layer i's cache is at k_base / v_base + i * stride_layer (v_base NULL for MLA). DSA's
 * indexer keys: the j-th full layer's at index_base + j * index_stride (DsaCache's slots are the
 * full layers in order); `sel` carries each full layer's pick to the shared layers after it.
 * Returns 0, or -1 when out of memory. */
int lg_decode_layers(const lg_layer *layers, int n, void *x, const void *cos, const void *sin, void *k_base, void *v_base,
                     long stride_layer, long stride_head, long stride_pos, int pos, void *index_base, long index_stride,
                     lg_selection *sel, const lg_experts *experts, int nth) {
    int H = 0, kmax = 0, es = 2;
    for (int i = 0; i < n; i++) {
        H = layers[i].hidden > H ? layers[i].hidden : H;
        kmax = layers[i].top_k > kmax ? layers[i].top_k : kmax;
        es = layers[i].dtype == 1 ? 2 : 4;
    }
    char *buf = malloc((size_t)H * es * 3 + (size_t)kmax * (sizeof(int64_t) + sizeof(float)));
    if (!buf) return -1;
    void *h = buf, *shared = buf + (size_t)H * es, *routed = buf + 2 * (size_t)H * es;
    int64_t *ids = (int64_t *)(buf + 3 * (size_t)H * es);
    float *wts = (float *)(ids + kmax);
    int rc = 0, slot = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        const size_t off = (size_t)i * (size_t)stride_layer * (size_t)es;
        void *keys = layers[i].dsa ? (char *)index_base + (size_t)slot++ * (size_t)index_stride * (size_t)es : NULL;
        rc = lg_decode_layer(&layers[i], x, NULL, NULL, cos, sin, (char *)k_base + off, v_base ? (char *)v_base + off : NULL, stride_head, stride_pos, pos,
                             keys, sel, h, ids, wts, shared, &experts[i], routed, nth);
    }
    free(buf);
    return rc;
}
