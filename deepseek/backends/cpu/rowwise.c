/* Element-wise and per-row float32 kernels of the CPU backend that PyTorch runs in
 * several passes: the tanh GELU (one pass, where ATen's tanh is slow on AVX2), the
 * residual add + layer norm of transformers (one kernel writing both the sum and the
 * normalized rows), per-tensor and per-row (dynamic) quantization and the de-quantized
 * result of an int8 GEMM. 8-wide GCC/Clang vectors; built by native.py.
 */
#include <math.h>

#include "simd.h"

/* erf(x) by Abramowitz and Stegun 7.1.26 (absolute error under 2e-7 in float32) */
INLINE v8 verf(v8 x) {
    v8 a = select(x < 0.f, -x, x);
    v8 t = 1.f / (1.f + 0.3275911f * a);
    v8 p = splat(1.061405429f);
    p = p * t - 1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t - 0.284496736f;
    p = p * t + 0.254829592f;
    v8 e = 1.f - p * t * vexp(-a * a);
    return select(x < 0.f, -e, e);
}

/* activations after a GEMM, by code: 0 none, 1 ReLU, 2 GELU (erf), 3 GELU (tanh) */
INLINE v8 activate(v8 v, int act) {
    if (act == 1)
        return vrelu(v);
    if (act == 2)
        return 0.5f * v * (1.f + verf(v * 0.70710678118654752f));
    if (act == 3) {
        const float c2 = 1.5957691216057308f, c3 = c2 * 0.044715f;
        return v / (1.f + vexp(-(v * (c2 + c3 * v * v))));
    }
    return v;
}

/* y = x * sigmoid(2u), 2u = x (2c + 2c 0.044715 x^2), c = sqrt(2 / pi): the tanh GELU
 * ((1 + tanh(u)) / 2 = sigmoid(2u)); y may be x */
