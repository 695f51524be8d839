/*
 * SHViT's single-head attention (SHSA) between its two 1x1 convolutions, on channels-last fp32 tensors, with AVX-512:
 *
 *   vitzoo_group_norm1: GroupNorm with one group (statistics over all channels and pixels of a sample)
 *                       on the attention's channel slice, written as a contiguous channels-last tensor;
 *   vitzoo_shsa_mix:    out = act(cat[softmax(q k^T * scale) v, x2]) per image, act ReLU or none, from the qkv
 *                       convolution's output (pixels of 2 * qk + pdim channels: q, k, v) and the untouched channels x2.
 *
 * In PyTorch these are about a dozen ATen calls per block (split, group_norm, transposes, two bmm, mul, softmax,
 * cat, relu), each with its own dispatch, allocation and fixed split of the work between threads; here they are two
 * calls whose work items (a sample; a block of QUERY_BLOCK queries of one image) go to whichever thread is free.
 * IEEE fp32 arithmetic; exp is a polynomial (within ~2 ulp), with fp32's denormals below e^-87.
 *
 * Compiled on first use by vitzoo/shsa_kernel.py, loaded with ctypes. OpenMP threads are torch's (the same libgomp).
 * Written for vitzoo.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { QUERY_BLOCK = 64, QUERY_GROUP = 4 };

static __mmask16 first_lanes(int count) {
    if (count >= 16) return (__mmask16)0xFFFF;
    return count <= 0 ? 0 : (__mmask16)((1u << count) - 1u);
}

/* exp of 16 lanes that are <= 0 (a softmax's x - max): 2^n * p(r), x = n ln2 + r, down into fp32's denormals
   (scalef) and 0 below them, as expf; -inf gives 0. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-110.0f)); /* exp(-110) is 0 in fp32; keeps n and r finite */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x); /* ln 2 in two parts */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* out = (x - centre) * a + b over `count` channels (a, b per channel), or out = x where a is NULL; ReLU optional. */
static void scale_shift(const float *x, float centre, const float *a, const float *b, int count, int relu,
                        float *out) {
    const __m512 shift = _mm512_set1_ps(centre);
    for (int c = 0; c < count; c += 16) {
        const __mmask16 lanes = first_lanes(count - c);
        __m512 v = _mm512_maskz_loadu_ps(lanes, x + c);
        if (a)
            v = _mm512_fmadd_ps(_mm512_sub_ps(v, shift), _mm512_maskz_loadu_ps(lanes, a + c),
                                _mm512_maskz_loadu_ps(lanes, b + c));
        if (relu) v = _mm512_max_ps(_mm512_setzero_ps(), v); /* a NaN v: max returns its 2nd operand, NaN */
        _mm512_mask_storeu_ps(out + c, lanes, v);
    }
}

/* Sum over a sample's pixels and channels of x - centre (squares = 0) or of (x - centre)^2 (squares = 1): each
   pixel's channels summed in one fp32 vector, the pixels' vectors in double. A centre near the values keeps the fp32
   sums exact for a sample of nearly equal values (x = 2.06e6 throughout: summed as they are, the mean was off by
   ~0.1, and the variance below 0). */
