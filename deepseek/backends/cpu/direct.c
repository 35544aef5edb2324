/* Direct float32 convolution on NHWC (channels-last) memory for layers with few input
 * channels (a network's first layer), with bias, ReLU and a following 2x2 max pool
 * (stride 2) done as the output is written:
 *
 *   y[n][oy][ox][k] = relu(bias[k] + sum_{i,j,c} x[n][oy*sh + i - ph][ox*sw + j - pw][c]
 *                                                 * w[i][j][c][k])
 *
 * Two neighbouring output pixels go together, 32 output channels at a time in 8-wide
 * vector accumulators (one AVX2 register each), so each weight vector loaded feeds two
 * FMAs; input pixels outside the image (the padding) are skipped. With pool, the four
 * outputs of each 2x2 window are computed and the maximum written (ReLU and max commute).
 * The weight is [KH][KW][C][Kp], Kp = K rounded up to 8 with zero columns. Compiled on
 * first use by deepseek/backends/cpu/native.py.
 */
#include "simd.h"

struct conv {
    const float *x, *w, *bias;
    float *y;
    int H, W, C, Kp, KH, KW, sh, sw, ph, pw;
};

/* the nv accumulators (8 channels each) of output pixel (oy, ox), channels from kb */
INLINE void pixel(const struct conv *p, int KH, int KW, int C, int n, int oy, int ox, int kb,
                  int nv, v8 acc[8]) {
    for (int v = 0; v < nv; v++)
        acc[v] = p->bias ? load(p->bias + kb + 8 * v, 8) : (v8){0};
    const int y0 = oy * p->sh - p->ph, x0 = ox * p->sw - p->pw;
    /* the taps inside the image: all of them away from the border */
    const int i0 = y0 < 0 ? -y0 : 0, i1 = y0 + KH > p->H ? p->H - y0 : KH;
    const int j0 = x0 < 0 ? -x0 : 0, j1 = x0 + KW > p->W ? p->W - x0 : KW;
    const size_t row = (size_t)p->W * C;
    const float *base = p->x + (((size_t)n * p->H + y0) * p->W + x0) * C;
    for (int i = i0; i < i1; i++)
        for (int j = j0; j < j1; j++) {
            const float *xp = base + i * row + (size_t)j * C;
            const float *wp = p->w + ((size_t)(i * KW + j) * C) * p->Kp + kb;
            for (int c = 0; c < C; c++) {
                float a = xp[c];
                for (int v = 0; v < nv; v++)
                    acc[v] += a * load(wp + (size_t)c * p->Kp + 8 * v, 8);
            }
        }
}

/* output pixels (oy, ox) and (oy, ox + 1), both with every tap inside the image: one
 * weight load feeds two accumulators (one pixel's nv chains alone leave the FMA units
 * waiting on their latency) */
INLINE void pixel_pair(const struct conv *p, int KH, int KW, int C, int n, int oy, int ox,
                       int kb, int nv, v8 acc0[8], v8 acc1[8]) {
    for (int v = 0; v < nv; v++)
        acc0[v] = acc1[v] = p->bias ? load(p->bias + kb + 8 * v, 8) : (v8){0};
    const size_t row = (size_t)p->W * C, step = (size_t)p->sw * C;
    const float *base = p->x + (((size_t)n * p->H + oy * p->sh - p->ph) * p->W
                                + ox * p->sw - p->pw) * C;
    for (int i = 0; i < KH; i++)
        for (int j = 0; j < KW; j++) {
            const float *xp = base + i * row + (size_t)j * C;
            const float *wp = p->w + ((size_t)(i * KW + j) * C) * p->Kp + kb;
            for (int c = 0; c < C; c++) {
                float a0 = xp[c], a1 = xp[step + c];
                for (int v = 0; v < nv; v++) {
                    v8 wv = load(wp + (size_t)c * p->Kp + 8 * v, 8);
                    acc0[v] += a0 * wv;
                    acc1[v] += a1 * wv;
                }
            }
        }
}

/* whether output pixels (oy, ox) and (oy, ox + 1) read only inside the image */
INLINE int inside_pair(const struct conv *p, int KH, int KW, int oy, int ox) {
    int y0 = oy * p->sh - p->ph, x0 = ox * p->sw - p->pw;
    return y0 >= 0 && y0 + KH <= p->H && x0 >= 0 && x0 + p->sw + KW <= p->W;
}

INLINE void finish(v8 *r, int nv, int relu, int left, float *dst) {
    for (int v = 0; v < nv; v++) {
        v8 t = r[v];
        if (relu)
            t = vrelu(t);
        int n = left - 8 * v;
        store(dst + 8 * v, t, n < 8 ? n : 8);
    }
}

