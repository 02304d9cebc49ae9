/* ce.h — softmax cross-entropy of one row, across a warp or in one thread, as cpu/loss.c defines it
 * (torch.nn.functional.cross_entropy with label smoothing eps and class weights, reduction "mean"), in double: the
 * one definition loss.cu's loss kernel and head.cu's forward share. Header-only device code;
 * include from .cu files only, after reduce.h. */
#ifndef MPSCY_CUDA_CE_H
#define MPSCY_CUDA_CE_H

/* How a row's classes are spread: CE_LANES, over a warp's lanes (i = lane, lane + 32, ...);
 * CE_ONE, one a lane (c <= 32); CE_SOLO, all in the calling thread (a per-position loss: the warp's
 * 32 threads then read 32 neighbouring positions of each class, one transaction, where a warp a
 * position reads c values st apart, each its own). */
enum { CE_LANES = 0, CE_ONE = 1, CE_SOLO = 2 };

/* Row y (c logits st apart, spread as M says): returns this lane's share of the row's loss
 * -sum_i q_i (y_i - logsumexp y) (warp_sum it, but for CE_SOLO: the whole), where
 * q = ((1 - eps) target + eps / c) w_i (w: the class weights, or NULL for 1) and the target is
 * one-hot at label (label >= 0) or the probabilities t (st apart too); writes the gradient
 * (softmax_i sum q - q_i) inv_d into dz[i st] when dz is given (inv_d: 1 / the mean's divisor). A
 * position's classes in a (C, d1, ...) output lie st = d1 x ... apart; a row's, 1. */
template <int M>
static __device__ __forceinline__ double ce_row(const float *y, int64_t c, int lane, int64_t label, const float *t,
                                                const float *w, double eps, double inv_d, float *dz,
                                                int64_t st = 1) {
    auto each = [&](auto f) {  /* f(i) for this lane's logits */
        if constexpr (M == CE_ONE) {
            if (lane < c) f((int64_t)lane);
        } else if constexpr (M == CE_SOLO) {
            for (int64_t i = 0; i < c; i++) f(i);
        } else {
            for (int64_t i = lane; i < c; i += 32) f(i);
        }
    };
    auto allmax = [](float v) { if constexpr (M == CE_SOLO) return v; else return warp_allmax(v); };
    auto allsum = [](double v) { if constexpr (M == CE_SOLO) return v; else return warp_allsum(v); };
    auto q = [&](int64_t i) {
        const double target = t ? (double)t[i * st] : (i == label ? 1.0 : 0.0);
        return ((1.0 - eps) * target + eps / (double)c) * (w ? (double)w[i] : 1.0);
    };
    float m = -INFINITY;
    each([&](int64_t i) { m = y[i * st] > m ? y[i * st] : m; });
    m = allmax(m);
    double s = 0;
    each([&](int64_t i) { s += exp((double)(y[i * st] - m)); });
    const double lse = (double)m + log(allsum(s));
    double row = 0, qsum = 0;
    each([&](int64_t i) {
        const double qi = q(i);
        qsum += qi;
        /* labels: a class of weight 0 adds nothing, even at a logit of -inf (cpu/loss.c, torch's
         * nll_loss); soft targets keep torch's 0 * -inf */
        if (qi != 0.0 || t) row -= qi * ((double)y[i * st] - lse);
    });
    qsum = allsum(qsum);
    if (dz) each([&](int64_t i) { dz[i * st] = (float)((exp((double)y[i * st] - lse) * qsum - q(i)) * inv_d); });
    return row;
}

#endif /* MPSCY_CUDA_CE_H */