void ds_gelu_tanh(const float *x, float *y, long n, int threads) {
    const long blocks = (n + 7) / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < blocks; i++) {
        int nv = n - i * 8 < 8 ? (int)(n - i * 8) : 8;
        store(y + i * 8, activate(load(x + i * 8, nv), 3), nv);
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

/* dynamic per-row (per-token) int8 quantization, the formulas of PyTorch's
 * quantized_decomposed choose_qparams_per_token(_asymmetric) + quantize_per_token:
 * symmetric: s = max(max|x|, 1e-5) / 127, zp = 0, q = clamp(rint(x * (1 / s)), -128, 127)
 * in float32; asymmetric: lo = min(min x, 0), hi = max(max x, 0), s = max((hi - lo) / 255,
 * FLT_EPSILON), zp = the rounded zero point PyTorch picks, q = clamp(rint(x * (1 / s) + zp),
 * -128, 127) as PyTorch computes it in float64 (s is float64 there: two roundings, no
 * FMA). Writes q + 128 as
 * uint8 (what oneDNN's int8 GEMM takes at full speed, its zero point 128), each row's
 * scale, zero point and the sum of its q (for the zero points' corrections). */
__attribute__((optimize("fp-contract=off")))
void ds_quantize_rows(const float *x, unsigned char *q, double *scale, int *zero_point,
                      int *rowsum, long rows, int cols, int symmetric, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < rows; i++) {
        const float *xi = x + i * cols;
        unsigned char *qi = q + i * cols;
        v8 vlo = {0}, vhi = {0}; /* the zeros of a partial load leave min(., 0), max(., 0) */
        for (int j = 0; j < cols; j += 8) {
            v8 v = load(xi + j, cols - j < 8 ? cols - j : 8);
            vlo = select(v < vlo, v, vlo);
            vhi = select(v > vhi, v, vhi);
        }
        float lo = 0.f, hi = 0.f;
        for (int l = 0; l < 8; l++) {
            lo = vlo[l] < lo ? vlo[l] : lo;
            hi = vhi[l] > hi ? vhi[l] : hi;
        }
        v8i sums = {0};
        if (symmetric) {
            float amax = -lo > hi ? -lo : hi;
            float s = (amax < 1e-5f ? 1e-5f : amax) / 127.f;
            const float inv = 1.f / s;
            const v8 shift = splat(12582912.f); /* 1.5 * 2^23: adding it rounds */
            for (int j = 0; j < cols; j += 8) {
                int nv = cols - j < 8 ? cols - j : 8;
                v8 v = load(xi + j, nv) * inv; /* |v| <= 127 (NaN aside) */
                v = (v + shift) - shift;
                v = select(v < -128.f, splat(-128.f), select(v > 127.f, splat(127.f), v));
                v8i iv = __builtin_convertvector(v, v8i);
                store_bytes(qi + j, iv + 128, nv);
                sums += iv; /* the lanes past nv loaded zeros */
            }
            scale[i] = s;
            zero_point[i] = 0;
        } else {
            const float eps = 1.1920928955078125e-07f;
            float s = (hi - lo) / 255.f;
            s = s < eps ? eps : s;
            float dlo = lo / s, dhi = hi / s;
            float zp = (-128.f + dlo) + (127.f + dhi) > 0.f ? -128.f - dlo : 127.f - dhi;
            zp = rintf(zp < -128.f ? -128.f : (zp > 127.f ? 127.f : zp));
            /* in float32 first: |x / s| <= 255 and |zp| <= 128, so x * (1 / s) + zp is
             * within 6.2e-5 of the exact value; where that is farther than 1e-4 from a
             * rounding boundary (n + 0.5), it rounds as PyTorch's float64 does; the few
             * lanes nearer one are computed in float64 */
            const float invf = 1.f / s;
            const v8 shift = splat(12582912.f); /* 1.5 * 2^23: adding it rounds */
            v8i near = {0};
            for (int j = 0; j < cols; j += 8) {
                int nv = cols - j < 8 ? cols - j : 8;
                v8 v = load(xi + j, nv) * invf;
                v = v + zp;
                v8 r = (v + shift) - shift;
                v8 d = v - r;
                near |= (d > 0.4999f) | (d < -0.4999f);
                r = select(r < -128.f, splat(-128.f), select(r > 127.f, splat(127.f), r));
                v8i iv = __builtin_convertvector(r, v8i);
                store_bytes(qi + j, iv + 128, nv);
                if (nv < 8) /* lanes past nv hold zp, not 0 */
                    for (int l = nv; l < 8; l++)
                        iv[l] = 0;
                sums += iv;
            }
            if (near[0] | near[1] | near[2] | near[3] | near[4] | near[5] | near[6] | near[7]) {
                const double inv = 1.0 / (double)s; /* rare: redo the near ones in float64 */
                for (int j = 0; j < cols; j += 8) {
                    int nv = cols - j < 8 ? cols - j : 8;
                    v8 v = load(xi + j, nv) * invf;
                    v = v + zp;
                    v8 d = v - ((v + shift) - shift);
                    v8i at = (d > 0.4999f) | (d < -0.4999f);
                    if (!(at[0] | at[1] | at[2] | at[3] | at[4] | at[5] | at[6] | at[7]))
                        continue;
                    for (int l = 0; l < nv; l++) {
                        if (!at[l])
                            continue;
                        double r = rint((double)xi[j + l] * inv + (double)zp);
                        int t = r < -128.0 ? -128 : (r > 127.0 ? 127 : (int)r);
                        sums[0] += t - ((int)qi[j + l] - 128);
                        qi[j + l] = (unsigned char)(t + 128);
                    }
                }
            }
            scale[i] = s;
            zero_point[i] = (int)zp;
        }
        int sum = 0;
        for (int l = 0; l < 8; l++)
            sum += sums[l];
        rowsum[i] = sum;
    }
}

/* the float result of an int8 GEMM over rows quantized by ds_quantize_rows: acc[m, n] is
 * sw[n] * sum_k q[m, k] w[n, k] (oneDNN's int8 GEMM with the weight's scales, in float32);
 * y[m, n] = act(sx[m] (acc - sw[n] (zx[m] colsum[n] + zw[n] (rowsum[m] - K zx[m]))) + b[n])
 * (the rows' and the weight's zero points taken out; act: see activate). sw, colsum and
 * zw (may be NULL) hold N floats, b N floats or NULL. y may be acc. */
void ds_dequantize_rows(const float *acc, float *y, const double *sx, const int *zx,
                        const int *rowsum, const float *sw, const float *colsum,
                        const float *zw, const float *b, long rows, int cols, int depth,
                        int act, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < rows; i++) {
        const float *ai = acc + i * cols;
        float *yi = y + i * cols;
        const float s = (float)sx[i], z = (float)zx[i];
        const float rz = (float)rowsum[i] - (float)depth * z;
        for (int j = 0; j < cols; j += 8) {
            int nv = cols - j < 8 ? cols - j : 8;
            v8 corr = z * load(colsum + j, nv);
            if (zw)
                corr += rz * load(zw + j, nv);
            v8 v = s * (load(ai + j, nv) - load(sw + j, nv) * corr);
            if (b)
                v += load(b + j, nv);
            store(yi + j, activate(v, act), nv);
        }
    }
}
