/* The model side's native library: what its two files share.
 *
 * layer_ops.c holds the per-token layer ops (RMSNorm, RoPE, decode attention, the GLM router, the
 * residual add), callable alone from localglm/layers/ and used by the fused decoder layer in
 * localglm/models/native/decode_layer.c. Both are built into one library (localglm/layers/native.py)
 * linked against quant's kernels, whose interface is quant/native/lg_kernels.h.
 *
 * The structs below are mirrored by ctypes (localglm/layers/native.py: LgLayer, LgExperts);
 * lg_layers_sizeof lets the loader check that the two agree.
 */
#ifndef LG_LAYER_OPS_H
#define LG_LAYER_OPS_H

#include "lg_kernels.h"

/* Shared between this library's files, not exported: the ctypes entry points are its only ABI. */
#define LG_HIDDEN __attribute__((visibility("hidden")))

/* One decoder layer as lg_decode_layer reads it. */
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
} lg_layer;

/* A MoE layer's routed experts for the fused decode: quantized tables (lg_moe's) or dense ones
 * (lg_mat per expert), n_experts of each. All NULL: the caller runs the experts. */
typedef struct {
    const lg_qtensor *q_gate_up, *q_down;
    const lg_mat *d_gate_up, *d_down;
    int32_t inter;
} lg_experts;

/* RMSNorm of one float row (values already of the dtype) into out, rounded as transformers rounds. */
LG_HIDDEN void lg_norm_row(const float *x, int n, const void *weight, int dtype, float eps, float *out);

/* Rotary embedding of one row in place (the first `rot` dims); tmp holds rot floats. */
LG_HIDDEN void lg_rope_row(float *x, int rot, const void *cos, const void *sin, int dtype, float *tmp);

/* One query token (q [heads, hd] floats) against the KV cache -> out [heads, hd] floats of dtype
 * values. Returns 0, or -1 when out of memory. */
LG_HIDDEN int lg_attend(const float *q, const void *k, const void *v, int dtype, int heads, int kv_heads, int len, int hd,
                        long stride_head, long stride_pos, float scale, float *out, int nth);

/* The router of MoE layer L on the normed hidden state h: ids / wts [top_k]; sc holds 2E floats. */
LG_HIDDEN void lg_route(const lg_layer *L, const float *h, float *sc, int64_t *ids, float *wts, int nth);

/* Element i of a MoE layer's output: routed + shared (rounded to dtype), or routed alone without shared. */
static inline float moe_output(const void *routed, const void *shared, int dtype, size_t i) {
    return shared ? rnd(load_val(routed, dtype, i) + load_val(shared, dtype, i), dtype) : load_val(routed, dtype, i);
}

#endif