static double sample_sum(const float *x, int64_t sp, int pixels, int channels, float centre, int squares) {
    __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
    const __m512 shift = _mm512_set1_ps(centre);
    for (int p = 0; p < pixels; ++p) {
        const float *row = x + (int64_t)p * sp;
        __m512 v = _mm512_setzero_ps();
        for (int c = 0; c < channels; c += 16) {
            const __mmask16 lanes = first_lanes(channels - c);
            const __m512 e = _mm512_maskz_loadu_ps(lanes, row + c);
            if (squares) {
                const __m512 d = _mm512_maskz_sub_ps(lanes, e, shift);
                v = _mm512_fmadd_ps(d, d, v);
            } else {
                v = _mm512_add_ps(v, _mm512_maskz_sub_ps(lanes, e, shift));
            }
        }
        lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
        hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}

/*
 * GroupNorm(1) of x: (batch, channels, pixels) with strides (sb, 1, sp), i.e. a channels-last tensor or a channel
 * slice of one; out: contiguous channels-last (batch, pixels, channels). Mean and (biased) variance per sample,
 * two passes of sample_sum (centred on the first value, then on the mean); then out = (x - mean) (w rstd) + b per
 * channel, the mean taken off each value first (folded into one multiply-add, x (w rstd) + (b - mean w rstd), the
 * two terms grow with the values and cancel: 2.06e6 throughout came out ~4 off). Returns 0, or -1 if memory ran
 * out.
 */
int vitzoo_group_norm1(const float *x, int64_t sb, int64_t sp, int batch, int pixels, int channels, const float *w,
                       const float *b, float eps, float *out, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        float *ab = (float *)malloc((size_t)2 * channels * sizeof(float));
        if (!ab) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int s = 0; s < batch; ++s) {
            if (!ab) continue;
            const float *xs = x + (int64_t)s * sb;
            const double count = (double)pixels * channels;
            const double mean = xs[0] + sample_sum(xs, sp, pixels, channels, xs[0], 0) / count;
            const float centre = (float)mean; /* its rounding is taken back out of the variance below */
            const double off = (double)centre - mean;
            double squares = sample_sum(xs, sp, pixels, channels, centre, 1) - count * off * off;
            if (squares < 0.0) squares = 0.0; /* rounding, for a sample of (nearly) equal values */
            const double rstd = 1.0 / sqrt(squares / count + (double)eps);
            for (int c = 0; c < channels; ++c) { /* (x - mean) w rstd + b as (x - centre) a + (b + off a) */
                ab[c] = (float)(w[c] * rstd);
                ab[channels + c] = (float)(b[c] + off * w[c] * rstd);
            }
            for (int p = 0; p < pixels; ++p)
                scale_shift(xs + (int64_t)p * sp, centre, ab, ab + channels, channels, 0,
                            out + ((int64_t)s * pixels + p) * channels);
        }
        free(ab);
    }
    return failed ? -1 : 0;
}

/* Softmax of one row of scores (n valid of n_pad, the rest ignored) in place; returns 1 / the sum of its exps, or
   NaN where torch's softmax gives NaN throughout: a NaN score, or a largest score that is infinite (inf - inf). */
static float softmax_row(float *scores, int n, int n_pad) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (int m = 0; m < n_pad; m += 16) {
        const __m512 s = _mm512_load_ps(scores + m);
        const __mmask16 lanes = first_lanes(n - m);
        nan |= _mm512_mask_cmp_ps_mask(lanes, s, s, _CMP_UNORD_Q);
        top = _mm512_mask_max_ps(top, lanes, top, s);
    }
    const float largest = _mm512_reduce_max_ps(top);
    if (nan || !isfinite(largest)) return NAN;
    __m512 total = _mm512_setzero_ps();
    for (int m = 0; m < n_pad; m += 16) {
        const __m512 e = _mm512_maskz_mov_ps(first_lanes(n - m), exp16(_mm512_sub_ps(_mm512_load_ps(scores + m),
                                                                                      _mm512_set1_ps(largest))));
        total = _mm512_add_ps(total, e);
        _mm512_store_ps(scores + m, e);
    }
    return 1.0f / _mm512_reduce_add_ps(total);
}

/* Queries [q0, q1) of one image, QUERY_GROUP at a time (independent accumulators, each key and value loaded once per
   group). qkv: its pixels (row stride sq) of q (qk), k (qk), v (pdim); kt: k transposed, (qk, n_pad); scores:
   QUERY_GROUP rows of n_pad floats; out: its pixels (row stride so), the first pdim channels written. */
