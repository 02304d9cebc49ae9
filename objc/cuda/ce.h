/* ce.h — softmax cross-entropy of one row across a warp, as cpu/loss.c defines it
 * (torch.nn.functional.cross_entropy with label smoothing eps and class weights, reduction "mean"), in double: the
 * one definition loss.cu's loss kernel and head.cu's forward share. Header-only device code;
 * include from .cu files only, after reduce.h. */
#ifndef MPSCY_CUDA_CE_H
#define MPSCY_CUDA_CE_H

/* Row y (c logits st apart; lane holds i = lane, lane + 32, ...; ONE: c <= 32, at most one a lane):
 * returns this lane's share of the row's loss -sum_i q_i (y_i - logsumexp y) (warp_sum it), where
 * q = ((1 - eps) target + eps / c) w_i (w: the class weights, or NULL for 1) and the target is
 * one-hot at label (label >= 0) or the probabilities t (st apart too); writes the gradient
 * (softmax_i sum q - q_i) inv_d into dz[i st] when dz is given (inv_d: 1 / the mean's divisor). A
 * position's classes in a (C, d1, ...) output lie st = d1 x ... apart; a row's, 1. */
template <bool ONE>
static __device__ __forceinline__ double ce_row(const float *y, int64_t c, int lane, int64_t label, const float *t,
                                                const float *w, double eps, double inv_d, float *dz,
                                                int64_t st = 1) {
    auto each = [&](auto f) {  /* f(i) for this lane's logits */
        if constexpr (ONE) {
            if (lane < c) f((int64_t)lane);
        } else {
            for (int64_t i = lane; i < c; i += 32) f(i);
        }
    };
    auto q = [&](int64_t i) {
        const double target = t ? (double)t[i * st] : (i == label ? 1.0 : 0.0);
        return ((1.0 - eps) * target + eps / (double)c) * (w ? (double)w[i] : 1.0);
    };
    float m = -INFINITY;
    each([&](int64_t i) { m = y[i * st] > m ? y[i * st] : m; });
    m = warp_allmax(m);
    double s = 0;
    each([&](int64_t i) { s += exp((double)(y[i * st] - m)); });
    const double lse = (double)m + log(warp_allsum(s));
    double row = 0, qsum = 0;
    each([&](int64_t i) {
        const double qi = q(i);
        qsum += qi;
        /* labels: a class of weight 0 adds nothing, even at a logit of -inf (cpu/loss.c, torch's
         * nll_loss); soft targets keep torch's 0 * -inf */
        if (qi != 0.0 || t) row -= qi * ((double)y[i * st] - lse);
    });
    qsum = warp_allsum(qsum);
    if (dz) each([&](int64_t i) { dz[i * st] = (float)((exp((double)y[i * st] - lse) * qsum - q(i)) * inv_d); });
    return row;
}

#endif /* MPSCY_CUDA_CE_H */
