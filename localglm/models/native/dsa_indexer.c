/* GLM-5's DeepSeek-sparse-attention lightning indexer (glm_moe_dsa) for one decoded token: the
 * token's indexer key, its scores against every cached key, and the top-k positions that MLA then
 * attends to (mla_attention.c). Called by the fused decoder layer on a "full" layer and, alone
 * (lg_dsa_index_key, lg_dsa_topk), by localglm/layers/dsa.py's torch decode path, so both paths
 * cache the same keys and pick the same rows by construction.
 *
 * The math is dsa.py's (`indexer_keys`, `index_scores`), rounded where it rounds: wk(x), the
 * LayerNorm and the RoPE round to the dtype as torch's ops do; the scores are fp32 throughout,
 *     score(s) = sum_h w_h * relu(q_h . k_s * head_dim^-1/2),  w = weights_proj(x) (fp32) * heads^-1/2,
 * summed over heads in order for each key (torch's matmuls order their sums otherwise: the same
 * values to fp32 rounding, which is why torch's decode path calls this file rather than its own).
 *
 * The pick is torch.topk's (CPU, largest): not "the lower index first" -- torch runs libstdc++'s
 * std::partial_sort (heap select) when 64 k <= keys and std::nth_element (introselect) otherwise,
 * on (score, index) pairs compared by score alone, NaN first, so which of several equal scores are
 * kept depends on where the algorithm met them. `select_top` replays those algorithms step for step
 * (they are deterministic), so equal scores -- every key scoring exactly 0 once ReLU zeroes every
 * head is the case a model produces -- keep the positions torch would keep. The positions are then
 * handed to attention in ascending order.
 *
 * Which row torch ran topk on matters for those ties: one decoded token's holds the keys up to it;
 * a prompt chunk's (transformers' forward, dsa.py `select_topk`) holds every key up to the chunk's
 * end, the ones after the query masked to -inf, so the algorithms see a longer row. A chunk's query
 * therefore picks over a row padded to `picks_end` keys, and a speculative verification's over its
 * own keys only, as its one-token decode step would (picks_end 0).
 *
 * Work per token and full layer: heads * head_dim * (q_lora + 1) multiply-adds for the query and
 * heads * head_dim per cached key for the scores (the indexer's keys are read once, AB at a time).
 */
#include "layer_ops.h"

#define INDEX_KEY_NORM_EPS 1e-6f /* transformers' nn.LayerNorm(index_head_dim, eps=1e-6) */

/* LayerNorm with bias of n floats in fp32 (mean, then the mean of squared deviations, in double),
 * applied as torch's CPU kernel applies it, (x * rstd - mean * rstd) * w + b, rounded once to dtype. */
static void layer_norm(const float *x, int n, const void *w, const void *b, int dt, float eps, float *out) {
    double sum = 0.0, ss = 0.0;
    for (int i = 0; i < n; i++) sum += x[i];
    const double mean = sum / n;
    for (int i = 0; i < n; i++) ss += (x[i] - mean) * (x[i] - mean);
    const float rstd = 1.0f / sqrtf((float)(ss / n) + eps), shift = -rstd * (float)mean;
    for (int i = 0; i < n; i++) out[i] = rnd((x[i] * rstd + shift) * load_val(w, dt, i) + load_val(b, dt, i), dt);
}

/* Interleaved RoPE on the first `rope` of each of the `rows` rows of n floats of x, in place. */
static void rope_rows(float *x, int rows, int n, int rope, const void *cos, const void *sin, int dt) {
    float tmp[rope];
    for (int r = 0; r < rows; r++) {
        lg_rope_into(x + (size_t)r * n, tmp, rope, cos, sin, dt, 1);
        memcpy(x + (size_t)r * n, tmp, (size_t)rope * sizeof(float));
    }
}

