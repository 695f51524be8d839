/*
 * vitzoo: a model's first convolution, 3x3 over a 3-channel image, read straight from the NCHW image into a
 * channels-last output; AVX-512, IEEE fp32 arithmetic.
 *
 *   out[b, oy, ox, n] = act( bias[n] + sum_{c, ky, kx} x[b, c, iy, ix] * w[n, c, ky, kx] )
 *
 * with iy = oy * stride - pad + ky (likewise ix), taps outside the image counting as zero, act the identity or
 * ReLU; one fused multiply-add per tap, in the order (c, ky, kx), after the bias. Sixteen output channels are one
 * vector; the 27 weight vectors of a 16-channel block stay in registers while the kernel walks along an output row,
 * each tap a broadcast input value. Reading NCHW saves deploy()'s channels-last copy of the input, which for
 * SHViT-S1 at batch 16 took 40% as long as oneDNN's convolution itself (docs/benchmarks.md section 9).
 *
 * Compiled on first use by vitzoo/image_conv.py (vitzoo/native_build.py), loaded with ctypes. OpenMP threads are
 * torch's. Written for vitzoo.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static __mmask16 first_lanes(int count) {
    if (count >= 16) return (__mmask16)0xFFFF;
    return count <= 0 ? 0 : (__mmask16)((1u << count) - 1u);
}

/* X(t, r, kx) for the 27 taps t = 3 r + kx, r = 3 c + ky the window's input row (channel c, row ky) */
#define EACH_TAP(X)                                                                                         \
    X(0, 0, 0) X(1, 0, 1) X(2, 0, 2) X(3, 1, 0) X(4, 1, 1) X(5, 1, 2) X(6, 2, 0) X(7, 2, 1) X(8, 2, 2)     \
    X(9, 3, 0) X(10, 3, 1) X(11, 3, 2) X(12, 4, 0) X(13, 4, 1) X(14, 4, 2) X(15, 5, 0) X(16, 5, 1)         \
    X(17, 5, 2) X(18, 6, 0) X(19, 6, 1) X(20, 6, 2) X(21, 7, 0) X(22, 7, 1) X(23, 7, 2) X(24, 8, 0)        \
    X(25, 8, 1) X(26, 8, 2)
