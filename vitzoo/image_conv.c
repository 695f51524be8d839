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

/* n_out consecutive outputs of one output row, one 16-channel block (weights wb: 27 x 16, tap-major), every tap
   inside the image: rows[r] is the window's input row r (a row of zeros above or below the image), ix0 the first
   output's window column; o: the first output's channels, n the output's pixel stride. */
#define STRIDED_RUN(S)                                                                                      \
    static void run_stride##S(const float *const *rows, int ix0, int n_out, const float *wb, __m512 bias,    \
                              int relu, __mmask16 lanes, float *o, int64_t n) {                             \
        EACH_TAP(LOAD_WEIGHT)                                                                               \
        const float *p0 = rows[0] + ix0, *p1 = rows[1] + ix0, *p2 = rows[2] + ix0, *p3 = rows[3] + ix0,     \
                    *p4 = rows[4] + ix0, *p5 = rows[5] + ix0, *p6 = rows[6] + ix0, *p7 = rows[7] + ix0,     \
                    *p8 = rows[8] + ix0;                                                                    \
        for (int i = 0; i < n_out; ++i) {                                                                   \
            __m512 acc = bias;                                                                              \
            EACH_TAP(TAP)                                                                                   \
            if (relu) acc = _mm512_max_ps(_mm512_setzero_ps(), acc);                                        \
            _mm512_mask_storeu_ps(o + i * n, lanes, acc);                                                   \
            p0 += S, p1 += S, p2 += S, p3 += S, p4 += S, p5 += S, p6 += S, p7 += S, p8 += S;               \
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
    int left = 0, right = ow; /* outputs [left, right) have all three columns inside */
    while (left < ow && left * stride - pad < 0) ++left;
    while (right > left && (right - 1) * stride - pad + 2 >= w) --right;
    const int blocks = (n + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (int row = 0; row < batch * oh; ++row) {
        const int b = row / oh, oy = row % oh;
        const float *rows[9];
        for (int c = 0; c < 3; ++c)
            for (int ky = 0; ky < 3; ++ky) {
                const int iy = oy * stride - pad + ky;
                const int inside = iy >= 0 && iy < h;
                rows[3 * c + ky] = inside ? x + (int64_t)b * sb + (int64_t)c * sc + (int64_t)iy * sh : zeros;
            }
        float *o = out + (int64_t)row * ow * n;
        for (int blk = 0; blk < blocks; ++blk) {
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
    free(zeros);
    return 0;
}
