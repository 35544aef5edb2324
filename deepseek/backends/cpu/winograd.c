/* Winograd F(4x4, 3x3) and F(2x2, 3x3) transforms for float32 3x3 convolutions (stride
 * 1, dilation 1) on NHWC (channels-last) memory; the GEMM between them is the caller's
 * (one batched GEMM over the A = (m + 2)^2 transform points of an m x m output tile:
 * M[A][T][K] = V[A][T][C] @ U[A][C][K]).
 *
 * An (m + 2)^2 input tile d gives V = B^T d B, a tile of M gives the m x m output
 * A^T M A (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015;
 * F(4x4, 3x3) with interpolation points 0, +-1, +-2). Tiles cover the output in steps
 * of m; input pixels outside the image (the padding) read as zeros, output pixels past
 * its edge are not written. A following 2x2 max pool can be done as the output is written. Channels go 8 at a time as GCC/Clang vectors (one AVX2
 * register; two NEON ones); the last C % 8 channels go through the same code on a
 * zero-padded copy. Compiled on first use by deepseek/backends/cpu/native.py.
 */
#include "simd.h"

/* t[k * ts] = (B^T s)[k], k < m + 2, for s[k] at s[k * ss] */
INLINE void bt(int m, v8 *t, int ts, const v8 *s, int ss) {
    if (m == 4) {
        v8 s0 = s[0], s1 = s[ss], s2 = s[2 * ss], s3 = s[3 * ss], s4 = s[4 * ss], s5 = s[5 * ss];
        t[0] = 4.f * s0 - 5.f * s2 + s4;
        t[1 * ts] = -4.f * (s1 + s2) + s3 + s4;
        t[2 * ts] = 4.f * (s1 - s2) - s3 + s4;
        t[3 * ts] = 2.f * (s3 - s1) - s2 + s4;
        t[4 * ts] = 2.f * (s1 - s3) - s2 + s4;
        t[5 * ts] = 4.f * s1 - 5.f * s3 + s5;
    } else {
        v8 s0 = s[0], s1 = s[ss], s2 = s[2 * ss], s3 = s[3 * ss];
        t[0] = s0 - s2;
        t[1 * ts] = s1 + s2;
        t[2 * ts] = s2 - s1;
        t[3 * ts] = s1 - s3;
    }
}

/* t[k * ts] = (A^T s)[k], k < m, for s[k] at s[k * ss] */
INLINE void at(int m, v8 *t, int ts, const v8 *s, int ss) {
    if (m == 4) {
        v8 s0 = s[0], s1 = s[ss], s2 = s[2 * ss], s3 = s[3 * ss], s4 = s[4 * ss], s5 = s[5 * ss];
        v8 a = s1 + s2, b = s1 - s2, c = s3 + s4, d = s3 - s4;
        t[0] = s0 + a + c;
        t[1 * ts] = b + 2.f * d;
        t[2 * ts] = a + 4.f * c;
        t[3 * ts] = b + 8.f * d + s5;
    } else {
        v8 s0 = s[0], s1 = s[ss], s2 = s[2 * ss], s3 = s[3 * ss];
        t[0] = s0 + s1 + s2;
        t[1 * ts] = s1 - s2 - s3;
    }
}

/* one input tile, channels [c, c + nv): rows[p] is pixel p's channel vector or NULL;
 * V[i][j] goes to out + (i * (m + 2) + j) * stride */
INLINE void input_block(int m, const float *const *rows, int c, float *out, size_t stride,
                        int nv) {
    const int a = m + 2;
    v8 d[36], u[36];
    for (int p = 0; p < a * a; p++)
        d[p] = rows[p] ? load(rows[p] + c, nv) : (v8){0};
    for (int j = 0; j < a; j++) /* columns: u[.][j] = B^T d[.][j] */
        bt(m, u + j, a, d + j, a);
    for (int i = 0; i < a; i++) { /* rows: V[i][.] = B^T u[i][.] */
        v8 t[6];
        bt(m, t, 1, u + i * a, 1);
        for (int j = 0; j < a; j++)
            store(out + (size_t)(i * a + j) * stride, t[j], nv);
    }
}

/* x: NHWC [N][H][W][C]; V: [(m + 2)^2][T][C], the matrices `stride` floats apart, with
 * T = N * tH * tW tiles (row-major over n, ty, tx) */
INLINE void input_tiles(int m, const float *x, float *V, long stride, int N, int H, int W,
                        int C, int pad_h, int pad_w, int tH, int tW, int threads) {
    const int a = m + 2;
    const long T = (long)N * tH * tW;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long t = 0; t < T; t++) {
        int n = (int)(t / ((long)tH * tW)), r = (int)(t % ((long)tH * tW));
        int y0 = (r / tW) * m - pad_h, x0 = (r % tW) * m - pad_w;
        const float *rows[36];
        for (int i = 0; i < a; i++)
            for (int j = 0; j < a; j++) {
                int yy = y0 + i, xx = x0 + j;
                rows[i * a + j] = (yy >= 0 && yy < H && xx >= 0 && xx < W)
                                      ? x + (((size_t)n * H + yy) * W + xx) * C
                                      : NULL;
            }
        float *out = V + (size_t)t * C;
        int c = 0;
        for (; c + 8 <= C; c += 8)
            input_block(m, rows, c, out + c, (size_t)stride, 8);
        if (c < C)
            input_block(m, rows, c, out + c, (size_t)stride, C - c);
    }
}

