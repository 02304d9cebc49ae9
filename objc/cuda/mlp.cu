/* mlp.cu — the whole training step of a small MLP as one persistent kernel. A chain of Dense
 * layers (each optionally followed by a ReLU) under softmax cross-entropy with integer labels is,
 * at small batch and width, a sequence of tiny dependent products: as separate kernels each one
 * costs a launch and an L2 round trip while doing almost no work. Here one kernel runs every
 * phase — hidden forwards, the last product with the loss and its gradient (one warp per row),
 * per layer the weight and bias gradients with the d(input) of the layer below (ReLU mask
 * applied), the global norm, the decision and the optimizer pass of update.h — separated by
 * grid-wide barriers (a cooperative launch) or, on Hopper, thread-block-cluster barriers. Each
 * output element is computed by exactly one warp in a fixed order, so results are deterministic.
 *
 * Decided once at build (cu_fused_plan); $MPSCY_CUDA_FUSED picks the form: "0" off, "grid" or
 * "grid:N" (N blocks), "cluster" or "cluster:N" (one cluster of N blocks, Hopper), each
 * optionally followed by ",copy" (the kernel itself copies the staged batch from pinned memory
 * instead of a copy node before it). */
#include "cuda.h"
#include "reduce.h"
#include "update.h"

#include <cooperative_groups.h>
namespace cg = cooperative_groups;

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FU_MAX_LAYERS 8
#define FU_MAX_CLASSES 64
#define FU_THREADS 512
#define FU_WARPS (FU_THREADS / 32)
#define FU_SMEM_FLOATS 9216            /* staged operands per block (36 KB) */
#define FU_MAX_BATCH 256
#define FU_MAX_WIDTH 8192
#define FU_MAX_WORK ((int64_t)1 << 24) /* batch x parameters: beyond it the library GEMMs win */

struct fu_layer {
    const float *x;    /* (b, in): the graph input or the layer below's output */
    float *y;          /* (b, out): output, after the ReLU when relu */
    float *dz;         /* (b, out): d(pre-activation) */
    const float *w;    /* (out, in) */
    const float *bias; /* (out) or NULL */
    float *dw, *db;    /* gradients (db NULL without bias) */
    int in, out, relu, rows; /* rows: forward rows per warp item (1, 2, 4 or 8) */
};

struct fu_args {
    fu_layer L[FU_MAX_LAYERS];
    int n_layers, b, accuracy;
    const int32_t *labels;
    double eps;        /* label smoothing */
    update_args u;
    cu_scratch *S;
    cu_result *R;
    const cu_params *P;
    double clip_norm;
    const uint4 *copy_src;  /* in-kernel staging copy (copy_n 16-byte units), or NULL */
    uint4 *copy_dst;
    int64_t copy_n;
    int trace;         /* $MPSCY_CUDA_FUSED_TRACE: block 0 prints each phase's time (a profiling knob) */
};

struct cu_fused {
    fu_args a;
    int cluster, blocks, copy;
};

/* Loads in the inner loops are unconditional (indices past the end are clamped to the last
 * valid element and their products discarded) and issued in batches before the arithmetic
 * that uses them: the phases are latency-bound, and a guarded load inside a loop would wait
 * a full L2 round trip per iteration. Data written earlier in this launch is read with plain
 * loads after a barrier (grid.sync and cluster.sync order memory at their scope). */

template <bool CLUSTER>
static __device__ __forceinline__ void fu_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (CLUSTER) {
        cg::this_cluster().sync();
        return;
    }
#endif
    cg::this_grid().sync();
}

static __device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

/* Copies n floats of src into shared memory when they fit (returns the copy), else src. */
static __device__ const float *stage(float *smem, int avail, const float *src, int n) {
    if (n > avail) return src;
    const int per = blockDim.x * 4;
    for (int i0 = 0; i0 < n; i0 += per) {
        float v[4];
#pragma unroll
        for (int u = 0; u < 4; u++) v[u] = src[imin(i0 + u * blockDim.x + threadIdx.x, n - 1)];
#pragma unroll
        for (int u = 0; u < 4; u++)
            if (i0 + u * blockDim.x + threadIdx.x < n) smem[i0 + u * blockDim.x + threadIdx.x] = v[u];
    }
    __syncthreads();
    return smem;
}

/* Hidden forward: y[r, j] = act(x[r, :] . w[j, :] + bias[j]); one warp per (j, R rows), U
 * 32-wide slices of k per batch of loads. */
