/* Fused fp32 CPU kernels for the eager training step: SwiGLU's gate and RMSNorm, each way in one pass
 * over its rows where torch composes 2-6 passes (multiar/engine/cpu_kernels.py builds, loads and measures
 * them). Rows are split over nt OpenMP threads; within a row the compiler vectorizes, expf through glibc's
 * vector math (libmvec) by the simd declaration below. Plain C: no torch headers, so it builds in ~0.5 s. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#ifdef MULTIAR_VECTOR_EXPF
__attribute__((simd("notinbranch"))) float expf(float);
#endif

/* gate_up (n, 2h): gate | up per row. out (n, h) = silu(gate) * up */
void swiglu_forward(const float *gate_up, float *out, int64_t n, int64_t h, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < n; r++) {
        const float *g = gate_up + r * 2 * h, *u = g + h;
        float *o = out + r * h;
#pragma omp simd
        for (int64_t j = 0; j < h; j++) o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    }
}

/* grad (n, h) -> d (n, 2h): d_gate = grad * up * silu'(gate), d_up = grad * silu(gate);
 * silu'(x) = s (1 + x (1 - s)), s = sigmoid(x), recomputed here rather than saved by the forward */
void swiglu_backward(const float *grad, const float *gate_up, float *d, int64_t n, int64_t h, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < n; r++) {
        const float *g = gate_up + r * 2 * h, *u = g + h, *dy = grad + r * h;
        float *dg = d + r * 2 * h, *du = dg + h;
#pragma omp simd
        for (int64_t j = 0; j < h; j++) {
            float x = g[j], s = 1.0f / (1.0f + expf(-x));
            du[j] = dy[j] * x * s;
            dg[j] = dy[j] * u[j] * s * (1.0f + x * (1.0f - s));
        }
    }
}

/* x (n, c) -> y = x * rstd * w, rstd (n) = 1 / sqrt(mean(x^2) + eps) */
void rms_norm_forward(const float *x, const float *w, float *y, float *rstd, int64_t n, int64_t c,
                      float eps, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * c;
        float *yr = y + r * c, squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t j = 0; j < c; j++) squares += xr[j] * xr[j];
        float s = 1.0f / sqrtf(squares / (float)c + eps);
        rstd[r] = s;
#pragma omp simd
        for (int64_t j = 0; j < c; j++) yr[j] = xr[j] * s * w[j];
    }
}

/* dx = rstd (g w - xhat mean(g w xhat)), xhat = x rstd; dw = sum over rows of g xhat, each thread's
 * rows summed into its own row of partial (nt, c), then those nt rows */
void rms_norm_backward(const float *grad, const float *x, const float *w, const float *rstd, float *dx,
                       float *dw, float *partial, int64_t n, int64_t c, int nt) {
    memset(partial, 0, sizeof(float) * (size_t)nt * (size_t)c);
#pragma omp parallel num_threads(nt)
    {
        float *p = partial + (int64_t)omp_get_thread_num() * c;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            const float *gr = grad + r * c, *xr = x + r * c;
            float *dr = dx + r * c, s = rstd[r], dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < c; j++) {
                dot += gr[j] * w[j] * xr[j];
                p[j] += gr[j] * xr[j] * s;
            }
            float k = dot * s * s / (float)c;
#pragma omp simd
            for (int64_t j = 0; j < c; j++) dr[j] = s * (gr[j] * w[j] - xr[j] * k);
        }
    }
    for (int64_t j = 0; j < c; j++) {
        float sum = 0.0f;
        for (int t = 0; t < nt; t++) sum += partial[(int64_t)t * c + j];
        dw[j] = sum;
    }
}
