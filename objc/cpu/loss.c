/* loss.c — every loss on the CPU, as torch.nn.functional defines it with reduction="mean"
 * (the mean over all elements; over rows for the cross-entropies, or over the labels' weights
 * under class weights), its gradient with respect
 * to the model output written in the same pass, and the correct-prediction count. */
#include "cpu.h"

#include <math.h>

/* the first maximum of a row of n elements `st` apart, a NaN counting as larger than any number
 * (numpy's and torch's argmax: the first NaN when there is one) */
static int64_t argmax(const float *x, int64_t n, int64_t st) {
    int64_t k = 0;
    if (isnan(x[0])) return 0;
    for (int64_t i = 1; i < n; i++) {
        if (isnan(x[i * st])) return i;
        if (x[i * st] > x[k * st]) k = i;
    }
    return k;
}

/* log-sum-exp of one row of c logits `st` apart */
static double row_lse(const float *y, int64_t c, int64_t st) {
    float m = y[0];
    for (int64_t i = 1; i < c; i++) m = y[i * st] > m ? y[i * st] : m;
    double s = 0;
    for (int64_t i = 0; i < c; i++) s += exp((double)(y[i * st] - m));
    return (double)m + log(s);
}

/* where row r's first class lies in a (b, C, positions) output: position r % positions of sample
 * r / positions, its classes `positions` apart (r C for positions 1) */
static int64_t row_at(int64_t r, int64_t c, int64_t positions) {
    const int64_t s = r / positions;
    return s * c * positions + (r - s * positions);
}

/* Cross-entropy from logits against a target distribution q (sparse: one-hot label),
 * smoothed q' = (1 - eps) q + eps / C and scaled by the class weights w (torch's weight=; 1
 * without): a = w q'. loss_row = -sum a log p; d = (p sum a - a) / D, where D is the batch's rows,
 * or with weights and labels the sum of the labels' weights, torch's divisor for its weighted mean
 * (0 makes the loss NaN, as torch's). rows: b x positions, each a position's c logits (row_at). */
static double cross_entropy(float *dy, const float *y, const int32_t *labels, const float *t, const float *w,
                            int64_t rows, int64_t c, int64_t positions, double eps, int ignore, int32_t ign) {
    double total = 0, den = (double)rows, u = eps / (double)c;
    if ((w || ignore) && labels) {  /* the labels' summed weights, or their count, less the ignored ones */
        den = 0;
        for (int64_t r = 0; r < rows; r++)
            if (!ignore || labels[r] != ign) den += w ? (double)w[labels[r]] : 1.0;
    }
    const double inv_d = 1.0 / den;
    const int64_t st = positions;
#define CE_A(r, i) (((1.0 - eps) * (labels ? ((i) == labels[r] ? 1.0 : 0.0) : (double)tr[(i) * st]) + u) * \
                    (w ? (double)w[i] : 1.0))
    for (int64_t r = 0; r < rows; r++) {
        const int64_t at = row_at(r, c, positions);
        const float *yr = y + at, *tr = t ? t + at : NULL;
        if (ignore && labels && labels[r] == ign) {  /* torch's ignore_index: no term, no gradient */
            if (dy)
                for (int64_t i = 0; i < c; i++) dy[at + i * st] = 0.0f;
            continue;
        }
        double lse = row_lse(yr, c, st), asum = 0, row = 0;
        for (int64_t i = 0; i < c; i++) {
            double a = CE_A(r, i);
            asum += a;
            /* torch's nll_loss reads only the label's log-probability: with sparse labels a class of
             * weight 0 adds nothing, even at a logit of -inf (0 * -inf would make the loss NaN) */
            if (a != 0.0 || !labels) row -= a * ((double)yr[i * st] - lse);
        }
        total += row;
        if (dy)
            for (int64_t i = 0; i < c; i++)
                dy[at + i * st] = (float)((exp((double)yr[i * st] - lse) * asum - CE_A(r, i)) * inv_d);
    }
#undef CE_A
    return total * inv_d;
}

/* Categorical cross-entropy on probabilities: -sum q' log(clamp(p, 1e-7, 1)), mean over rows. */
static double categorical(float *dy, const float *y, const float *t, int64_t b, int64_t c, double eps) {
    double total = 0, inv_b = 1.0 / (double)b, u = eps / (double)c;
    for (int64_t k = 0; k < b * c; k++) {
        double q = (1.0 - eps) * t[k] + u, p = y[k];
        int clamped = p < 1e-7;
        if (clamped) p = 1e-7;
        total -= q * log(p);
        if (dy) dy[k] = clamped ? 0.0f : (float)(-q / p * inv_b);
    }
    return total * inv_b;
}

