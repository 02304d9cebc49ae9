/* loss.cu — every loss on CUDA in one kernel: per row (one warp each) the loss, its gradient
 * with respect to the model output and the correct count, then the mean over the batch by the
 * last block, in double, as cpu/loss.c defines them (torch.nn.functional, reduction "mean").
 * Eval graphs also finish the step's result here (there is no norm kernel after them). */
#include "cuda.h"
#include "reduce.h"
#include "ce.h"

#include <math.h>

struct loss_args {
    int kind, accuracy, index_target;
    const float *w;  /* (c) the cross-entropies' class weights, or NULL */
    const float *pw; /* (c) bce_with_logits's pos_weight of each element of a row, or NULL */
    int64_t b, c;    /* rows (the batch's positions) and the classes (elements) of each */
    int64_t positions; /* the cross-entropies over (C, d1, ...): a row's classes lie this far apart (plan.h) */
    double eps, delta;
    float threshold;
    int finalize;  /* an eval step: the result is written here (no norm kernel follows) */
    int pre_w;     /* the labels' summed weights are loss_label_weight's (S->label_w), not each block's own */
    int ignore;    /* labels equal to ignore_index are left out (plan.h: torch's ignore_index) */
    int32_t ignore_index;
};

/* a label's share of the weighted mean's divisor: its class weight (1 without), 0 when ignored */
static __device__ __forceinline__ double label_share(const float *w, int32_t label, int ignore, int32_t ign) {
    return ignore && label == ign ? 0.0 : w ? (double)w[label] : 1.0;
}

/* Above this many rows (a per-position loss over a segmentation batch) the labels' summed class
 * weights come from one block of their own kernel before the loss kernel, not from every block of
 * it, each of which would read every label and its weight again. */
#define LOSS_PRE_W_ROWS 4096

/* S->label_w = the sum of w[labels[r]] over the rows, in a fixed order (one block) */
__global__ void loss_label_weight(cu_scratch *S, const int32_t *labels, const float *w, int64_t rows, int ignore,
                                  int32_t ign) {
    cu_pdl_enter();
    double s = 0;
    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) s += label_share(w, labels[r], ignore, ign);
    s = block_sum(s);
    if (threadIdx.x == 0) S->label_w = s;
}

/* first maximum of a row (c elements st apart) across the warp, or in this thread (solo), in
 * argmax_before's order (the cpu's argmax) */
static __device__ int64_t row_argmax(const float *x, int64_t c, int lane, int64_t st, bool solo) {
    float best = -INFINITY;
    int64_t k = -1;
    for (int64_t i = solo ? 0 : lane; i < c; i += solo ? 1 : 32)
        if (k < 0 || argmax_before(x[i * st], i, best, k)) {
            best = x[i * st];
            k = i;
        }
    return solo ? k : warp_first_max(best, k);
}

/* SOLO: a thread a row (a cross entropy over positions, cu_loss), else a warp a row; two
 * instantiations, so that the warp form keeps its registers (108 against 136 for both in one) */