template <int R, int U>
static __device__ void forward_rows(const fu_layer &l, int b, const float *x, int gw, int tw, int lane) {
    const int K = l.in, N = l.out, items = N * ((b + R - 1) / R);
    for (int it = gw; it < items; it += tw) {
        const int j = it % N, r0 = (it / N) * R;
        const float *wr = l.w + (int64_t)j * K;
        const float *xr[R];
#pragma unroll
        for (int r = 0; r < R; r++) xr[r] = x + (int64_t)imin(r0 + r, b - 1) * K;
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] = 0.0f;
        for (int k0 = 0; k0 < K; k0 += 32 * U) {
            float wv[U], xv[R][U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int k = k0 + u * 32 + lane, kk = imin(k, K - 1);
                wv[u] = wr[kk];
#pragma unroll
                for (int r = 0; r < R; r++) xv[r][u] = xr[r][kk];
                if (k >= K) wv[u] = 0.0f;
            }
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int r = 0; r < R; r++) acc[r] += xv[r][u] * wv[u];
        }
        const float bj = l.bias ? l.bias[j] : 0.0f;
#pragma unroll
        for (int r = 0; r < R; r++) {
            float v = warp_allsum(acc[r]) + bj;
            if (l.relu) v = v > 0.0f ? v : 0.0f;
            if (lane == r && r0 + r < b) l.y[(int64_t)(r0 + r) * N + j] = v;
        }
    }
}

static __device__ void forward_layer(const fu_layer &l, int b, const float *x, int gw, int tw, int lane) {
    switch (l.rows) {
    case 8: forward_rows<8, 4>(l, b, x, gw, tw, lane); break;
    case 4: forward_rows<4, 8>(l, b, x, gw, tw, lane); break;
    case 2: forward_rows<2, 8>(l, b, x, gw, tw, lane); break;
    default: forward_rows<1, 8>(l, b, x, gw, tw, lane); break;
    }
}

/* The last product and the loss, one warp per row: logits in 16-wide chunks of partial dots
 * over the lane's slice of k, then softmax cross-entropy (label smoothing eps) in double as
 * loss.cu computes it, its gradient over the batch mean, the row's loss and correct flag. */
static __device__ void last_and_loss(const fu_args &a, const fu_layer &l, const float *x, float *logit, int gw,
                                     int tw, int lane) {
    const int K = l.in, C = l.out, b = a.b;
    const double inv_b = 1.0 / (double)b, u = a.eps / (double)C;
    for (int r = gw; r < b; r += tw) {
        const float *xr = x + (int64_t)r * K;
        const int label = a.labels[r];
        for (int j0 = 0; j0 < C; j0 += 16) {
            float acc[16], bias[16];
            const float *wq[16];
#pragma unroll
            for (int q = 0; q < 16; q++) {
                acc[q] = 0.0f;
                wq[q] = l.w + (int64_t)imin(j0 + q, C - 1) * K;
                bias[q] = l.bias ? l.bias[imin(j0 + q, C - 1)] : 0.0f;
            }
            for (int k0 = 0; k0 < K; k0 += 64) {
                const int ka = imin(k0 + lane, K - 1), kb = imin(k0 + 32 + lane, K - 1);
                float xa = xr[ka], xb = xr[kb], wa[16], wb[16];
                if (k0 + lane >= K) xa = 0.0f;
                if (k0 + 32 + lane >= K) xb = 0.0f;
#pragma unroll
                for (int q = 0; q < 16; q++) {
                    wa[q] = wq[q][ka];
                    wb[q] = wq[q][kb];
                }
#pragma unroll
                for (int q = 0; q < 16; q++) acc[q] += xa * wa[q] + xb * wb[q];
            }
#pragma unroll
            for (int q = 0; q < 16; q++) {
                const float v = warp_allsum(acc[q]);
                if (lane == q && j0 + q < C) logit[j0 + q] = v + bias[q];
            }
        }
        __syncwarp();
        float m = -INFINITY;
        for (int i = lane; i < C; i += 32) m = logit[i] > m ? logit[i] : m;
        m = warp_allmax(m);
        double s = 0;
        for (int i = lane; i < C; i += 32) s += exp((double)(logit[i] - m));
        const double lse = (double)m + log(warp_allsum(s));
        double row = 0, qsum = 0;
        for (int i = lane; i < C; i += 32) {
            const double q = (1.0 - a.eps) * (i == label ? 1.0 : 0.0) + u;
            qsum += q;
            row -= q * ((double)logit[i] - lse);
        }
        qsum = warp_allsum(qsum);
        row = warp_allsum(row);
        for (int i = lane; i < C; i += 32) {
            const double q = (1.0 - a.eps) * (i == label ? 1.0 : 0.0) + u;
            l.y[(int64_t)r * C + i] = logit[i];
            l.dz[(int64_t)r * C + i] = (float)((exp((double)logit[i] - lse) * qsum - q) * inv_b);
        }
        if (lane == 0) {
            int best = 0;  /* first maximum, as the cpu's strict > */
            for (int i = 1; i < C; i++)
                if (logit[i] > logit[best]) best = i;
            a.S->loss_part[r] = row;
            a.S->correct_part[r] = best == label;
        }
        __syncwarp();
    }
}

