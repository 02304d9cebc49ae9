/* mlp_report.cu — the one-kernel MLP step's host-side reports (mlp.cu): whether the full batch's
 * kernel lingers, the engine's verbose lines on the lingering kernel's timeline and staging, and the
 * train step's form line. */
#include "mlp.cuh"
#include "mlp_split.cuh"

#include <stdio.h>

int cu_fused_lingers(const cu_graph *g) { return g->fu && g->fu->linger_ns; }

void cu_fused_report(const cu_graph *g) {
    if (!g->lg_steps || !g->lg_report) return;
    fprintf(stderr, "mpscy: cuda lingering kernel took %lld of %lld training steps (the host's turn from a result to the "
            "next request: %.2f us on average, %.2f of them to the step's launch)\n", (long long)g->lg_taken,
            (long long)g->lg_steps, g->lg_turns ? 1e-3 * (double)g->lg_turn_ns / (double)g->lg_turns : 0.0,
            g->lg_turns ? 1e-3 * (double)g->lg_enter_ns / (double)g->lg_turns : 0.0);
    const cu_fused *f = g->fu;
    unsigned long long early = 0;
    int kw;
    const int64_t batch = g->plan.batch, q = f->ws_floats && f->a.prefetch ? fu_slices(f, batch, &kw) : 0;
    if (q && cudaMemcpy(&early, &g->scratch->lg_w_early, sizeof(early), cudaMemcpyDeviceToHost) == cudaSuccess)
        fprintf(stderr, "mpscy: cuda lingering kernel: %llu of %lld copying blocks' weight slices loaded while it waited\n",
                early, (long long)(q * ((batch + f->a.split_rows - 1) / f->a.split_rows) * g->lg_taken));
    long long t[FU_LG_TIMES];
    if (cudaMemcpy(t, g->scratch->lg_sum, sizeof(t), cudaMemcpyDeviceToHost) == cudaSuccess && t[FU_LG_TIMES - 1] > 0) {
        const double k = 1e-3 / (double)t[FU_LG_TIMES - 1];
        fprintf(stderr, "mpscy: cuda lingering kernel, us after the early decision (mean of %lld steps timed): block 0's "
                "update done %.2f, every block's %.2f, the next request seen %.2f, its pieces relayed %.2f, the release %.2f; after the "
                "release: the next early decision %.2f, the last block's rows read %.2f, their products %.2f, block 0 "
                "past the copy's barrier %.2f; the host's batch staged %.2f us after it saw the result\n",
                t[FU_LG_TIMES - 1], k * (double)t[0], k * (double)t[8], k * (double)t[1], k * (double)t[2], k * (double)t[3],
                k * (double)t[4], k * (double)t[5], k * (double)t[6], k * (double)t[7],
                g->lg_stages ? 1e-3 * (double)g->lg_stage_ns / (double)g->lg_stages : 0.0);
    }
    /* the host's staging: each piece's flag and each staging task's start, us after the result
     * (only where a lingering kernel took a staged step: no stagings, no figures) */
    if (g->lg_stages) {
        fprintf(stderr, "mpscy: cuda lingering kernel, the host's staging, us after it saw the result: pieces flagged");
        for (int k = 0; k < CU_STAGE_STAMPS; k++) {
            if (k == CU_STAGE_MAX_PIECES) fprintf(stderr, "; tasks started");
            if (g->lg_stamp_ns[k])
                fprintf(stderr, " %d:%.2f", k % CU_STAGE_MAX_PIECES, 1e-3 * (double)g->lg_stamp_ns[k] / (double)g->lg_stages);
        }
        fprintf(stderr, "\n");
    }
    cudaGetLastError();
}

const char *cu_fused_form(const cu_graph *g, char *buf, size_t n) {
    if (!g->fu) return "separate kernels";
    const cu_fused *f = g->fu;
    int kw = 0;
    const int q = f->ws_floats ? fu_slices(f, g->plan.batch, &kw) : 0;
    int k = snprintf(buf, n, "one kernel, %s:%d", f->cluster ? "cluster" : "grid", f->blocks);
    if (q && k > 0 && (size_t)k < n)  /* the full batch's slices */
        k += snprintf(buf + k, n - (size_t)k, ", layer 0 in the copy (%d slices of %d inputs)", q, kw);
    if (f->a.wrow && k > 0 && (size_t)k < n)
        k += snprintf(buf + k, n - (size_t)k, ", rows by %d warp%s each", f->a.wrow, f->a.wrow > 1 ? "s" : "");
    if (f->linger_ns && k > 0 && (size_t)k < n)
        snprintf(buf + k, n - (size_t)k, ", lingering %llu us for the next step%s", f->linger_ns / 1000ull,
                 f->a.prefetch ? ", relaying its pieces meanwhile" : "");
    return buf;
}