template <bool SOLO>
__global__ void loss_forward_backward(cu_scratch *S, cu_result *R, float *dy, const float *y, const void *target,
                                      loss_args a) {
    // dy (b, c) or NULL, y (b, c), target: int32 (b) labels or float (b, c)
    cu_pdl_enter();
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const int32_t *labels = a.index_target ? (const int32_t *)target : NULL;
    const float *t = a.index_target ? NULL : (const float *)target;
    const int64_t c = a.c;
    const double inv_b = 1.0 / (double)a.b, inv_n = 1.0 / (double)(a.b * c), u = a.eps / (double)c;
    double inv_d = inv_b;  /* the cross-entropies' divisor: the rows, or with class weights and labels the
                            * sum of the labels' weights (torch's weighted mean), which every block adds up */
    const int ignore = labels && a.ignore;
    if ((a.w || ignore) && labels && a.pre_w) {
        inv_d = 1.0 / S->label_w;
    } else if ((a.w || ignore) && labels) {
        __shared__ double inv_w;
        double s = 0;
        for (int64_t r = threadIdx.x; r < a.b; r += blockDim.x)
            s += label_share(a.w, labels[r], ignore, a.ignore_index);
        s = block_sum(s);
        if (threadIdx.x == 0) inv_w = 1.0 / s;
        __syncthreads();
        inv_d = inv_w;
    }
    double total = 0;
    long long correct = 0;
    const int64_t st = a.positions;
    constexpr bool solo = SOLO;
    const int64_t first = solo ? blockIdx.x * (int64_t)blockDim.x + threadIdx.x
                               : blockIdx.x * (int64_t)warps + (threadIdx.x >> 5);
    const int64_t step = solo ? (int64_t)gridDim.x * blockDim.x : (int64_t)gridDim.x * warps;
    for (int64_t r = first; r < a.b; r += step) {
        const int64_t smp = r / st, at = smp * c * st + (r - smp * st);  /* r * c for st 1 */
        const float *yr = y + at;
        const float *tr = t ? t + at : NULL;
        float *dr = dy ? dy + at : NULL;
        double row = 0;
        if (ignore && labels[r] == a.ignore_index) {  /* no term, no gradient, not counted */
            if (dr)
                for (int64_t i = solo ? 0 : lane; i < c; i += solo ? 1 : 32) dr[i * st] = 0.0f;
            continue;
        }
        if (solo) {  /* a cross entropy (cu_loss), no warp collectives: the threads of a warp part here */
            total += ce_row<CE_SOLO>(yr, c, 0, labels ? labels[r] : -1, tr, a.w, a.eps, inv_d, dr, st);
            if (a.accuracy == MPSCY_ACCURACY_ARGMAX)
                correct += row_argmax(yr, c, 0, st, true) == (labels ? labels[r] : row_argmax(tr, c, 0, st, true));
            else if (a.accuracy == MPSCY_ACCURACY_THRESHOLD)
                for (int64_t i = 0; i < c; i++) correct += (yr[i * st] > a.threshold) == (tr[i * st] > 0.5f);
            continue;
        }
        if (a.kind == MPSCY_LOSS_SPARSE_CE || a.kind == MPSCY_LOSS_CE) {
            row = ce_row<CE_LANES>(yr, c, lane, labels ? labels[r] : -1, tr, a.w, a.eps, inv_d, dr, st);
        } else {
            for (int64_t i = lane; i < c; i += 32) {
                double x = yr[i], z = tr[i], d = x - z, g;
                switch (a.kind) {
                case MPSCY_LOSS_CATEGORICAL_CE: {
                    double q = (1.0 - a.eps) * z + u, pp = x;
                    int clamped = pp < 1e-7;
                    if (clamped) pp = 1e-7;
                    row -= q * log(pp);
                    if (dr) dr[i] = clamped ? 0.0f : (float)(-q / pp * inv_b);
                    continue;
                }
                case MPSCY_LOSS_MSE:
                    row += d * d;
                    g = 2.0 * d * inv_n;
                    break;
                case MPSCY_LOSS_MAE:
                    row += fabs(d);
                    if (dr) dr[i] = (float)((d > 0) - (d < 0)) * (float)inv_n;
                    continue;
                case MPSCY_LOSS_HUBER: {
                    double ad = fabs(d);
                    row += ad < a.delta ? 0.5 * d * d : a.delta * (ad - 0.5 * a.delta);
                    g = (ad < a.delta ? d : a.delta * ((d > 0) - (d < 0))) * inv_n;
                    break;
                }
                case MPSCY_LOSS_BCE: {
                    double lp = x > 0 ? log(x) : -100.0, lq = x < 1 ? log1p(-x) : -100.0;
                    if (lp < -100.0) lp = -100.0;
                    if (lq < -100.0) lq = -100.0;
                    row -= z * lp + (1.0 - z) * lq;
                    double den = x * (1.0 - x);
                    g = (x - z) / (den > 1e-12 ? den : 1e-12) * inv_n;
                    break;
                }
                case MPSCY_LOSS_BCE_LOGITS:
                    if (a.pw) {  /* torch's form: (1 - z) x + (1 + (pw - 1) z) softplus(-x), as cpu/loss.c */
                        const double lw = 1.0 + ((double)a.pw[i] - 1.0) * z;
                        row += (1.0 - z) * x + lw * (log1p(exp(-fabs(x))) + (x < 0 ? -x : 0));
                        g = ((1.0 - z) + lw * (1.0 / (1.0 + exp(-x)) - 1.0)) * inv_n;
                        break;
                    }
                    row += (x > 0 ? x : 0) - x * z + log1p(exp(-fabs(x)));
                    g = (1.0 / (1.0 + exp(-x)) - z) * inv_n;
                    break;
                default:
                    row = NAN;
                    g = NAN;
                }
                if (dr) dr[i] = (float)g;
            }
        }
        row = warp_sum(row);
        if (a.accuracy == MPSCY_ACCURACY_ARGMAX) {
            int64_t want = labels ? labels[r] : row_argmax(tr, c, lane, st, false);
            int64_t got = row_argmax(yr, c, lane, st, false);
            if (lane == 0) correct += got == want;
        } else if (a.accuracy == MPSCY_ACCURACY_THRESHOLD) {
            long long k = 0;
            for (int64_t i = lane; i < c; i += 32) k += (yr[i * st] > a.threshold) == (tr[i * st] > 0.5f);
            k = warp_sum(k);
            if (lane == 0) correct += k;
        }
        if (lane == 0) total += row;
    }
    total = block_sum(total);
    correct = block_sum(correct);
    if (threadIdx.x == 0) {
        S->loss_part[blockIdx.x] = total;
        S->correct_part[blockIdx.x] = correct;
    }
    if (!last_block(&S->loss_count)) return;
    const volatile double *lp = S->loss_part;
    const volatile long long *cp = S->correct_part;
    double sum = 0;
    long long cor = 0;
    for (unsigned k = threadIdx.x; k < gridDim.x; k += blockDim.x) {
        sum += lp[k];
        cor += cp[k];
    }
    sum = block_sum(sum);
    cor = block_sum(cor);
    if (threadIdx.x == 0) {
        const int ce = a.kind == MPSCY_LOSS_SPARSE_CE || a.kind == MPSCY_LOSS_CE;
        double loss = sum * (ce ? inv_d : a.kind == MPSCY_LOSS_CATEGORICAL_CE ? inv_b : inv_n);
        S->loss = loss;
        S->correct = a.accuracy == MPSCY_ACCURACY_NONE ? -1 : cor;
        if (a.finalize) {
            R->loss = loss;
            R->correct = S->correct;
            R->finite = isfinite(loss);
            R->grad_norm = 0.0;
            R->applied = 0;
        }
        /* a training step's loss and count reach R in update.h's decide(), with the rest of
         * its result, before one system-wide fence */
        S->loss_count = 0;
    }
}