/* Backward of layer l: dW = dz^T x and db = column sums of dz (squares added to *sq), and when
 * below != NULL the layer below's dz = (dz w) masked by its ReLU (x > 0 where it has one). */
static __device__ void backward_layer(const fu_layer &l, const fu_layer *below, int b, const float *x,
                                      const float *dz, int gw, int tw, int lane, double *sq) {
    const int K = l.in, N = l.out;
    const int ic = (K + 31) / 32, jb = (N + 3) / 4, n_dw = ic * jb;
    const int n_db = l.db ? (N + 31) / 32 : 0, n_dx = below ? ic * ((b + 3) / 4) : 0;
    double s2 = 0;
    for (int it = gw; it < n_dw + n_db + n_dx; it += tw) {
        if (it < n_dw) {
            /* dW[j0 + q, i] = sum_r dz[r, j0 + q] x[r, i], 8 rows per batch of loads */
            const int c = it % ic, j0 = (it / ic) * 4, i = c * 32 + lane, ii = imin(i, K - 1);
            int jq[4];
#pragma unroll
            for (int q = 0; q < 4; q++) jq[q] = imin(j0 + q, N - 1);
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int r0 = 0; r0 < b; r0 += 8) {
                float xv[8], dv[8][4];
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    const int r = imin(r0 + u, b - 1);
                    xv[u] = x[(int64_t)r * K + ii];
#pragma unroll
                    for (int q = 0; q < 4; q++) dv[u][q] = dz[(int64_t)r * N + jq[q]];
                    if (r0 + u >= b) xv[u] = 0.0f;
                }
#pragma unroll
                for (int u = 0; u < 8; u++)
#pragma unroll
                    for (int q = 0; q < 4; q++) acc[q] += dv[u][q] * xv[u];
            }
            if (i < K)
#pragma unroll
                for (int q = 0; q < 4; q++)
                    if (j0 + q < N) {
                        l.dw[(int64_t)(j0 + q) * K + i] = acc[q];
                        s2 += (double)acc[q] * acc[q];
                    }
        } else if (it < n_dw + n_db) {
            const int j = (it - n_dw) * 32 + lane, jj = imin(j, N - 1);
            float acc = 0.0f;
            for (int r0 = 0; r0 < b; r0 += 8) {
                float v[8];
#pragma unroll
                for (int u = 0; u < 8; u++) v[u] = r0 + u < b ? dz[(int64_t)imin(r0 + u, b - 1) * N + jj] : 0.0f;
#pragma unroll
                for (int u = 0; u < 8; u++) acc += v[u];
            }
            if (j < N) {
                l.db[j] = acc;
                s2 += (double)acc * acc;
            }
        } else {
            /* the layer below's dz[r0 + q, i] = sum_j dz[r0 + q, j] w[j, i], 8 j per batch */
            const int t = it - n_dw - n_db, c = t % ic, r0 = (t / ic) * 4, i = c * 32 + lane, ii = imin(i, K - 1);
            int rq[4];
#pragma unroll
            for (int q = 0; q < 4; q++) rq[q] = imin(r0 + q, b - 1);
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int j0 = 0; j0 < N; j0 += 8) {
                float wv[8], dv[4][8];
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    const int j = imin(j0 + u, N - 1);
                    wv[u] = l.w[(int64_t)j * K + ii];
#pragma unroll
                    for (int q = 0; q < 4; q++) dv[q][u] = dz[(int64_t)rq[q] * N + j];
                    if (j0 + u >= N) wv[u] = 0.0f;
                }
#pragma unroll
                for (int u = 0; u < 8; u++)
