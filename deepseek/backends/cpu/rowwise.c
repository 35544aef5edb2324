/* Element-wise and per-row float32 kernels of the CPU backend that PyTorch runs in
 * several passes: the tanh GELU (one pass, where ATen's tanh is slow on AVX2) and the
 * residual add + layer norm of transformers (one kernel writing both the sum and the
 * normalized rows). 8-wide GCC/Clang vectors; built by native.py.
 */
#include "simd.h"

/* y = x * sigmoid(2u), 2u = x (2c + 2c 0.044715 x^2), c = sqrt(2 / pi): the tanh GELU
 * ((1 + tanh(u)) / 2 = sigmoid(2u)); y may be x */
void ds_gelu_tanh(const float *x, float *y, long n, int threads) {
    const float c2 = 1.5957691216057308f, c3 = c2 * 0.044715f;
    const long blocks = (n + 7) / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < blocks; i++) {
        int nv = n - i * 8 < 8 ? (int)(n - i * 8) : 8;
        v8 v = load(x + i * 8, nv);
        v8 z = v * (c2 + c3 * v * v);
        store(y + i * 8, v / (1.f + vexp(-z)), nv);
    }
}

/* per row of cols floats: s = x + r; y = (s - mean) / sqrt(var + eps) * w + b (w, b may
 * be NULL); the mean first, then the variance around it (two passes over s, in cache) */
void ds_add_layer_norm(const float *x, const float *r, const float *w, const float *b,
                       float *s, float *y, long rows, int cols, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < rows; i++) {
        const float *xi = x + i * cols, *ri = r + i * cols;
        float *si = s + i * cols, *yi = y + i * cols;
        v8 acc = {0};
        for (int j = 0; j < cols; j += 8) {
            int nv = cols - j < 8 ? cols - j : 8;
            v8 t = load(xi + j, nv) + load(ri + j, nv);
            store(si + j, t, nv);
            acc += t;
        }
        float mean = 0.f;
        for (int v = 0; v < 8; v++)
            mean += acc[v];
        mean /= cols;
        v8 sq = {0};
        for (int j = 0; j < cols; j += 8) {
            int nv = cols - j < 8 ? cols - j : 8;
            v8 d = load(si + j, nv) - mean;
            if (nv < 8) /* the lanes past the row read zeros: not part of the variance */
                for (int v = nv; v < 8; v++)
                    d[v] = 0.f;
            sq += d * d;
        }
        float var = 0.f;
        for (int v = 0; v < 8; v++)
            var += sq[v];
        float rstd = 1.f / __builtin_sqrtf(var / cols + eps); /* sqrtss: no errno */
        for (int j = 0; j < cols; j += 8) {
            int nv = cols - j < 8 ? cols - j : 8;
            v8 t = (load(si + j, nv) - mean) * rstd;
            if (w)
                t *= load(w + j, nv);
            if (b)
                t += load(b + j, nv);
            store(yi + j, t, nv);
        }
    }
}

typedef unsigned char v32b __attribute__((vector_size(32)));

/* the low byte of each of 8 ints, in order (two byte shuffles and a permute on AVX2) */
INLINE void store_bytes(unsigned char *q, v8i iv, int nv) {
#ifdef __clang__
    v32b b = __builtin_shufflevector((v32b)iv, (v32b)iv, 0, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0,
                                     0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
#else
    v32b b = __builtin_shuffle((v32b)iv, (v32b){0, 4, 8, 12, 16, 20, 24, 28});
#endif
    if (nv == 8)
        memcpy(q, &b, 8);
    else
        memcpy(q, &b, (size_t)nv);
}

/* q = clamp(rint(x * inv) + zp, qmin, qmax) for nv of 8 lanes (see ds_quantize) */
INLINE void quantize8(const float *x, unsigned char *q, int nv, float inv, float zp,
                      float qmin, float qmax) {
    const v8 lo = splat(qmin - zp - 1.f), hi = splat(qmax - zp + 1.f);
    const v8 shift = splat(12582912.f);
    v8 v = load(x, nv) * inv;
    v = select(v < lo, lo, select(v > hi, hi, v)); /* a NaN stays NaN */
    v = (v + shift) - shift + zp;
    v = select(v < qmin, splat(qmin), select(v > qmax, splat(qmax), v));
    store_bytes(q, __builtin_convertvector(v, v8i), nv);
}

/* per-tensor quantization: q = clamp(rint(x * inv) + zp, qmin, qmax) as bytes (the bits of
 * a uint8 or an int8), x * inv in float32 and rint rounding half to even, as PyTorch's
 * mul by a float scalar, round_, add_ and clamp_ do; x is first clamped a step beyond the
 * range, which leaves the result as it is and keeps |x * inv| far below 2^22, where adding
 * and subtracting 1.5 * 2^23 rounds to an integer */
void ds_quantize(const float *x, unsigned char *q, long n, float inv, float zp, float qmin,
                 float qmax, int threads) {
    const long full = n / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < full; i++)
        quantize8(x + i * 8, q + i * 8, 8, inv, zp, qmin, qmax);
    if (n % 8)
        quantize8(x + full * 8, q + full * 8, (int)(n % 8), inv, zp, qmin, qmax);
}
