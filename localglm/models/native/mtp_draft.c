/* GLM's MTP block as a drafter in one native call (localglm/models/fused_mtp.py): the block's input
 * (eh_proj over the normed embedding of the next token and the normed previous stream), its decoder
 * layer (lg_decode_layers, with the block's own cache), and, for greedy drafting, shared_head.norm,
 * the head's rows (the whole head or a draft vocabulary's) and their argmax, chained `depth` times.
 *
 * Why: on a small model a draft step through Python was ~15 small torch ops and ctypes calls around
 * the one fused layer call (embedding, two norms, a concatenation, eh_proj, the layer, the head's
 * norm, its product, a finiteness check, an argmax), which cost about as much as the arithmetic.
 *
 * Each step is the numbers of the Python path (models/mtp.py MtpHead.forward / greedy) bit for bit:
 * the norms are lg_rms_norm's rows (lg_norm_row, rounded to the dtype), eh_proj and the head go
 * through lg_rows_linear (the rows' numbers lg_mat_rows' whatever their count, as RowsProduct), the
 * layer through lg_decode_layers, and the argmax takes the first maximum (torch.argmax's tie rule).
 */
#include <math.h>

#include "layer_ops.h"

int lg_rows_linear(const lg_mat *m, int T, const float *x, int dt, float *y, int nth);
int lg_decode_layers(const lg_layer *layers, int n, int T, void *x, const void *cos, const void *sin, long rot_stride, void *k_base, void *v_base,
                     long stride_layer, long stride_head, long stride_pos, int pos, void *index_base, long index_stride, lg_selection *sel,
                     long sel_stride, int picks_end, const lg_experts *experts, int nth);

/* The MTP block's own tensors (models/mtp.py MtpWeights) and its head as the drafter scores it. */
typedef struct {
    int32_t hidden, dtype; /* dtype: 0 fp32, 1 bf16 (the block's, its streams' and its cache's) */
    float eps;
    const void *embed;             /* [vocab, hidden] dtype: the block's embedding (or the main one) */
    const void *enorm, *hnorm;     /* [hidden] dtype */
    const void *head_norm;         /* shared_head.norm [hidden] dtype */
    lg_mat eh;                     /* eh_proj [hidden, 2 hidden] */
    lg_mat head;                   /* the rows scored when drafting: the whole head or a draft vocabulary's */
    const int64_t *vocab;          /* head row r scores token vocab[r] (ascending); NULL: token r */
} lg_mtp;

/* The block's decoder layers and cache as lg_decode_layers reads them (rotary rows of position p at
 * cos / sin + p * rot_stride values). */
typedef struct {
    const lg_layer *layers;
    int32_t n;
    const lg_experts *experts;
    const void *cos, *sin;
    long rot_stride;
    void *k_base, *v_base;
    long stride_layer, stride_head, stride_pos;
    void *index_base;
    long index_stride;
    lg_selection *sel;
    long sel_stride;
} lg_mtp_block;

size_t lg_mtp_sizeof(int which) { return which == 0 ? sizeof(lg_mtp) : which == 1 ? sizeof(lg_mtp_block) : 0; }

static inline size_t esize(int dt) { return dt == 1 ? 2 : 4; }

/* T (stream, next token) pairs through the block at positions pos..: x [T, hidden] (dtype) holds the
 * previous streams on entry (rows may alias `prev` only when prev == x) and the block's output
 * streams on return. `buf` holds 3 hidden floats + T * 3 hidden floats. */