/* one output tile, channels [k, k + nv): m_in is M's row for the tile ((m + 2)^2 points,
 * stride apart); y is the tile's first output pixel, pixels K floats apart, rows pitch
 * apart; only the tile's first oh rows and ow columns lie inside the image. With pool,
 * each 2x2 block of the tile becomes its maximum, one pixel of the pooled output (y the
 * tile's first pooled pixel, pitch the pooled row), and a last odd row or column is
 * dropped (floor, as max_pool2d's default) */
INLINE void output_block(int m, const float *m_in, size_t stride, const float *bias, int relu,
                         int pool, float *y, size_t K, size_t pitch, int oh, int ow, int nv) {
    const int a = m + 2;
    v8 s[36], u[24], o[4][4];
    for (int p = 0; p < a * a; p++)
        s[p] = load(m_in + (size_t)p * stride, nv);
    for (int j = 0; j < a; j++) /* columns: u[.][j] = A^T s[.][j] */
        at(m, u + j, a, s + j, a);
    v8 add = bias ? load(bias, nv) : (v8){0};
    for (int p = 0; p < oh; p++) /* rows: o[p][.] = A^T u[p][.] */
        at(m, o[p], 1, u + p * a, 1);
    int step = pool ? 2 : 1;
    for (int p = 0; p + step <= oh; p += step)
        for (int q = 0; q + step <= ow; q += step) {
            v8 r = o[p][q];
            if (pool) {
                r = vmax(vmax(r, o[p][q + 1]), vmax(o[p + 1][q], o[p + 1][q + 1]));
            }
            r += add; /* after the max: the bias is the same for the four */
            if (relu)
                r = vrelu(r);
            store(y + (p / step) * pitch + (q / step) * K, r, nv);
        }
}

/* M: [(m + 2)^2][T][K], `stride` floats apart (T tiles as for the input); the convolution
 * is OH x OW; y: NHWC [N][OH][OW][K], or with pool [N][OH / 2][OW / 2][K]; bias: K floats
 * or NULL; relu: clamp the result at 0 */
INLINE void output_tiles(int m, const float *M, long stride, const float *bias, float *y, int N,
                         int OH, int OW, int K, int tH, int tW, int relu, int pool,
                         int threads) {
    const long T = (long)N * tH * tW;
    const int YH = pool ? OH / 2 : OH, YW = pool ? OW / 2 : OW, f = pool ? 2 : 1;
    const size_t pitch = (size_t)YW * K;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long t = 0; t < T; t++) {
        int n = (int)(t / ((long)tH * tW)), r = (int)(t % ((long)tH * tW));
        int y0 = (r / tW) * m, x0 = (r % tW) * m;
        int oh = OH - y0 < m ? OH - y0 : m, ow = OW - x0 < m ? OW - x0 : m;
        if (oh < f || ow < f)
            continue; /* an odd last row or column, dropped by the pool */
        const float *src = M + (size_t)t * K;
        float *dst = y + (((size_t)n * YH + y0 / f) * YW + x0 / f) * K;
        int k = 0;
        for (; k + 8 <= K; k += 8)
            output_block(m, src + k, (size_t)stride, bias ? bias + k : NULL, relu, pool, dst + k,
                         K, pitch, oh, ow, 8);
        if (k < K)
            output_block(m, src + k, (size_t)stride, bias ? bias + k : NULL, relu, pool, dst + k,
                         K, pitch, oh, ow, K - k);
    }
}

/* the exported kernels: one specialization per tile size m (4: F(4x4, 3x3); else 2) */
void ds_wino_input(int m, const float *x, float *V, long stride, int N, int H, int W, int C,
                   int pad_h, int pad_w, int tH, int tW, int threads) {
    if (m == 4)
        input_tiles(4, x, V, stride, N, H, W, C, pad_h, pad_w, tH, tW, threads);
    else
        input_tiles(2, x, V, stride, N, H, W, C, pad_h, pad_w, tH, tW, threads);
}

void ds_wino_output(int m, const float *M, long stride, const float *bias, float *y, int N,
                    int OH, int OW, int K, int tH, int tW, int relu, int pool, int threads) {
    if (m == 4)
        output_tiles(4, M, stride, bias, y, N, OH, OW, K, tH, tW, relu, pool, threads);
    else
        output_tiles(2, M, stride, bias, y, N, OH, OW, K, tH, tW, relu, pool, threads);
}