#pragma unroll
                    for (int q = 0; q < 4; q++) acc[q] += dv[q][u] * wv[u];
            }
            float mask[4];
#pragma unroll
            for (int q = 0; q < 4; q++) mask[q] = x[(int64_t)rq[q] * K + ii];
            if (i < K)
#pragma unroll
                for (int q = 0; q < 4; q++)
                    if (r0 + q < b) below->dz[(int64_t)(r0 + q) * K + i] = below->relu && !(mask[q] > 0.0f) ? 0.0f : acc[q];
        }
    }
    *sq += s2;
}

static __device__ __forceinline__ unsigned long long fu_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#define FU_MARK()                                                          \
    do {                                                                   \
        if (a.trace && blockIdx.x == 0 && threadIdx.x == 0 && nt < 32) { \
            tr[nt] = fu_now();                                             \
            cyc[nt++] = clock64();                                         \
        }                                                                  \
    } while (0)

template <bool CLUSTER>
__global__ void __launch_bounds__(FU_THREADS) fused_mlp_kernel(const __grid_constant__ fu_args a) {
    __shared__ float smem[FU_SMEM_FLOATS];
    __shared__ float logits[FU_WARPS][FU_MAX_CLASSES];
    __shared__ double totals[2];
    __shared__ long long correct_total;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gw = blockIdx.x * FU_WARPS + warp, tw = gridDim.x * FU_WARPS;
    const int nl = a.n_layers, b = a.b;
    unsigned long long tr[32];
    long long cyc[32];
    int nt = 0;
    FU_MARK();

    if (a.copy_src) {
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < a.copy_n; i += (int64_t)gridDim.x * blockDim.x)
            a.copy_dst[i] = a.copy_src[i];
        FU_MARK();
        fu_sync<CLUSTER>();
        FU_MARK();
    }
    /* forward: layer 0 reads the batch as staged, the others their input from shared memory */
    for (int l = 0; l < nl - 1; l++) {
        const float *x = l == 0 ? a.L[0].x : stage(smem, FU_SMEM_FLOATS, a.L[l].x, b * a.L[l].in);
        forward_layer(a.L[l], b, x, gw, tw, lane);
        FU_MARK();
        fu_sync<CLUSTER>();
        FU_MARK();
    }
    {
        const fu_layer &l = a.L[nl - 1];
        const float *x = nl == 1 ? l.x : stage(smem, FU_SMEM_FLOATS, l.x, b * l.in);
        last_and_loss(a, l, x, logits[warp], gw, tw, lane);
        FU_MARK();
        fu_sync<CLUSTER>();
        FU_MARK();
    }
    /* backward, top down; each block keeps the squares of the gradients it wrote */
    double sq = 0;
    for (int l = nl - 1; l >= 0; l--) {
        const fu_layer &L = a.L[l];
        const int nz = b * L.out;
        const float *dz = stage(smem, FU_SMEM_FLOATS, L.dz, nz);
        FU_MARK();
        const int used = dz == smem ? nz : 0;
        const float *x = l == 0 ? L.x : stage(smem + used, FU_SMEM_FLOATS - used, L.x, b * L.in);
        FU_MARK();
        backward_layer(L, l > 0 ? &a.L[l - 1] : NULL, b, x, dz, gw, tw, lane, &sq);
        if (l == 0) {
            sq = block_sum(sq);
            if (threadIdx.x == 0) a.S->norm_part[blockIdx.x] = sq;
        }
        FU_MARK();
        fu_sync<CLUSTER>();
        FU_MARK();
    }
    /* every block adds the partials in the same order, so all take the same decision */
    double t = 0, loss = 0;
    long long cor = 0;
    for (int k = threadIdx.x; k < (int)gridDim.x; k += blockDim.x) t += __ldcg(&a.S->norm_part[k]);
    for (int k = threadIdx.x; k < b; k += blockDim.x) {
        loss += __ldcg(&a.S->loss_part[k]);
        cor += __ldcg(&a.S->correct_part[k]);
    }
    t = block_sum(t);
    loss = block_sum(loss);
    cor = block_sum(cor);
    if (threadIdx.x == 0) {
        totals[0] = t;
        totals[1] = loss / (double)b;
        correct_total = cor;
    }
    __syncthreads();
    t = totals[0];
    loss = totals[1];
    const double norm = sqrt(t);
    const int applied = isfinite(loss) && isfinite(norm);
    const double coef = a.clip_norm > 0 ? a.clip_norm / (norm + 1e-6) : 1.0;
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        a.S->loss = loss;
        a.R->loss = loss;
        a.R->correct = a.accuracy == MPSCY_ACCURACY_NONE ? -1 : correct_total;
        decide(a.S, a.R, t, a.clip_norm, 1);
    }
    FU_MARK();
    if (applied) update_slab(a.u, a.P, coef < 1.0 ? (float)coef : 1.0f);
    FU_MARK();
    if (a.trace && blockIdx.x == 0 && threadIdx.x == 0) {
        /* work, then barrier wait, of each phase in ns: "w0 s0 w1 s1 ... decide update" */
        printf("fused_mlp trace: %d blocks, SM clock %.0f MHz; ns per mark:", (int)gridDim.x,
               1e3 * (double)(cyc[nt - 1] - cyc[0]) / (double)(tr[nt - 1] - tr[0]));
        for (int k = 1; k < nt; k++) printf(" %llu", tr[k] - tr[k - 1]);
        printf(" total %llu\n", tr[nt - 1] - tr[0]);
    }
}