double cpu_loss(const mpscy_plan *p, float *dy, const float *y, const void *target, int64_t b, int64_t *correct) {
    int64_t c = p->out_size, n = b * c;
    const int32_t *labels = p->target == MPSCY_TARGET_INDEX ? (const int32_t *)target : NULL;
    const float *t = labels ? NULL : (const float *)target;
    double total = 0, inv_n = 1.0 / (double)n;

    switch (p->loss.kind) {
    case MPSCY_LOSS_SPARSE_CE:
    case MPSCY_LOSS_CE:
        total = cross_entropy(dy, y, labels, t, p->class_weight, b * p->positions, p->classes, p->positions,
                              p->loss.label_smoothing, p->loss.ignore, p->loss.ignore_index);
        break;
    case MPSCY_LOSS_CATEGORICAL_CE:
        total = categorical(dy, y, t, b, c, p->loss.label_smoothing);
        break;
    case MPSCY_LOSS_MSE:
        for (int64_t k = 0; k < n; k++) {
            double d = (double)y[k] - t[k];
            total += d * d;
            if (dy) dy[k] = (float)(2.0 * d * inv_n);
        }
        total *= inv_n;
        break;
    case MPSCY_LOSS_MAE:
        for (int64_t k = 0; k < n; k++) {
            double d = (double)y[k] - t[k];
            total += fabs(d);
            if (dy) dy[k] = (float)((d > 0) - (d < 0)) * (float)inv_n;
        }
        total *= inv_n;
        break;
    case MPSCY_LOSS_HUBER: {
        double delta = p->loss.delta;
        for (int64_t k = 0; k < n; k++) {
            double d = (double)y[k] - t[k], a = fabs(d);
            total += a < delta ? 0.5 * d * d : delta * (a - 0.5 * delta);
            if (dy) dy[k] = (float)((a < delta ? d : delta * ((d > 0) - (d < 0))) * inv_n);
        }
        total *= inv_n;
        break;
    }
    case MPSCY_LOSS_BCE:
        /* PyTorch clamps each log at -100 and divides the gradient by max(p(1-p), 1e-12) */
        for (int64_t k = 0; k < n; k++) {
            double x = y[k], z = t[k];
            double lp = x > 0 ? log(x) : -100.0, lq = x < 1 ? log1p(-x) : -100.0;
            if (lp < -100.0) lp = -100.0;
            if (lq < -100.0) lq = -100.0;
            total -= z * lp + (1.0 - z) * lq;
            double den = x * (1.0 - x);
            if (dy) dy[k] = (float)((x - z) / (den > 1e-12 ? den : 1e-12) * inv_n);
        }
        total *= inv_n;
        break;
    case MPSCY_LOSS_BCE_LOGITS:
        for (int64_t k = 0; k < n; k++) {
            double x = y[k], z = t[k];
            if (p->pos_weight) {  /* torch's form: (1 - z) x + (1 + (pw - 1) z) softplus(-x) */
                double lw = 1.0 + ((double)p->pos_weight[k % c] - 1.0) * z;
                total += (1.0 - z) * x + lw * (log1p(exp(-fabs(x))) + (x < 0 ? -x : 0));
                if (dy) dy[k] = (float)(((1.0 - z) + lw * (1.0 / (1.0 + exp(-x)) - 1.0)) * inv_n);
                continue;
            }
            total += (x > 0 ? x : 0) - x * z + log1p(exp(-fabs(x)));
            if (dy) dy[k] = (float)((1.0 / (1.0 + exp(-x)) - z) * inv_n);
        }
        total *= inv_n;
        break;
    default:
        total = NAN;
    }

    *correct = -1;
    if (p->loss.accuracy == MPSCY_ACCURACY_ARGMAX) {
        *correct = 0;
        const int64_t classes = p->classes, st = p->positions;  /* a position's classes (rows of c for st 1) */
        for (int64_t r = 0; r < b * st; r++) {
            if (labels && p->loss.ignore && labels[r] == p->loss.ignore_index) continue;  /* not counted */
            const int64_t at = row_at(r, classes, st);
            int64_t want = labels ? labels[r] : argmax(t + at, classes, st);
            *correct += argmax(y + at, classes, st) == want;
        }
    } else if (p->loss.accuracy == MPSCY_ACCURACY_THRESHOLD) {
        *correct = 0;
        float thr = (float)p->loss.threshold;
        for (int64_t k = 0; k < n; k++) *correct += (y[k] > thr) == (t[k] > 0.5f);
    }
    return total;
}