int cu_loss(cu_graph *g, float *dy, int64_t b, int finalize, char *err, size_t en) {
    const mpscy_plan *p = &g->plan;
    loss_args a;
    a.kind = p->loss.kind;
    a.accuracy = p->loss.accuracy;
    a.index_target = p->target == MPSCY_TARGET_INDEX;
    a.w = g->class_w;
    a.pw = g->pos_w;
    a.b = b * p->positions;
    a.c = p->classes;
    a.positions = p->positions;
    a.eps = p->loss.label_smoothing;
    a.delta = p->loss.delta;
    a.threshold = (float)p->loss.threshold;
    a.finalize = finalize;
    const void *target = g->stage_d + g->off_target;
    a.ignore = p->loss.ignore;
    a.ignore_index = p->loss.ignore_index;
    a.pre_w = (a.w || a.ignore) && a.index_target && a.b > LOSS_PRE_W_ROWS;
    if (a.pre_w) {
        CU_TRY(cu_launch(g, loss_label_weight, 1, 1024, g->stream, g->scratch, (const int32_t *)target, a.w, a.b,
                         a.ignore, a.ignore_index),
               "loss_label_weight");
        const int st = CU_LAUNCHED("loss_label_weight");
        if (st != MPSCY_OK) return st;
    }
    /* a warp a row, blocks of CU_THREADS. Measured on the H200 (README CNN, b64): one block of
     * 1024 threads, two rows a warp (64 registers, some spilled) took 10.7 us in the step's
     * timeline against 7.1 for eight blocks and the last block's sum; the step 283.1 against
     * 280.1 us (A/B). A cross entropy over positions takes a thread a position where a warp's
     * threads read neighbouring positions (32 or more a sample) or a row is no wider than a warp
     * would be busy (32 classes or fewer): a U-Net's (16, 5, 64, 64) took 104 us a warp a
     * position on an H100, 27 of a warp's 32 lanes idle and each class's read its own. Many
     * classes over few rows stay a warp's: (8, 1000, 32) would be one block of threads each
     * looping over 1,000 classes, where warps spread it over 32 blocks. */
    const bool ce = a.kind == MPSCY_LOSS_SPARSE_CE || a.kind == MPSCY_LOSS_CE;
    const bool solo = ce && a.positions > 1 && (a.c <= 32 || (a.positions >= 32 && a.b >= 16384));
    unsigned blocks = cu_blocks(a.b, solo ? CU_THREADS : CU_THREADS / 32, CU_MAX_PARTS);
    CU_TRY(cu_launch(g, solo ? loss_forward_backward<true> : loss_forward_backward<false>, blocks, CU_THREADS,
                     g->stream, g->scratch, g->result, dy, (const float *)g->y[p->output], target, a),
           "loss_forward_backward");
    return CU_LAUNCHED("loss_forward_backward");
}