/* ------------------------------------------------------------------------------- host side */

static int pick_rows(int64_t n, int b, int warps) {
    int r = 8;
    while (r > b && r > 1) r >>= 1;
    while (r > 1 && n * ((b + r - 1) / r) < warps / 2) r >>= 1;
    return r;
}

int cu_fused_plan(cu_graph *g) {
    const mpscy_plan *p = &g->plan;
    const char *env = getenv("MPSCY_CUDA_FUSED");
    if (env && !strcmp(env, "0")) return 0;
    int cluster = env && !strncmp(env, "cluster", 7), blocks = 0, copy = env && strstr(env, ",copy") != NULL;
    const char *colon = env ? strchr(env, ':') : NULL;
    if (colon) blocks = atoi(colon + 1);
    if (cluster && (g->dev->prop.major < 9 || blocks > 16)) return 0;
    if (!cluster && !g->dev->coop) return 0;
    if (p->n_inputs != 1 || p->input_grad || p->optim.kind == MPSCY_OPTIM_LBFGS || p->target != MPSCY_TARGET_INDEX ||
        (p->loss.kind != MPSCY_LOSS_SPARSE_CE && p->loss.kind != MPSCY_LOSS_CE) ||
        p->loss.accuracy == MPSCY_ACCURACY_THRESHOLD || p->batch > FU_MAX_BATCH || p->out_size > FU_MAX_CLASSES ||
        (int64_t)p->batch * p->n_params > FU_MAX_WORK || p->nodes[0].kind != MPSCY_LAYER_INPUT)
        return 0;
    fu_args a;
    memset(&a, 0, sizeof a);
    int nl = 0;
    int32_t prev = 0;  /* the node the next Dense must read */
    for (int32_t i = 1; i < p->n_nodes; i++) {
        const mpscy_node *n = &p->nodes[i];
        if (n->kind != MPSCY_LAYER_DENSE || n->in[0] != prev || nl == FU_MAX_LAYERS || !g->dy[i]) return 0;
        const int64_t in = p->nodes[prev].size, out = n->size;
        if (in > FU_MAX_WIDTH || out > FU_MAX_WIDTH) return 0;
        fu_layer *l = &a.L[nl++];
        l->x = g->y[prev];
        l->y = g->y[i];
        l->dz = g->dy[i];
        l->w = cu_tensor(g, n, MPSCY_ROLE_PARAM, 0);
        l->bias = cu_tensor(g, n, MPSCY_ROLE_PARAM, 1);
        l->dw = cu_tensor_grad(g, n, 0);
        l->db = cu_tensor_grad(g, n, 1);
        l->in = (int)in;
        l->out = (int)out;
        l->relu = (g->fuse[i] & CU_FUSE_RELU) != 0;
        if (!l->w || !l->dw || (l->bias == NULL) != (l->db == NULL)) return 0;
        if (i == p->output) {
            if (l->relu || i != p->n_nodes - 1) return 0;
            break;
        }
        if (n->consumers != 1) return 0;
        prev = i;
        if (l->relu) {  /* the ReLU right after it, skipped by plan_fusions */
            if (i + 1 >= p->n_nodes || p->nodes[i + 1].kind != MPSCY_LAYER_RELU || p->nodes[i + 1].in[0] != i ||
                p->nodes[i + 1].consumers != 1 || !(g->fuse[i + 1] & CU_SKIP))
                return 0;
            prev = ++i;
        }
    }
    if (nl == 0 || a.L[nl - 1].y != g->y[p->output]) return 0;
    /* the kernel's grid: every block resident at once (cooperative), or one cluster */
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fused_mlp_kernel<false>, FU_THREADS, 0) != cudaSuccess ||
        per_sm < 1) {
        cudaGetLastError();
        return 0;
    }
    if (cluster) {
        if (blocks <= 0) blocks = 16;
        if (blocks > 8 &&
            cudaFuncSetAttribute(fused_mlp_kernel<true>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
            cudaGetLastError();
            return 0;
        }
    } else {
        int most = per_sm * g->dev->sms;
        if (blocks <= 0 || blocks > most) blocks = g->dev->sms < most ? g->dev->sms : most;
        if (blocks > CU_MAX_PARTS) blocks = CU_MAX_PARTS;
    }
    const int warps = blocks * FU_WARPS;
    for (int l = 0; l < nl; l++) a.L[l].rows = pick_rows(a.L[l].out, p->batch, warps);
    a.n_layers = nl;
    a.accuracy = p->loss.accuracy;
    a.labels = (const int32_t *)(g->stage_d + g->off_target);
    a.eps = p->loss.label_smoothing;
    a.S = g->scratch;
    a.R = g->result;
    a.P = g->params_d;
    a.clip_norm = p->optim.clip_grad_norm;
    a.trace = getenv("MPSCY_CUDA_FUSED_TRACE") != NULL;
    float *slot[3] = {NULL, NULL, NULL};
    for (int k = 0; k < 3 && k < p->n_vec_slots; k++) slot[k] = g->optim + p->vec_offset[k];
    a.u = update_args{g->params, g->grads, slot[0], slot[1], slot[2], p->n_params, p->optim.kind,
                      p->optim.kind == MPSCY_OPTIM_ADAMW || (p->optim.flags & MPSCY_OPTIM_DECOUPLED_WD) != 0,
                      p->optim.clip_grad_norm > 0,
                      p->optim.clip_grad_value > 0 ? (float)p->optim.clip_grad_value : 0.0f};
    cu_fused *f = (cu_fused *)cu_host_alloc(&g->dev->base, sizeof(cu_fused));
    if (!f) return 0;
    f->a = a;
    f->cluster = cluster;
    f->blocks = blocks;
    f->copy = copy;
    g->fu = f;
    return 1;
}