/* A key row k [head_dim] (wk's output) normed, roped and stored at out (dtype). */
static void finish_key(const lg_dsa *D, float *k, int dt, const void *cos, const void *sin, void *out) {
    const int d = D->head_dim;
    layer_norm(k, d, D->k_norm, D->k_norm_bias, dt, INDEX_KEY_NORM_EPS, k);
    rope_rows(k, 1, d, D->rope, cos, sin, dt);
    for (int i = 0; i < d; i++) store(out, dt, i, k[i]);
}

int lg_dsa_keys(const lg_dsa *D, int T, const float *hn, int dt, const void *cos, const void *sin, long rot_stride, qact *xa, void *out, int nth) {
    const int d = D->head_dim;
    const size_t es = dt == 1 ? 2 : 4;
    float *k = malloc((size_t)T * d * sizeof(float));
    if (!k) return -1;
    const int rc = lg_mat_rows(&D->wk, T, hn, dt, xa, k, nth);
    for (int t = 0; t < T && rc == 0; t++)
        finish_key(D, k + (size_t)t * d, dt, (const char *)cos + (size_t)t * rot_stride * es, (const char *)sin + (size_t)t * rot_stride * es,
                   (char *)out + (size_t)t * d * es);
    free(k);
    return rc;
}

/* ---- torch.topk's choice (see the file comment): libstdc++'s algorithms on (score, index) ---- */

typedef struct {
    float v;
    int32_t i;
} scored;

/* torch's TopKComparator for `largest`: a goes before b. */
static inline int before(const scored *a, const scored *b) { return (isnan(a->v) && !isnan(b->v)) || a->v > b->v; }

static inline void swap_at(scored *s, long a, long b) {
    const scored t = s[a];
    s[a] = s[b];
    s[b] = t;
}

/* std::__push_heap */
static void push_heap(scored *s, long hole, long top, scored val) {
    long parent = (hole - 1) / 2;
    while (hole > top && before(&s[parent], &val)) {
        s[hole] = s[parent];
        hole = parent;
        parent = (hole - 1) / 2;
    }
    s[hole] = val;
}

/* std::__adjust_heap */
static void adjust_heap(scored *s, long hole, long len, scored val) {
    const long top = hole;
    long child = hole;
    while (child < (len - 1) / 2) {
        child = 2 * (child + 1);
        if (before(&s[child], &s[child - 1])) child--;
        s[hole] = s[child];
        hole = child;
    }
    if ((len & 1) == 0 && child == (len - 2) / 2) {
        child = 2 * (child + 1);
        s[hole] = s[child - 1];
        hole = child - 1;
    }
    push_heap(s, hole, top, val);
}

/* std::__heap_select: s[0..middle) becomes a heap of the `middle` first elements in comparator order. */
static void heap_select(scored *s, long middle, long last) {
    if (middle >= 2)
        for (long parent = (middle - 2) / 2;; parent--) { /* std::__make_heap */
            adjust_heap(s, parent, middle, s[parent]);
            if (parent == 0) break;
        }
    for (long i = middle; i < last; i++)
        if (before(&s[i], &s[0])) { /* std::__pop_heap(first, middle, i) */
            const scored v = s[i];
            s[i] = s[0];
            adjust_heap(s, 0, middle, v);
        }
}

/* std::__insertion_sort */
static void insertion_sort(scored *s, long first, long last) {
    for (long i = first + 1; i < last; i++) {
        const scored v = s[i];
        if (before(&v, &s[first])) {
            memmove(s + first + 1, s + first, (size_t)(i - first) * sizeof(scored));
            s[first] = v;
        } else {
            long j = i;
            for (; before(&v, &s[j - 1]); j--) s[j] = s[j - 1];
            s[j] = v;
        }
    }
}

/* std::__move_median_to_first */
static void median_to_first(scored *s, long result, long a, long b, long c) {
    if (before(&s[a], &s[b])) {
        if (before(&s[b], &s[c])) swap_at(s, result, b);
        else if (before(&s[a], &s[c])) swap_at(s, result, c);
        else swap_at(s, result, a);
    } else if (before(&s[a], &s[c])) swap_at(s, result, a);
    else if (before(&s[b], &s[c])) swap_at(s, result, c);
    else swap_at(s, result, b);
}

