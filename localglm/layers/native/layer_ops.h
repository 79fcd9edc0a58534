/* The model side's native library: what its files share.
 *
 * layer_ops.c holds the per-token layer ops (RMSNorm, RoPE, decode attention, the GLM router, the
 * residual add), callable alone from localglm/layers/ and used by the fused decoder layer in
 * localglm/models/native/decode_layer.c, which calls one attention function per kind (its own
 * grouped-query attention, and multi-head latent attention in mla_attention.c beside it, with
 * GLM-5's sparse-attention indexer in dsa_indexer.c). All are built into one library
 * (localglm/layers/native.py) linked against quant's kernels, whose interface is
 * quant/native/lg_kernels.h.
 *
 * The structs below are mirrored by ctypes (localglm/layers/native.py: LgLayer, LgMla, LgDsa,
 * LgExperts); lg_layers_sizeof lets the loader check that the two agree.
 */
#ifndef LG_LAYER_OPS_H
#define LG_LAYER_OPS_H

#include "lg_kernels.h"

/* Shared between this library's files, not exported: the ctypes entry points are its only ABI. */
#define LG_HIDDEN __attribute__((visibility("hidden")))

/* The attention kinds of lg_layer.attn_kind: GQA (glm4_moe), MLA (glm4_moe_lite), and MLA over the
 * DSA indexer's top-k (glm_moe_dsa: a layer with `dsa` runs the indexer, one without reuses the
 * selection of the last layer that ran it). */
enum { LG_ATTN_GQA = 0, LG_ATTN_MLA = 1, LG_ATTN_DSA = 2 };

/* A layer's multi-head latent attention (glm4_moe_lite; localglm/layers/mla.py's MLAWeights /
 * MLAShape): the projections, the latent norms, and kv_b split per head as the absorbed decode
 * folds it into the query (W_UK) and the output (W_UV). */
typedef struct {
    int32_t q_lora; /* 0: q_b is q_proj, straight from the hidden state (q_a, q_a_norm unused) */
    int32_t kv_lora, nope, rope, v;
    int32_t interleave; /* 1: rope dims rotate in interleaved pairs (output de-interleaved); 0: NeoX halves */
    float latent_eps, scale;
    const void *q_a_norm, *kv_a_norm; /* dtype [q_lora], [kv_lora] */
    const void *w_uk, *w_uv;          /* dtype: head h's [nope, kv_lora] / [v, kv_lora] at h * head_stride values, rows kv_lora apart */
    int64_t head_stride;
    lg_mat q_a, q_b, kv_a; /* q_a and kv_a with their biases (attention_bias) */
} lg_mla;

/* A "full" layer's DSA lightning indexer (glm_moe_dsa; localglm/layers/dsa.py's IndexerWeights /
 * IndexerShape): its key of a token is LayerNorm(wk(x)) (with bias, eps 1e-6) with interleaved RoPE
 * on the first `rope` dims; its score of key s is sum_h w_h * relu(q_h . k_s * head_dim^-1/2) with
 * q = wq_b(query latent) per head (roped alike) and w = weights_proj(x) (fp32) * heads^-1/2. */
typedef struct {
    int32_t heads, head_dim, rope, topk;
    const void *k_norm, *k_norm_bias; /* dtype [head_dim] */
    lg_mat wq_b, wk;                  /* [heads * head_dim, q_lora], [head_dim, hidden] */
    lg_mat weights_proj;              /* fp32 dense [heads, hidden] */
} lg_dsa;

/* The top-k a DSA layer attends to: n (0: every position, the context fits the top-k), then n
 * cached positions in ascending order. A full layer writes it; the shared layers after it read it. */
typedef struct {
    int32_t n;
    int32_t pos[];
} lg_selection;

/* One decoder layer as lg_decode_layer reads it. The attention is of kind attn_kind: GQA reads
 * heads, kv_heads, hd, rot, q_norm, k_norm and qkv; MLA and DSA read heads and *mla (rot: its rope
 * dims), DSA also *dsa (NULL on a shared layer); all end in o (o_proj, with its bias). */
typedef struct {
    int32_t hidden, heads, kv_heads, hd, rot, dtype;
    float eps;
    int32_t moe;     /* 1: router (+ shared experts); 0: dense MLP */
    int32_t has_mlp; /* the dense MLP, or the shared experts of a MoE layer */
    int32_t n_experts, top_k, n_group, topk_group, norm_topk;
    float scaling;
    const void *input_norm, *post_norm, *q_norm, *k_norm; /* dtype; q/k norm NULL when absent */
    const float *router_w, *router_bias;                   /* fp32 [E, hidden], [E] */
    lg_mat qkv, o, gate_up, down;
    int32_t attn_kind; /* LG_ATTN_GQA / LG_ATTN_MLA / LG_ATTN_DSA */
    const lg_mla *mla; /* MLA's and DSA's weights and shapes, else NULL */
    const lg_dsa *dsa; /* DSA: the indexer of a full layer; NULL on a shared layer and for other kinds */
} lg_layer;