void cu_fused_free(cu_graph *g) {
    if (!g->fu) return;
    cu_host_free(&g->dev->base, g->fu, sizeof(cu_fused));
    g->fu = NULL;
}

int cu_fused_copies(const cu_graph *g) { return g->fu && g->fu->copy; }

int cu_fused_step(cu_graph *g, int64_t b, size_t staged, char *err, size_t en) {
    cu_fused *f = g->fu;
    f->a.b = (int)b;
    f->a.copy_src = f->copy ? (const uint4 *)g->stage_h : NULL;
    f->a.copy_dst = (uint4 *)g->stage_d;
    f->a.copy_n = (int64_t)((staged + 15) / 16);
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute at;
    cfg.gridDim = dim3(f->blocks);
    cfg.blockDim = dim3(FU_THREADS);
    cfg.stream = g->stream;
    cfg.attrs = &at;
    cfg.numAttrs = 1;
    if (f->cluster) {
        at.id = cudaLaunchAttributeClusterDimension;
        at.val.clusterDim.x = f->blocks;
        at.val.clusterDim.y = 1;
        at.val.clusterDim.z = 1;
        CU_TRY(cudaLaunchKernelEx(&cfg, fused_mlp_kernel<true>, f->a), "fused_mlp (cluster)");
    } else {
        at.id = cudaLaunchAttributeCooperative;
        at.val.cooperative = 1;
        CU_TRY(cudaLaunchKernelEx(&cfg, fused_mlp_kernel<false>, f->a), "fused_mlp (cooperative)");
    }
    return CU_LAUNCHED("fused_mlp");
}

const char *cu_fused_form(const cu_graph *g, char *buf, size_t n) {
    if (!g->fu) return "separate kernels";
    snprintf(buf, n, "one kernel, %s:%d%s", g->fu->cluster ? "cluster" : "grid", g->fu->blocks, g->fu->copy ? ",copy" : "");
    return buf;
}