static void attend(const float *qkv, int64_t sq, int n, int n_pad, int qk, int pdim, float scale, const float *kt,
                   float *scores, int q0, int q1, int relu, float *out, int64_t so) {
    const __m512 scaled = _mm512_set1_ps(scale);
    const float *values = qkv + 2 * qk;
    for (int g = q0; g < q1; g += QUERY_GROUP) {
        /* a last group of fewer queries repeats its last one, so that every loop below has a fixed length and its
           accumulators stay in registers; only `count` rows are stored */
        const int count = q1 - g < QUERY_GROUP ? q1 - g : QUERY_GROUP;
        const float *query[QUERY_GROUP];
        float inverse[QUERY_GROUP];
        for (int i = 0; i < QUERY_GROUP; ++i) query[i] = qkv + (int64_t)(g + (i < count ? i : count - 1)) * sq;
        for (int m = 0; m < n_pad; m += 16) {
            __m512 s[QUERY_GROUP];
            for (int i = 0; i < QUERY_GROUP; ++i) s[i] = _mm512_setzero_ps();
            for (int d = 0; d < qk; ++d) {
                const __m512 key = _mm512_load_ps(kt + (int64_t)d * n_pad + m);
                for (int i = 0; i < QUERY_GROUP; ++i) s[i] = _mm512_fmadd_ps(_mm512_set1_ps(query[i][d]), key, s[i]);
            }
            for (int i = 0; i < QUERY_GROUP; ++i)
                _mm512_store_ps(scores + (int64_t)i * n_pad + m, _mm512_mul_ps(s[i], scaled));
        }
        for (int i = 0; i < QUERY_GROUP; ++i) inverse[i] = softmax_row(scores + (int64_t)i * n_pad, n, n_pad);
        for (int c0 = 0; c0 < pdim; c0 += 32) {
            const __mmask16 l0 = first_lanes(pdim - c0), l1 = first_lanes(pdim - c0 - 16);
            __m512 a[QUERY_GROUP][2];
            for (int i = 0; i < QUERY_GROUP; ++i) a[i][0] = a[i][1] = _mm512_setzero_ps();
            if (l1) {
                for (int m = 0; m < n; ++m) {
                    const float *v = values + (int64_t)m * sq + c0;
                    const __m512 v0 = _mm512_maskz_loadu_ps(l0, v), v1 = _mm512_maskz_loadu_ps(l1, v + 16);
                    for (int i = 0; i < QUERY_GROUP; ++i) {
                        const __m512 p = _mm512_set1_ps(scores[(int64_t)i * n_pad + m]);
                        a[i][0] = _mm512_fmadd_ps(p, v0, a[i][0]);
                        a[i][1] = _mm512_fmadd_ps(p, v1, a[i][1]);
                    }
                }
            } else { /* the last 16 channels or fewer: one vector */
                for (int m = 0; m < n; ++m) {
                    const __m512 v0 = _mm512_maskz_loadu_ps(l0, values + (int64_t)m * sq + c0);
                    for (int i = 0; i < QUERY_GROUP; ++i)
                        a[i][0] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(int64_t)i * n_pad + m]), v0, a[i][0]);
                }
            }
            for (int i = 0; i < count; ++i) {
                float *row = out + (int64_t)(g + i) * so + c0;
                for (int h = 0; h < 2; ++h) {
                    __m512 r = _mm512_mul_ps(a[i][h], _mm512_set1_ps(inverse[i])); /* NaN rows stay NaN */
                    if (relu) r = _mm512_max_ps(_mm512_setzero_ps(), r);
                    _mm512_mask_storeu_ps(row + 16 * h, h ? l1 : l0, r);
                }
            }
        }
    }
}

/*
 * out = act(cat[softmax(q k^T * scale) v, x2]) for every image; act is ReLU if relu, else none.
 * qkv: (batch, 2 qk + pdim, pixels) with strides (sqb, 1, sq); x2: (batch, rest, pixels) with strides (sxb, 1, sx),
 * may be NULL when rest is 0; out: contiguous channels-last (batch, pixels, pdim + rest). Returns 0, or -1 if memory
 * ran out.
 */
int vitzoo_shsa_mix(const float *qkv, int64_t sqb, int64_t sq, const float *x2, int64_t sxb, int64_t sx, int batch,
                    int n, int qk, int pdim, int rest, float scale, int relu, float *out, int threads) {
    const int n_pad = (n + 15) / 16 * 16, blocks = (n + QUERY_BLOCK - 1) / QUERY_BLOCK;
    const int64_t so = (int64_t)pdim + rest;
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        /* this thread's k transposed (qk rows of n_pad) and QUERY_GROUP rows of scores */
        float *kt = (float *)aligned_alloc(64, (size_t)(qk + QUERY_GROUP) * n_pad * sizeof(float));
        if (!kt) {
#pragma omp atomic write
            failed = 1;
        }
        int image = -1;
#pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < batch * blocks; ++item) {
            if (!kt) continue;
            const int s = item / blocks, q0 = item % blocks * QUERY_BLOCK, q1 = q0 + QUERY_BLOCK < n ? q0 + QUERY_BLOCK : n;
            const float *tokens = qkv + (int64_t)s * sqb;
            if (s != image) {
                memset(kt, 0, (size_t)qk * n_pad * sizeof(float));
                for (int m = 0; m < n; ++m)
                    for (int d = 0; d < qk; ++d) kt[(int64_t)d * n_pad + m] = tokens[(int64_t)m * sq + qk + d];
                image = s;
            }
            float *image_out = out + (int64_t)s * n * so;
            attend(tokens, sq, n, n_pad, qk, pdim, scale, kt, kt + (int64_t)qk * n_pad, q0, q1, relu, image_out, so);
            if (rest > 0)
                for (int p = q0; p < q1; ++p)
                    scale_shift(x2 + (int64_t)s * sxb + (int64_t)p * sx, 0.0f, NULL, NULL, rest, relu,
                                image_out + (int64_t)p * so + pdim);
        }
        free(kt);
    }
    return failed ? -1 : 0;
}