/* A MoE layer's routed experts for the fused decode: quantized tables (lg_moe's) or lg_mat ones
 * (one per expert: dense, or GGUF blocks as stored), n_experts of each. All NULL: the caller runs
 * the experts. fp32: the d_ tables' experts compute in fp32 and their weighted outputs are summed
 * unrounded (GGUF blocks: quant/blob.py PreparedExpert's numbers); else in the model dtype
 * (dense experts: expert_swiglu's). */
typedef struct {
    const lg_qtensor *q_gate_up, *q_down;
    const lg_mat *d_gate_up, *d_down;
    int32_t inter, fp32;
} lg_experts;

/* RMSNorm of one float row (values already of the dtype) into out, rounded as transformers rounds. */
LG_HIDDEN void lg_norm_row(const float *x, int n, const void *weight, int dtype, float eps, float *out);

/* Rotary embedding of one row in place (the first `rot` dims, halves paired); tmp holds rot floats. */
LG_HIDDEN void lg_rope_row(float *x, int rot, const void *cos, const void *sin, int dtype, float *tmp);

/* Rotary embedding of x's first `rot` dims into out (not in place): halves paired (NeoX), or
 * interleaved pairs with the result de-interleaved (layers/rope.py apply_rope_interleaved). */
LG_HIDDEN void lg_rope_into(const float *x, float *out, int rot, const void *cos, const void *sin, int dtype, int interleaved);

/* One query token (q [heads, hk] floats) against `len` cached positions (keys of hk values, values
 * of hv): positions 0..len-1, or idx[0..len) when idx is not NULL -> out [heads, hv] floats of dtype
 * values. Returns 0, or -1 when out of memory. */
LG_HIDDEN int lg_attend(const float *q, const void *k, const void *v, int dtype, int heads, int kv_heads, int len, const int32_t *idx,
                        int hk, int hv, long stride_head, long stride_pos, float scale, float *out, int nth);

/* lg_attend for MLA's latent rows (one kv head; keys the whole row of hk values, values its first hv): with
 * bf16 rows and AVX512-BF16, q . k runs on the cached rows as they are by vdpbf16ps (exact products,
 * fp32 sums, no conversion of the rows; q holds bf16 values: the latent-space query is rounded to the
 * dtype), twice lg_attend's fp32 products a cycle; softmax and p v as lg_attend's. Every MLA attention of
 * one token, torch's decode op and the fused decoder alike, comes here, so they keep one order. */
LG_HIDDEN int lg_attend_latent(const float *q, const void *rows, int dtype, int heads, int len, const int32_t *idx, int hk, int hv,
                               long stride_pos, float scale, float *out, int nth);

/* lg_attend for T consecutive query tokens of one sequence: token t (q at q + t * q_stride, out at out +
 * t * o_stride) attends positions 0..len0 + t - 1, each token's numbers lg_attend's. Returns 0, or -1
 * when out of memory. */
LG_HIDDEN int lg_attend_tokens(const float *q, long q_stride, const void *k, const void *v, int dtype, int heads, int kv_heads, int len0, int T,
                               int hd, long stride_head, long stride_pos, float scale, float *out, long o_stride, int nth);

/* lg_attend_tokens on MLA's latent rows (lg_attend_latent's q . k): token t (q at q + t * q_stride, heads
 * of hk values; out at out + t * o_stride, heads of hv) attends rows 0..len0 + t - 1, each token's numbers
 * lg_attend_latent's. Returns 0, or -1 when out of memory. */
LG_HIDDEN int lg_attend_latent_tokens(const float *q, long q_stride, const void *rows, int dtype, int heads, int len0, int T, int hk, int hv,
                                      long stride_pos, float scale, float *out, long o_stride, int nth);

/* Floats of scratch lg_mla_attention takes for layer L. */
LG_HIDDEN size_t lg_mla_scratch(const lg_layer *L);

/* MLA of T consecutive tokens after their projections (mla_attention.c; qa = norm(q_a(hn)), q = q_b(qa) or
 * q_proj(hn), kv = kv_a(hn), each row as lg_matvec gives it): RoPE, the latent norm, the rows written at
 * pos.., DSA's picks on a full layer, the absorbed attention into ov [T, heads * v], before o_proj; and its
 * scratch floats. */
LG_HIDDEN int lg_mla_tokens(const lg_layer *L, int T, const float *hn, const float *qa, float *q, float *kv, const void *cos, const void *sin, long rot_stride,
                            void *rows, long stride_pos, int pos, void *index_keys, void *sel, long sel_stride, int picks_end, qact *xa,
                            float *scratch, float *ov, int nth);
LG_HIDDEN size_t lg_mla_tokens_scratch(const lg_layer *L, int T);