/* output position (oy, ox) (pooled with pool: the 2x2 window from (2oy, 2ox)), channels
 * [kb, kb + 8 nv) cut at K; without pool, with `pair` also (oy, ox + 1) into dst + K */
INLINE void block(const struct conv *p, int KH, int KW, int C, int n, int oy, int ox, int kb,
                  int nv, int K, int relu, int pool, int pair, float *dst) {
    v8 a[8], b[8];
    if (pool) {
        v8 best[8];
        for (int r = 0; r < 2; r++) {
            int y = 2 * oy + r, x = 2 * ox;
            if (inside_pair(p, KH, KW, y, x)) {
                pixel_pair(p, KH, KW, C, n, y, x, kb, nv, a, b);
            } else {
                pixel(p, KH, KW, C, n, y, x, kb, nv, a);
                pixel(p, KH, KW, C, n, y, x + 1, kb, nv, b);
            }
            for (int v = 0; v < nv; v++)
                best[v] = r ? vmax(best[v], vmax(a[v], b[v])) : vmax(a[v], b[v]);
        }
        finish(best, nv, relu, K - kb, dst);
    } else if (pair && inside_pair(p, KH, KW, oy, ox)) {
        pixel_pair(p, KH, KW, C, n, oy, ox, kb, nv, a, b);
        finish(a, nv, relu, K - kb, dst);
        finish(b, nv, relu, K - kb, dst + K);
    } else {
        pixel(p, KH, KW, C, n, oy, ox, kb, nv, a);
        finish(a, nv, relu, K - kb, dst);
        if (pair) {
            pixel(p, KH, KW, C, n, oy, ox + 1, kb, nv, b);
            finish(b, nv, relu, K - kb, dst + K);
        }
    }
}

/* all output positions (in pairs along a row without pool), channels in blocks of up to
 * 32 (the accumulator count a constant: registers, not memory); KH, KW, C constants where
 * the caller specializes */
INLINE void conv_all(const struct conv *p, int KH, int KW, int C, int N, int K, int YH, int YW,
                     int relu, int pool, int threads) {
    const int step = pool ? 1 : 2, cols = (YW + step - 1) / step;
    const long units = (long)N * YH * cols;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long t = 0; t < units; t++) {
        int n = (int)(t / ((long)YH * cols)), r = (int)(t % ((long)YH * cols));
        int oy = r / cols, ox = (r % cols) * step;
        int pair = !pool && ox + 1 < YW;
        float *dst = p->y + (((size_t)n * YH + oy) * YW + ox) * K;
        for (int kb = 0; kb < K; kb += 32) { /* 2 x 8 accumulators would spill: 2 x 4 */
            int nv = (K - kb + 7) / 8 > 4 ? 4 : (K - kb + 7) / 8;
#define BLOCK(NV) block(p, KH, KW, C, n, oy, ox, kb, NV, K, relu, pool, pair, dst + kb)
            switch (nv) {
            case 4: BLOCK(4); break;
            case 3: BLOCK(3); break;
            case 2: BLOCK(2); break;
            default: BLOCK(1); break;
            }
#undef BLOCK
        }
    }
}

/* y: NHWC [N][YH][YW][K], YH x YW the output size (the pooled size with pool); shape
 * holds N, H, W, C, K, KH, KW, sh, sw, ph, pw, YH, YW, relu, pool (one ctypes argument
 * instead of fifteen: each costs a few hundred nanoseconds a call) */
void ds_conv_direct(const float *x, const float *w, const float *bias, float *y,
                    const int *shape, int threads) {
    const int N = shape[0], H = shape[1], W = shape[2], C = shape[3], K = shape[4];
    const int KH = shape[5], KW = shape[6], sh = shape[7], sw = shape[8], ph = shape[9];
    const int pw = shape[10], YH = shape[11], YW = shape[12], relu = shape[13], pool = shape[14];
    const struct conv p = {x, w, bias, y, H, W, C, (K + 7) / 8 * 8, KH, KW, sh, sw, ph, pw};
    if (KH == 3 && KW == 3 && C == 1) /* a grey image's first layer (MNIST) */
        conv_all(&p, 3, 3, 1, N, K, YH, YW, relu, pool, threads);
    else if (KH == 3 && KW == 3 && C == 3) /* an RGB image's */
        conv_all(&p, 3, 3, 3, N, K, YH, YW, relu, pool, threads);
    else
        conv_all(&p, KH, KW, C, N, K, YH, YW, relu, pool, threads);
}