#define LOAD_WEIGHT(t, r, kx) const __m512 w##t = _mm512_loadu_ps(wb + 16 * (t));
#define TAP(t, r, kx) acc = _mm512_fmadd_ps(_mm512_set1_ps(p##r[(kx)]), w##t, acc);
#define TAP_TWO(t, r, kx)                                                                                   \
    acc = _mm512_fmadd_ps(_mm512_set1_ps(p##r[(kx)]), w##t, acc);                                           \
    next = _mm512_fmadd_ps(_mm512_set1_ps(p##r[(kx) + step]), w##t, next);

/* n_out consecutive outputs of one output row, one 16-channel block (weights wb: 27 x 16, tap-major), every tap
   inside the image: rows[r] is the window's input row r (a row of zeros above or below the image), ix0 the first
   output's window column; o: the first output's channels, n the output's pixel stride. Two outputs at a time:
   their two chains of 27 dependent multiply-adds interleave (one chain at a time waited on each multiply-add's
   latency: 1.15-1.5x slower on SHViT-S1's 3 -> 16 convolution, docs/benchmarks.md section 13); each output's
   own order of operations stays, so the results are the same bit for bit. */
#define STRIDED_RUN(S)                                                                                      \
    static void run_stride##S(const float *const *rows, int ix0, int n_out, const float *wb, __m512 bias,    \
                              int relu, __mmask16 lanes, float *o, int64_t n) {                             \
        EACH_TAP(LOAD_WEIGHT)                                                                               \
        const float *p0 = rows[0] + ix0, *p1 = rows[1] + ix0, *p2 = rows[2] + ix0, *p3 = rows[3] + ix0,     \
                    *p4 = rows[4] + ix0, *p5 = rows[5] + ix0, *p6 = rows[6] + ix0, *p7 = rows[7] + ix0,     \
                    *p8 = rows[8] + ix0;                                                                    \
        const int step = S;                                                                                 \
        int i = 0;                                                                                          \
        for (; i + 2 <= n_out; i += 2) {                                                                    \
            __m512 acc = bias, next = bias;                                                                 \
            EACH_TAP(TAP_TWO)                                                                               \
            if (relu) {                                                                                     \
                acc = _mm512_max_ps(_mm512_setzero_ps(), acc);                                              \
                next = _mm512_max_ps(_mm512_setzero_ps(), next);                                            \
            }                                                                                               \
            _mm512_mask_storeu_ps(o + i * n, lanes, acc);                                                   \
            _mm512_mask_storeu_ps(o + (i + 1) * n, lanes, next);                                            \
            p0 += 2 * S, p1 += 2 * S, p2 += 2 * S, p3 += 2 * S, p4 += 2 * S, p5 += 2 * S, p6 += 2 * S,      \
                p7 += 2 * S, p8 += 2 * S;                                                                   \
        }                                                                                                   \
        if (i < n_out) {                                                                                    \
            __m512 acc = bias;                                                                              \
            EACH_TAP(TAP)                                                                                   \
            if (relu) acc = _mm512_max_ps(_mm512_setzero_ps(), acc);                                        \
            _mm512_mask_storeu_ps(o + i * n, lanes, acc);                                                   \
        }                                                                                                   \
    }
STRIDED_RUN(1)
STRIDED_RUN(2)

/* one output pixel with column checks (the left and right borders). A tap left or right of the image multiplies 0,
   as the row of zeros does above and below it: 0 * inf = NaN for an infinite or NaN weight, as in fp32 (skipping
   such taps gave finite outputs in the border columns only; found by an audit). */
static void border_pixel(const float *const *rows, int ix0, int w, const float *wb, __m512 bias, int relu,
                         __mmask16 lanes, float *o) {
    __m512 acc = bias;
    for (int r = 0; r < 9; ++r)
        for (int kx = 0; kx < 3; ++kx) {
            const int ix = ix0 + kx;
            const float value = ix >= 0 && ix < w ? rows[r][ix] : 0.0f;
            acc = _mm512_fmadd_ps(_mm512_set1_ps(value), _mm512_loadu_ps(wb + 16 * (3 * r + kx)), acc);
        }
    if (relu) acc = _mm512_max_ps(_mm512_setzero_ps(), acc);
    _mm512_mask_storeu_ps(o, lanes, acc);
}

/* the columns [left, right) of outputs whose three input columns all lie inside a row of width w */
static void inner_columns(int w, int stride, int pad, int ow, int *left, int *right) {
    int l = 0, r = ow;
    while (l < ow && l * stride - pad < 0) ++l;
    while (r > l && (r - 1) * stride - pad + 2 >= w) --r;
    *left = l, *right = r;
}

/* output row oy of image b, all its channel blocks; o: the row's first pixel, n channels per pixel (its stride) */
static void image_row(const float *x, int64_t sb, int64_t sc, int64_t sh, int b, int oy, int h, int w, int stride,
                      int pad, int ow, int left, int right, const float *weight, const float *bias, int n, int relu,
                      const float *zeros, float *o) {
    const float *rows[9];
    for (int c = 0; c < 3; ++c)
        for (int ky = 0; ky < 3; ++ky) {
            const int iy = oy * stride - pad + ky;
            const int inside = iy >= 0 && iy < h;
            rows[3 * c + ky] = inside ? x + (int64_t)b * sb + (int64_t)c * sc + (int64_t)iy * sh : zeros;
        }
    for (int blk = 0; blk < (n + 15) / 16; ++blk) {
        const float *wb = weight + (int64_t)blk * 27 * 16;
        const __m512 bv = _mm512_loadu_ps(bias + 16 * blk);
        const __mmask16 lanes = first_lanes(n - 16 * blk);
        float *ob = o + 16 * blk;
        for (int ox = 0; ox < left; ++ox)
            border_pixel(rows, ox * stride - pad, w, wb, bv, relu, lanes, ob + (int64_t)ox * n);
        if (right > left) {
            if (stride == 1)
                run_stride1(rows, left - pad, right - left, wb, bv, relu, lanes, ob + (int64_t)left * n, n);
            else
                run_stride2(rows, left * 2 - pad, right - left, wb, bv, relu, lanes, ob + (int64_t)left * n, n);
        }
        for (int ox = right > left ? right : left; ox < ow; ++ox)
            border_pixel(rows, ox * stride - pad, w, wb, bv, relu, lanes, ob + (int64_t)ox * n);
    }
}

/*
 * x: fp32 (batch, 3, h, w) with strides (sb, sc, sh, 1); weight: the (n, 3, 3, 3) weight as (ceil(n / 16), 27,
 * 16) fp32, zero-padded (tap t = 9 c + 3 ky + kx); bias: ceil(n / 16) * 16 floats (zeros if the conv has none);
 * out: contiguous channels-last (batch, n, oh, ow). Returns 0; -1 if the row of zeros could not be allocated; -2
 * for a stride other than 1 or 2 (the caller runs those elsewhere).
 */
int vitzoo_image_conv3x3(const float *x, int64_t sb, int64_t sc, int64_t sh, int batch, int h, int w, int stride,
                        int pad, int oh, int ow, const float *weight, const float *bias, int n, int relu, float *out,
                        int threads) {
    if (stride != 1 && stride != 2) return -2;
    float *zeros = calloc((size_t)w + 4, sizeof(float));
    if (!zeros) return -1;
    int left, right;
    inner_columns(w, stride, pad, ow, &left, &right);
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (int row = 0; row < batch * oh; ++row)
        image_row(x, sb, sc, sh, row / oh, row % oh, h, w, stride, pad, ow, left, right, weight, bias, n, relu,
                  zeros, out + (int64_t)row * ow * n);
    free(zeros);
    return 0;
}

/*
 * The second convolution of a stem, fused: 3x3, stride 2, padding 1, from the first one's 16 channels into n2 (a
 * multiple of 16), read from a band of the first convolution's output rows that one thread has just computed, so
 * that the first convolution's output (the stem's largest activation) never leaves the core's cache.
 *
 * A band row holds w1 + 2 pixels of 16 floats: a zero pixel, the first convolution's w1 output pixels, a zero
 * pixel (the second convolution's padding columns). weight2 is the (n2, 16, 3, 3) weight as (3, 3, 16, n2): for
 * each tap and input channel, the n2 output channels' weights in a row. One output pixel is V vectors of 16
 * output channels; a tile is P consecutive pixels of a row, its P x V sums in registers while the 144 (tap, input
 * channel) products are added in that order, each a broadcast input value times V weight vectors.
 */
#define PAIR_TILE(P, V)                                                                                     \
    static void tile_##P##_##V(const float *const *rows, int ox0, const float *w2, int n2, const float *bias, \
                               int relu, float *o) {                                                        \
        __m512 acc[P][V];                                                                                   \
        _Pragma("GCC unroll 16") for (int p = 0; p < P; ++p)                                                \
            _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) acc[p][v] = _mm512_loadu_ps(bias + 16 * v); \
        for (int t = 0; t < 9; ++t) {                                                                       \
            const float *in = rows[t / 3] + (int64_t)(2 * ox0 + t % 3) * 16;                                \
            const float *wt = w2 + (int64_t)t * 16 * n2;                                                    \
            for (int ic = 0; ic < 16; ++ic) {                                                               \
                __m512 wv[V];                                                                               \
                _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v)                                         \
                    wv[v] = _mm512_loadu_ps(wt + (int64_t)ic * n2 + 16 * v);                                \
                _Pragma("GCC unroll 16") for (int p = 0; p < P; ++p) {                                      \
                    const __m512 value = _mm512_set1_ps(in[32 * p + ic]);                                   \
                    _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v)                                     \
                        acc[p][v] = _mm512_fmadd_ps(value, wv[v], acc[p][v]);                               \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
        _Pragma("GCC unroll 16") for (int p = 0; p < P; ++p)                                                \
            _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) {                                           \
                __m512 r = acc[p][v];                                                                       \
                if (relu) r = _mm512_max_ps(_mm512_setzero_ps(), r);                                        \
                _mm512_storeu_ps(o + (int64_t)p * n2 + 16 * v, r);                                          \
            }                                                                                               \
    }
PAIR_TILE(12, 2)
PAIR_TILE(4, 2)
PAIR_TILE(1, 2)
PAIR_TILE(12, 1)
PAIR_TILE(4, 1)
PAIR_TILE(1, 1)

/* one output row of the second convolution: rows[ky] the band rows of its three input rows */
static void pair_row(const float *const *rows, int ow2, const float *w2, int n2, const float *bias2, int relu2,
                     float *o) {
    for (int c0 = 0; c0 < n2; c0 += 32) {
        const int two = n2 - c0 >= 32;
        const float *wc = w2 + c0, *bc = bias2 + c0;
        float *oc = o + c0;
        int ox = 0;
        for (; ox + 12 <= ow2; ox += 12)
            (two ? tile_12_2 : tile_12_1)(rows, ox, wc, n2, bc, relu2, oc + (int64_t)ox * n2);
        for (; ox + 4 <= ow2; ox += 4)
            (two ? tile_4_2 : tile_4_1)(rows, ox, wc, n2, bc, relu2, oc + (int64_t)ox * n2);
        for (; ox < ow2; ++ox)
            (two ? tile_1_2 : tile_1_1)(rows, ox, wc, n2, bc, relu2, oc + (int64_t)ox * n2);
    }
}

/*
 * relu2?(conv2(relu1?(conv1(x)))): conv1 as vitzoo_image_conv3x3 with 16 output channels (oh1 x ow1), conv2 as
 * above (n2 channels, oh2 x ow2); out: contiguous channels-last (batch, n2, oh2, ow2). Work items are bands of
 * `band` output rows of one image, shared out to the threads as they come free; a band computes the 2 band + 1
 * rows of conv1 it reads (the row between two bands twice). Returns 0; -1 if a buffer could not be allocated; -2
 * for a stride other than 1 or 2, n2 not a positive multiple of 16, or band < 1.
 */
int vitzoo_image_conv_pair(const float *x, int64_t sb, int64_t sc, int64_t sh, int batch, int h, int w, int stride,
                           int pad, int oh1, int ow1, const float *weight1, const float *bias1, int relu1,
                           int oh2, int ow2, const float *weight2, const float *bias2, int n2, int relu2, int band,
                           float *out, int threads) {
    if ((stride != 1 && stride != 2) || n2 % 16 != 0 || n2 <= 0 || band < 1) return -2;
    float *zeros = calloc((size_t)w + 4, sizeof(float));
    if (!zeros) return -1;
    int left, right;
    inner_columns(w, stride, pad, ow1, &left, &right);
    const int bands = (oh2 + band - 1) / band;
    const int64_t row_floats = (int64_t)(ow1 + 2) * 16, rows_per_band = 2 * (int64_t)band + 1;
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        float *buffer = calloc((size_t)(rows_per_band * row_floats), sizeof(float));
        if (!buffer) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < (int64_t)batch * bands; ++item) {
            if (!buffer) continue;
            const int b = (int)(item / bands), oy0 = (int)(item % bands) * band;
            const int oy_end = oy0 + band < oh2 ? oy0 + band : oh2;
            const int y_first = 2 * oy0 - 1, y_last = 2 * (oy_end - 1) + 1; /* conv1 rows read */
            for (int y = y_first; y <= y_last; ++y) {
                float *row = buffer + (y - y_first) * row_floats;
                if (y < 0 || y >= oh1)
                    memset(row, 0, (size_t)row_floats * sizeof(float));
                else
                    image_row(x, sb, sc, sh, b, y, h, w, stride, pad, ow1, left, right, weight1, bias1, 16, relu1,
                              zeros, row + 16);
            }
            for (int oy = oy0; oy < oy_end; ++oy) {
                const float *rows[3];
                for (int ky = 0; ky < 3; ++ky) rows[ky] = buffer + (2 * (oy - oy0) + ky) * row_floats;
                pair_row(rows, ow2, weight2, n2, bias2, relu2, out + ((int64_t)b * oh2 + oy) * ow2 * n2);
            }
        }
        free(buffer);
    }
    free(zeros);
    return failed ? -1 : 0;
}