static int block_forward(const lg_mtp *M, const lg_mtp_block *B, int T, const void *prev, const int64_t *next, int pos, void *x, float *buf,
                         int nth) {
    const int H = M->hidden, dt = M->dtype;
    float *row = buf, *cat = buf + H, *y = cat + (size_t)T * 2 * H;
    for (int t = 0; t < T; t++) {
        float *c = cat + (size_t)t * 2 * H;
        load_row(M->embed, dt, (size_t)next[t] * H, H, row);
        lg_norm_row(row, H, M->enorm, dt, M->eps, c); /* the embedding first, then the stream */
        load_row(prev, dt, (size_t)t * H, H, row);
        lg_norm_row(row, H, M->hnorm, dt, M->eps, c + H);
    }
    if (lg_rows_linear(&M->eh, T, cat, dt, y, nth)) return -1;
    for (size_t i = 0; i < (size_t)T * H; i++) store(x, dt, i, y[i]);
    const size_t rot = (size_t)pos * (size_t)B->rot_stride * esize(dt);
    return lg_decode_layers(B->layers, B->n, T, x, (const char *)B->cos + rot, (const char *)B->sin + rot, B->rot_stride, B->k_base, B->v_base,
                            B->stride_layer, B->stride_head, B->stride_pos, pos, B->index_base, B->index_stride, B->sel, B->sel_stride, pos + T,
                            B->experts, nth);
}

/* The greedy draft from one output stream s [hidden] (dtype): the argmax of the head's rows over
 * shared_head.norm(s), the first maximum; -2 where the scores hold a NaN or +inf or are all -inf
 * (the caller's check_finite says which), -1 when out of memory. `buf`: 2 hidden + head rows floats. */
static int64_t greedy(const lg_mtp *M, const void *s, float *buf, int nth) {
    const int H = M->hidden, dt = M->dtype, N = M->head.n;
    float *row = buf, *normed = buf + H, *sc = buf + 2 * H;
    load_row(s, dt, 0, H, row);
    lg_norm_row(row, H, M->head_norm, dt, M->eps, normed);
    if (lg_rows_linear(&M->head, 1, normed, dt, sc, nth)) return -1;
    int best = 0, bad = 0;
    for (int r = 0; r < N; r++) {
        bad |= isnan(sc[r]);
        if (sc[r] > sc[best]) best = r;
    }
    if (bad || !isfinite(sc[best])) return -2;
    return M->vocab ? M->vocab[best] : best;
}

/* Catch the block up on T pending (stream, token) pairs at positions pos.. (prev [T, hidden] dtype,
 * next [T]), then draft `depth` tokens greedily, chaining the block's own output stream: drafts[j]
 * is the argmax from stream j, and after each draft but the last the block runs (stream j, drafts[j])
 * at the next position. streams [T + max(depth - 1, 0), hidden] (dtype) gets the catch-up's output
 * streams, then each chained call's; with depth 0 this is the block's forward alone. Returns 0, -1
 * when out of memory, or -2 when a draft's scores were not finite (drafts before it are written;
 * `*made` says how many drafts were made either way). */
int lg_mtp_draft(const lg_mtp *M, const lg_mtp_block *B, int T, const void *prev, const int64_t *next, int pos, int depth, int64_t *drafts,
                 void *streams, int *made, int nth) {
    const int H = M->hidden, dt = M->dtype;
    const size_t need = (size_t)3 * H + (size_t)(T > 1 ? T : 1) * 3 * H, head = (size_t)2 * H + (size_t)M->head.n;
    float *buf = malloc((need > head ? need : head) * sizeof(float));
    *made = 0;
    if (!buf) return -1;
    if (streams != prev) memcpy(streams, prev, (size_t)T * H * esize(dt));
    int rc = block_forward(M, B, T, streams, next, pos, streams, buf, nth);
    for (int j = 0; j < depth && rc == 0; j++) {
        char *s = (char *)streams + (size_t)(T - 1 + j) * H * esize(dt);
        const int64_t d = greedy(M, s, buf, nth);
        if (d < 0) {
            rc = (int)d;
            break;
        }
        drafts[j] = d;
        *made = j + 1;
        if (j + 1 < depth) {
            memcpy(s + (size_t)H * esize(dt), s, (size_t)H * esize(dt));
            rc = block_forward(M, B, 1, s + (size_t)H * esize(dt), &drafts[j], pos + T + j, s + (size_t)H * esize(dt), buf, nth);
        }
    }
    free(buf);
    return rc;
}