/* std::__unguarded_partition around s[pivot] */
static long partition(scored *s, long first, long last, long pivot) {
    for (;;) {
        while (before(&s[first], &s[pivot])) first++;
        last--;
        while (before(&s[pivot], &s[last])) last--;
        if (!(first < last)) return first;
        swap_at(s, first, last);
        first++;
    }
}

/* std::nth_element(s, s + nth, s + n) (std::__introselect, depth limit 2 floor(log2 n)). */
static void nth_element(scored *s, long nth, long n) {
    long first = 0, last = n;
    int depth = 2 * (63 - __builtin_clzll((unsigned long long)n));
    while (last - first > 3) {
        if (depth == 0) {
            heap_select(s + first, nth + 1 - first, last - first);
            swap_at(s, first, nth);
            return;
        }
        depth--;
        median_to_first(s, first, first + 1, first + (last - first) / 2, last - 1);
        const long cut = partition(s, first + 1, last, first);
        if (cut <= nth) first = cut;
        else last = cut;
    }
    insertion_sort(s, first, last);
}

/* torch.topk(k)'s set of the n scored keys: s[0..k) afterwards (in no useful order). */
static void select_top(scored *s, long n, long k) {
    if (k * 64 <= n) heap_select(s, k, n); /* std::partial_sort's selection; its sort only orders the k */
    else nth_element(s, k - 1, n);
}

/* The indexer's query q [heads, head_dim] (wq_b's output, roped here) and head weights w [heads] (weights_proj's
 * fp32 output, scaled here) of one token against keys 0..len-1 -> sel: torch.topk's pick over a row of
 * max(len, row_len) scores, those past len -inf (the file comment). Returns 0, or -1 when out of memory. */
static int pick(const lg_dsa *D, float *q, float *w, int dt, const void *cos, const void *sin, const void *keys, int len, int row_len,
                lg_selection *sel, int nth) {
    const int H = D->heads, d = D->head_dim, n = row_len > len ? row_len : len, k = D->topk < n ? D->topk : n;
    scored *sc = malloc((size_t)n * (sizeof(scored) + 1));
    if (!sc) return -1;
    unsigned char *chosen = (unsigned char *)(sc + n);
    rope_rows(q, H, d, D->rope, cos, sin, dt);
    const float wscale = 1.0f / sqrtf((float)H), scale = 1.0f / sqrtf((float)d);
    for (int h = 0; h < H; h++) w[h] *= wscale;

    const int blocks = (len + AB - 1) / AB;
    const int par = nth > 1 && (long)len * H * d >= (1L << 15);
#pragma omp parallel for num_threads(nth) schedule(dynamic, lg_chunk(blocks, nth)) if (par)
    for (int b = 0; b < blocks; b++) {
        const int t0 = b * AB, nb = len - t0 < AB ? len - t0 : AB;
        float rows[AB * d], dots[AB], acc[AB];
        for (int j = 0; j < AB; j++) {
            if (j < nb) load_row(keys, dt, (size_t)(t0 + j) * d, d, rows + (size_t)j * d);
            else memset(rows + (size_t)j * d, 0, (size_t)d * sizeof(float));
            acc[j] = 0.0f;
        }
        for (int h = 0; h < H; h++) {
            dot_block(q + (size_t)h * d, rows, d, dots);
            for (int j = 0; j < AB; j++) {
                const float r = dots[j] * scale;
                acc[j] += w[h] * (r > 0.0f ? r : 0.0f);
            }
        }
        for (int j = 0; j < nb; j++) sc[t0 + j] = (scored){acc[j], t0 + j};
    }
    for (int j = len; j < n; j++) sc[j] = (scored){-INFINITY, j}; /* the chunk's later keys, masked */
    select_top(sc, n, k);
    memset(chosen, 0, (size_t)n);
    for (int j = 0; j < k; j++) chosen[sc[j].i] = 1;
    int m = 0;
    for (int t = 0; t < len; t++) /* a masked key is never kept: only called past the top-k (len > topk) */
        if (chosen[t]) sel->pos[m++] = t;
    sel->n = m;
    free(sc);
    return 0;
}

