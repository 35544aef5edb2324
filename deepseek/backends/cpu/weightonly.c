/* Linear layers with weight-only quantized weights (int8, or int4 two a byte), read and
 * converted to float in registers as they stream from memory: the float32 weight is never
 * formed. For the few rows of x of autoregressive decoding, where a float32 GEMV is
 * bound by the memory traffic of its weight. */
#include "simd.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

typedef signed char v8c __attribute__((vector_size(8)));
typedef unsigned char v4u __attribute__((vector_size(4)));
typedef unsigned char v8u __attribute__((vector_size(8)));

/* 8 weights of a row from column k as floats: int8, or 4-bit two a byte (stored q + 8;
 * column 2j in the low nibble of byte j, as quantization.kernels.pack_int4 packs them) */
INLINE v8 weights8(const signed char *w, long k, int bits) {
    if (bits == 8) {
#ifdef __AVX2__ /* sign-extend, convert: two instructions (GCC's generic form goes lane
                 * by lane) */
        const __m128i q = _mm_loadl_epi64((const __m128i *)(w + k));
        return (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
#else
        v8c q;
        memcpy(&q, w + k, 8);
        return __builtin_convertvector(__builtin_convertvector(q, v8i), v8);
#endif
    }
#ifdef __AVX2__ /* low and high nibbles interleaved, widened, minus the offset of 8 */
    int word;
    memcpy(&word, w + k / 2, 4);
    const __m128i b = _mm_cvtsi32_si128(word), mask = _mm_set1_epi8(15);
    const __m128i nib = _mm_unpacklo_epi8(_mm_and_si128(b, mask),
                                          _mm_and_si128(_mm_srli_epi16(b, 4), mask));
    return (v8)_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(nib),
                                                   _mm256_set1_epi32(8)));
#else
    v4u b;
    memcpy(&b, w + k / 2, 4);
    v8u d = __builtin_shufflevector(b, b, 0, 0, 1, 1, 2, 2, 3, 3);
    v8i v = __builtin_convertvector(d, v8i);
    v = (v >> (v8i){0, 4, 0, 4, 0, 4, 0, 4}) & 15;
    return __builtin_convertvector(v - 8, v8);
#endif
}

INLINE float hsum(v8 a) {
    float s = 0.f;
    for (int i = 0; i < 8; i++) s += a[i];
    return s;
}

/* one weight row against mt (constant after inlining) rows of x: per group, the vector
 * dot products scaled into one vector sum per row; the zero points' share (z s sum(x))
 * subtracted as scalars; one horizontal sum per row at the end */
INLINE void row(const float *x, const signed char *w, const float *scale, const float *zp,
                const float *xsum, float *out, long k, int bits, long group, long groups,
                const int mt) {
    v8 tot[4] = {{0}};
    float corr[4] = {0};
    for (long g = 0; g < groups; g++) {
        v8 a0[4] = {{0}}, a1[4] = {{0}};
        long kk = g * group;
        const long end = kk + group;
        for (; kk + 16 <= end; kk += 16) {
            const v8 w0 = weights8(w, kk, bits), w1 = weights8(w, kk + 8, bits);
            for (int r = 0; r < mt; r++) {
                a0[r] += load(x + r * k + kk, 8) * w0;
                a1[r] += load(x + r * k + kk + 8, 8) * w1;
            }
        }
        for (; kk < end; kk += 8) {
            const v8 w0 = weights8(w, kk, bits);
            for (int r = 0; r < mt; r++)
                a0[r] += load(x + r * k + kk, 8) * w0;
        }
        const float s = scale[g];
        for (int r = 0; r < mt; r++)
            tot[r] += (a0[r] + a1[r]) * s;
        if (zp)
            for (int r = 0; r < mt; r++)
                corr[r] += s * zp[g] * xsum[r * groups + g];
    }
    for (int r = 0; r < mt; r++) out[r] = hsum(tot[r]) - corr[r];
}

/* y[m, n] = sum over groups g of scale[n, g] * sum_{k in g} x[m, k] * (q[n, k] - zp[n, g])
 * + bias[n], for weight-only quantized linears at few rows (decoding): x (m, k) float32
 * row-major; q (n, k) int8, or (n, k / 2) 4-bit; groups of `group` columns (k: one per
 * row), scale and zp (n, k / group) with row stride sn (0: one value for the tensor);
 * zp and bias may be NULL; xsum (m, k / group) the sums of x over each group. k and group
 * multiples of 8. The weight streams from memory once per 4 rows of x, as bytes (or
 * nibbles): a quarter (an eighth) of a float32 weight's traffic. */
void ds_linear_wonly(const float *x, const signed char *q, const float *scale,
                     const float *zp, const float *xsum, const float *bias, float *y,
                     long m, long n, long k, int bits, long group, long sn, int threads) {
    const long groups = k / group, qrow = bits == 8 ? k : k / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long j = 0; j < n; j++) {
        const signed char *w = q + j * qrow;
        const float *s = scale + j * sn, *z = zp ? zp + j * sn : 0;
        for (long m0 = 0; m0 < m; m0 += 4) {
            float out[4];
            const long left = m - m0;
            const float *xr = x + m0 * k, *xs = xsum + m0 * groups;
            if (left >= 4) row(xr, w, s, z, xs, out, k, bits, group, groups, 4);
            else if (left == 3) row(xr, w, s, z, xs, out, k, bits, group, groups, 3);
            else if (left == 2) row(xr, w, s, z, xs, out, k, bits, group, groups, 2);
            else row(xr, w, s, z, xs, out, k, bits, group, groups, 1);
            for (int r = 0; r < (left < 4 ? left : 4); r++)
                y[(m0 + r) * n + j] = out[r] + (bias ? bias[j] : 0.f);
        }
    }
}