/* Multi-head latent attention of one token at `pos` (mla_attention.c): hn -> o [hidden], this
 * token's latent row written to `rows` (position t at t * stride_pos). A DSA layer attends to
 * `sel`'s positions, after writing them first on a full layer (its indexer key goes to
 * index_keys [T, head_dim]). */
LG_HIDDEN int lg_mla_attention(const lg_layer *L, const float *hn, const void *cos, const void *sin, void *rows, long stride_pos, int pos,
                               void *index_keys, lg_selection *sel, qact *xa, float *scratch, float *o, int nth);

/* The DSA indexer's keys of T consecutive tokens hn [T, hidden] (dsa_indexer.c; rotary rows token t's at t * rot_stride
 * values) into out [T, head_dim] of dtype, wk read once for them. Returns 0, or -1 when out of memory. */
LG_HIDDEN int lg_dsa_keys(const lg_dsa *D, int T, const float *hn, int dtype, const void *cos, const void *sin, long rot_stride, qact *xa,
                          void *out, int nth);

/* The DSA indexer's top-k of T consecutive tokens (hn [T, hidden], query latents q_res [T, q_lora]; token t over keys
 * 0..len0 + t - 1 of [len, head_dim] dtype, its pick at sel + t * sel_stride int32s), chosen as torch.topk chooses over
 * rows of max(len0 + t, picks_end) keys; wq_b and weights_proj read once for them. Returns 0, or -1 when out of memory. */
LG_HIDDEN int lg_dsa_select_tokens(const lg_dsa *D, int T, const float *hn, const float *q_res, int dtype, const void *cos, const void *sin,
                                   long rot_stride, const void *keys, int len0, int picks_end, qact *xa, void *sel, long sel_stride, int nth);

#define AB 8 /* cache positions per attention / scoring block */

#ifdef __AVX2__
/* The sums of eight vectors' lanes, as one vector (lane j = sum of v[j]). */
static inline __m256 hsum8x8(const __m256 *v) {
    const __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
    const __m256 c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
    const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d); /* [0 1 2 3 | 0 1 2 3], [4 5 6 7 | 4 5 6 7] */
    const __m256 lo = _mm256_permute2f128_ps(ab, cd, 0x20), hi = _mm256_permute2f128_ps(ab, cd, 0x31);
    return _mm256_add_ps(lo, hi);
}
#endif

/* s[j] = q . rows[j] for AB rows of hd floats (rows contiguous): one horizontal reduction per block,
 * not per dot. Each row's sum has the same order wherever it sits in the block. */
static inline void dot_block(const float *q, const float *rows, int hd, float *s) {
#ifdef __AVX2__
    if (hd % 8 == 0) {
        __m256 acc[AB];
        for (int j = 0; j < AB; j++) acc[j] = _mm256_setzero_ps();
        for (int i = 0; i < hd; i += 8) {
            const __m256 qv = _mm256_loadu_ps(q + i);
            for (int j = 0; j < AB; j++) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows + (size_t)j * hd + i), acc[j]);
        }
        _mm256_storeu_ps(s, hsum8x8(acc));
        return;
    }
#endif
    for (int j = 0; j < AB; j++) s[j] = dotf(q, rows + (size_t)j * hd, hd);
}

#ifdef LG_DPBF16
/* dot_block on bf16 rows as cached (rows[j]: AB row pointers) and a bf16 query, by vdpbf16ps: 32 exact
 * products an instruction summed in fp32, no conversion of the rows; hd a multiple of 32. Each row's sum
 * has one order (its lanes, then hsum8x8 of the halves' sum) wherever it sits in the block. */
static inline void dot_block_bh(const uint16_t *q, const uint16_t *const *rows, int hd, float *s) {
    __m512 acc[AB];
    for (int j = 0; j < AB; j++) acc[j] = _mm512_setzero_ps();
    for (int i = 0; i < hd; i += 32) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512((const void *)(q + i));
        for (int j = 0; j < AB; j++) acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512((const void *)(rows[j] + i)), qv);
    }
    __m256 half[AB];
    for (int j = 0; j < AB; j++) half[j] = _mm256_add_ps(_mm512_castps512_ps256(acc[j]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[j]), 1)));
    _mm256_storeu_ps(s, hsum8x8(half));
}
#endif

/* The router of MoE layer L on the normed hidden state h: ids / wts [top_k]; sc holds 2E floats. */
LG_HIDDEN void lg_route(const lg_layer *L, const float *h, float *sc, int64_t *ids, float *wts, int nth);

/* Element i of a MoE layer's output: routed + shared (rounded to dtype), or routed alone without shared. */
static inline float moe_output(const void *routed, const void *shared, int dtype, size_t i) {
    return shared ? rnd(load_val(routed, dtype, i) + load_val(shared, dtype, i), dtype) : load_val(routed, dtype, i);
}

#endif