int lg_dsa_select_tokens(const lg_dsa *D, int T, const float *hn, const float *q_res, int dt, const void *cos, const void *sin, long rot_stride,
                         const void *keys, int len0, int picks_end, qact *xa, void *sel, long sel_stride, int nth) {
    const int H = D->heads, d = D->head_dim;
    const size_t es = dt == 1 ? 2 : 4;
    float *q = malloc((size_t)T * ((size_t)H * d + H) * sizeof(float));
    if (!q) return -1;
    float *w = q + (size_t)T * H * d;
    int rc = lg_mat_rows(&D->wq_b, T, q_res, dt, xa, q, nth);
    if (rc == 0) rc = lg_mat_rows(&D->weights_proj, T, hn, 0, xa, w, nth); /* fp32, not rounded */
    for (int t = 0; t < T && rc == 0; t++)
        rc = pick(D, q + (size_t)t * H * d, w + (size_t)t * H, dt, (const char *)cos + (size_t)t * rot_stride * es,
                  (const char *)sin + (size_t)t * rot_stride * es, keys, len0 + t, picks_end, (lg_selection *)((int32_t *)sel + (size_t)t * sel_stride),
                  nth);
    free(q);
    return rc;
}

/* A qact with room for the indexer's quantized inputs (hidden for wk, q_lora for wq_b); 0 when out of memory. */
static int indexer_qact(const lg_dsa *D, qact *xa) {
    const int k = D->wk.k > D->wq_b.k ? D->wk.k : D->wq_b.k;
    return lg_qact_alloc(xa, 1, (k + QB - 1) / QB * QB);
}

/* dsa.py's indexer_keys for one token of torch's decode path: x [hidden] (dtype, the input-normed
 * hidden state) -> out [head_dim] (dtype). Returns 0, or -1 when out of memory. */
int lg_dsa_index_key(const lg_dsa *D, const void *x, int dtype, const void *cos, const void *sin, void *out, int nth) {
    const int hidden = D->wk.k;
    float *xf = malloc((size_t)hidden * sizeof(float));
    qact xa = {0};
    int rc = -1;
    if (xf && indexer_qact(D, &xa)) {
        load_row(x, dtype, 0, hidden, xf);
        rc = lg_dsa_keys(D, 1, xf, dtype, cos, sin, 0, &xa, out, nth); /* the fused layers' own call, for one token */
    }
    free(xf);
    lg_qact_free(&xa);
    return rc;
}

/* dsa.py's top-k for one token of torch's decode path: x [hidden] and q_res [q_lora] (the query
 * latent) of dtype against keys [len, head_dim] (dtype) -> sel. Returns 0, or -1 when out of memory. */
int lg_dsa_topk(const lg_dsa *D, const void *x, const void *q_res, int dtype, const void *cos, const void *sin, const void *keys, int len,
                lg_selection *sel, int nth) {
    const int hidden = D->weights_proj.k, q_lora = D->wq_b.k;
    float *xf = malloc(((size_t)hidden + (size_t)q_lora) * sizeof(float));
    qact xa = {0};
    int rc = -1;
    if (xf && indexer_qact(D, &xa)) {
        load_row(x, dtype, 0, hidden, xf);
        load_row(q_res, dtype, 0, q_lora, xf + hidden);
        rc = lg_dsa_select_tokens(D, 1, xf, xf + hidden, dtype, cos, sin, 0, keys, len, 0, &xa, sel, 0, nth); /* the fused layers' call */
    }
    free(xf);
    lg_qact_free(&xa);
    return rc;
}
