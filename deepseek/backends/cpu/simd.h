/* 8-wide float vectors (one AVX2 register; two NEON ones) as GCC/Clang vector types,
 * shared by the CPU backend's C kernels. NaN handling follows PyTorch: ReLU and max
 * keep a NaN (torch.relu and max_pool2d propagate it). */
#ifndef DEEPSEEK_SIMD_H
#define DEEPSEEK_SIMD_H

#include <stddef.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

typedef float v8 __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

/* nv of 8 lanes (the rest zero). A constant-size copy is one vector move, so the full
 * width is spelled out: a variable size would call memcpy */
INLINE v8 load(const float *p, int nv) {
    v8 r = {0};
    if (nv == 8)
        memcpy(&r, p, sizeof r);
    else if (nv > 0)
        memcpy(&r, p, (size_t)nv * sizeof(float));
    return r;
}

INLINE void store(float *p, v8 r, int nv) {
    if (nv == 8)
        memcpy(p, &r, sizeof r);
    else if (nv > 0)
        memcpy(p, &r, (size_t)nv * sizeof(float));
}

INLINE v8 splat(float a) { return (v8){a, a, a, a, a, a, a, a}; }

/* lanes of a where m is all ones, of b elsewhere */
INLINE v8 select(v8i m, v8 a, v8 b) { return (v8)(((v8i)a & m) | ((v8i)b & ~m)); }

/* max(a, b), NaN if either is */
INLINE v8 vmax(v8 a, v8 b) { return select((a > b) | (a != a), a, b); }

/* max(a, 0), NaN where a is */
INLINE v8 vrelu(v8 a) { return select((a > 0.f) | (a != a), a, (v8){0}); }

/* exp(x): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-6 Taylor polynomial
 * (relative error under 4e-8), times 2^n built in the exponent bits; x over 88 gives
 * exp(88), under -87 (-inf too) gives 0 */
INLINE v8 vexp(v8 x) {
    v8i under = x < -87.f;
    x = select(x <= 88.f, x, splat(88.f));
    x = select(under, splat(-87.f), x);
    const v8 shift = splat(12582912.f); /* 1.5 * 2^23: adding it rounds to an integer */
    v8 n = (x * 1.44269504088896341f + shift) - shift;
    v8 r = x - n * 0.693359375f - n * -2.12194440e-4f; /* ln 2 in two parts */
    v8 p = splat(1.f / 720);
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
    return select(under, (v8){0}, p * (v8)bits);
}

#endif
