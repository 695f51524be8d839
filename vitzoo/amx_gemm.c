/*
 * vitzoo: fp32 matrix product in split-bfloat16 ("bf16x3") on Intel AMX tiles.
 *
 *   C[m, n] = act( sum_k A[m, k] * W[n, k] + bias[n] + R[m, n] )        (act: identity or ReLU)
 *
 * Each fp32 operand x is split into two bfloat16 numbers, hi = bf16(x) and lo = bf16(x - hi), so that hi + lo
 * carries ~16 of fp32's 24 mantissa bits. The product is accumulated in fp32 from three bf16 products,
 * A_hi W_hi + A_hi W_lo + A_lo W_hi (A_lo W_lo, below fp32's rounding of the sum, is left out). The products of two
 * bf16 numbers are exact in fp32, so the error comes from the splits: about 1e-5 relative, against fp32's 1e-7.
 *
 * Compiled on first use by vitzoo/amx_gemm.py (which documents the layouts), loaded with ctypes. OpenMP threads
 * are torch's (the same libgomp is already loaded when this library is opened). Written for vitzoo; see
 * docs/deploy.md for where it is used and docs/benchmarks.md for measurements.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

enum { TILE_ROWS = 16, TILE_K = 32, BLOCK_M = 32, BLOCK_N = 32, B_TILE_ELEMS = TILE_ROWS * TILE_K };

/* Ask the kernel for the AMX tile state; 0 on success. Permission is per process. */
int vitzoo_amx_request(void) {
    return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
}

typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* All eight tiles 16 rows x 64 bytes: C tiles hold 16x16 fp32, A tiles 16x32 bf16, B tiles 16 pairs x 16 bf16x2. */
static void configure_tiles(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = TILE_ROWS;
    }
    _tile_loadconfig(&cfg);
}

static __mmask16 first_lanes(int count) {
    if (count >= 16) return (__mmask16)0xFFFF;
    return count <= 0 ? 0 : (__mmask16)((1u << count) - 1u);
}

/* Where the rows of A come from: a plain fp32 matrix (row stride lda), or the im2col rows of a convolution on a
   channels-last input (one row per output pixel, columns ordered (ky, kx, channel); never materialised). */
typedef struct {
    const float *a;
    int64_t lda;
    int m, k, kp;
    int conv; /* 0: plain matrix; 1: convolution */
    int64_t sb, sh, sw; /* input strides of batch, row, column (channel stride 1) */
    int h, w, cin, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, oh, ow;
} a_source;


/* Row `index` of a convolution's im2col matrix into `row` (k floats; zeros where the window leaves the input). */
static void gather_conv_row(const a_source *src, int index, float *row) {
    const int ox = index % src->ow, rest = index / src->ow, oy = rest % src->oh, b = rest / src->oh;
    const float *base = src->a + (int64_t)b * src->sb;
    float *out = row;
    for (int ky = 0; ky < src->kh; ++ky) {
        const int iy = oy * src->stride_h - src->pad_h + ky * src->dil_h;
        for (int kx = 0; kx < src->kw; ++kx, out += src->cin) {
            const int ix = ox * src->stride_w - src->pad_w + kx * src->dil_w;
            if (iy < 0 || iy >= src->h || ix < 0 || ix >= src->w) {
                memset(out, 0, (size_t)src->cin * sizeof(float));
                continue;
            }
            memcpy(out, base + (int64_t)iy * src->sh + (int64_t)ix * src->sw, (size_t)src->cin * sizeof(float));
        }
    }
}

/* 16 floats (the masked-off lanes read as 0) into their bf16 hi and lo parts. hi is x rounded to nearest even,
   except where that rounds a finite x past the bf16 maximum (|x| >= ~3.396e38), where it is x truncated, so that
   hi + lo stays finite; lo is 0 for infinite x (inf - inf would be NaN). NaN gives NaN parts, as fp32 would. */
static void split16(const float *from, __mmask16 lanes, uint16_t *h, uint16_t *l) {
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), infinity = _mm512_set1_epi32(0x7F800000);
    const __m512 x = _mm512_maskz_loadu_ps(lanes, from);
    const __m512i bits = _mm512_castps_si512(x);
    const __mmask16 x_inf = _mm512_cmpeq_epi32_mask(_mm512_and_si512(bits, magnitude), infinity);
    __m256i xh = (__m256i)_mm512_cvtneps_pbh(x);
    __m512i xh32 = _mm512_slli_epi32(_mm512_cvtepu16_epi32(xh), 16);
    const __mmask16 overflow = _mm512_cmpeq_epi32_mask(_mm512_and_si512(xh32, magnitude), infinity) & ~x_inf;
    if (overflow) {
        xh32 = _mm512_mask_and_epi32(xh32, overflow, bits, _mm512_set1_epi32((int)0xFFFF0000u));
        xh = _mm512_cvtepi32_epi16(_mm512_srli_epi32(xh32, 16));
    }
    const __m512 rest = _mm512_maskz_sub_ps(~x_inf, x, _mm512_castsi512_ps(xh32));
    _mm256_storeu_si256((__m256i *)h, xh);
    _mm256_storeu_si256((__m256i *)l, (__m256i)_mm512_cvtneps_pbh(rest));
}

static void split_row(const float *row, int k, int kp, uint16_t *h, uint16_t *l) {
    for (int c = 0; c < kp; c += 16) split16(row + c, first_lanes(k - c), h + c, l + c);
}

/* The same as gather_conv_row + split_row for a channel count that is a multiple of 16: each window position's
   channels are whole 16-lane vectors of the row, split straight from the input. */
static void split_conv_row16(const a_source *src, int index, uint16_t *h, uint16_t *l) {
    const int ox = index % src->ow, rest = index / src->ow, oy = rest % src->oh, b = rest / src->oh;
    const float *base = src->a + (int64_t)b * src->sb;
    int col = 0;
    for (int ky = 0; ky < src->kh; ++ky) {
        const int iy = oy * src->stride_h - src->pad_h + ky * src->dil_h;
        for (int kx = 0; kx < src->kw; ++kx) {
            const int ix = ox * src->stride_w - src->pad_w + kx * src->dil_w;
            const int inside = iy >= 0 && iy < src->h && ix >= 0 && ix < src->w;
            const float *from = inside ? base + (int64_t)iy * src->sh + (int64_t)ix * src->sw : src->a;
            for (int c = 0; c < src->cin; c += 16, col += 16)
                split16(from + c, inside ? (__mmask16)0xFFFF : 0, h + col, l + col);
        }
    }
    for (; col < src->kp; col += 16) split16(src->a, 0, h + col, l + col);
}

/* Rows [row0, row0 + BLOCK_M) of A as bf16 hi / lo panels of row stride kp (zero beyond k, and zero rows beyond
   m); `scratch` holds kp floats for a gathered convolution row. */
static void split_panel(const a_source *src, int row0, uint16_t *hi, uint16_t *lo, float *scratch) {
    for (int r = 0; r < BLOCK_M; ++r) {
        uint16_t *h = hi + (int64_t)r * src->kp, *l = lo + (int64_t)r * src->kp;
        if (row0 + r >= src->m) {
            memset(h, 0, (size_t)src->kp * 2);
            memset(l, 0, (size_t)src->kp * 2);
        } else if (src->conv && src->cin % 16 == 0) {
            split_conv_row16(src, row0 + r, h, l);
        } else if (src->conv) {
            gather_conv_row(src, row0 + r, scratch);
            split_row(scratch, src->k, src->kp, h, l);
        } else {
            split_row(src->a + (int64_t)(row0 + r) * src->lda, src->k, src->kp, h, l);
        }
    }
}

static inline float bf16_value(uint16_t bits) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)bits << 16;
    return v.f;
}

/* Whether a split row holds a NaN (hi is NaN exactly for a NaN input: see split16). */
static int has_nan(const uint16_t *h, int kp) {
    const __m512i magnitude = _mm512_set1_epi16(0x7FFF), infinity = _mm512_set1_epi16(0x7F80);
    for (int c = 0; c < kp; c += 32) {
        const __m512i v = _mm512_loadu_si512((const void *)(h + c));
        if (_mm512_cmpgt_epu16_mask(_mm512_and_si512(v, magnitude), infinity)) return 1;
    }
    return 0;
}

/* One output row computed with plain fp32 products of hi + lo, for a row whose split products are not finite:
 * - an input row holding an infinity: the split products would give inf * 0 = NaN wherever a weight's lo part is 0,
 *   where IEEE fp32 gives inf; this gives what fp32 gives (NaN only where the infinity meets a zero weight);
 * - finite operands whose hi x hi product rounds past the fp32 maximum although the product itself does not
 *   (|a w| within ~2^-8 of it): the split gave inf, or NaN where two such products cancel, where fp32 gives a
 *   finite value (found by an audit: [1.8446e19, 1.8446e19] . [1.8446e19, -1.8446e19] gave NaN, fp32 gives 0).
 * Rare, so not vectorised. */
static void row_in_fp32(const uint16_t *h, const uint16_t *l, int kp, const uint16_t *whi, const uint16_t *wlo,
                        int n, int row, const float *bias, const float *res, int64_t ldr, int relu, float *c,
                        int64_t ldc) {
    const int kb = kp / TILE_K;
    for (int col = 0; col < n; ++col) {
        float sum = 0.0f;
        for (int k = 0; k < kp; ++k) {
            const int64_t at = ((int64_t)(col / 16) * kb + k / TILE_K) * B_TILE_ELEMS + (k % TILE_K) / 2 * 32 +
                               (col % 16) * 2 + k % 2;
            sum += (bf16_value(h[k]) + bf16_value(l[k])) * (bf16_value(whi[at]) + bf16_value(wlo[at]));
        }
        if (bias) sum += bias[col];
        if (res) sum += res[(int64_t)row * ldr + col];
        if (relu && sum < 0.0f) sum = 0.0f;  /* a NaN stays NaN, as in torch.relu */
        c[(int64_t)row * ldc + col] = sum;
    }
}

/* C = act(A W^T + bias + R) for one BLOCK_M x BLOCK_N block (2 x 2 tiles), panels already split. */
static void block_product(const uint16_t *ahi, const uint16_t *alo, int kp, const uint16_t *bhi, const uint16_t *blo,
                          int kb) {
    const int64_t a_stride = (int64_t)kp * 2, a_next = (int64_t)TILE_ROWS * kp, b_next = (int64_t)kb * B_TILE_ELEMS;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
/* A tiles (4, 5: the block's two 16-row halves) from a panel, B tiles (6, 7: its two 16-column strips), and the
   four products of the 2 x 2 block, C[i][j] += A[i] B[j] (tiles 0-3), at k step s of block_product. */
#define LOAD_A(panel)                                 \
    do {                                              \
        _tile_loadd(4, (panel) + ka, a_stride);          \
        _tile_loadd(5, (panel) + a_next + ka, a_stride); \
    } while (0)
#define LOAD_B(tiles)                                 \
    do {                                              \
        _tile_loadd(6, (tiles) + kw, 64);              \
        _tile_loadd(7, (tiles) + b_next + kw, 64);     \
    } while (0)
#define PRODUCTS_2X2()                                \
    do {                                              \
        _tile_dpbf16ps(0, 4, 6);                       \
        _tile_dpbf16ps(1, 4, 7);                       \
        _tile_dpbf16ps(2, 5, 6);                       \
        _tile_dpbf16ps(3, 5, 7);                       \
    } while (0)
    for (int s = 0; s < kb; ++s) {
        const int64_t ka = (int64_t)s * TILE_K, kw = (int64_t)s * B_TILE_ELEMS;
        LOAD_A(ahi);
        LOAD_B(bhi);
        PRODUCTS_2X2(); /* hi x hi */
        LOAD_A(alo);
        PRODUCTS_2X2(); /* lo x hi */
        LOAD_A(ahi);
        LOAD_B(blo);
        PRODUCTS_2X2(); /* hi x lo */
    }
#undef LOAD_A
#undef LOAD_B
#undef PRODUCTS_2X2
}

/* Store one block (bias, residual and ReLU applied); returns the mask of its rows (bit r: row row0 + r) with a
   product (before bias and residual) that is not finite. */
static uint32_t store_block(float acc[4][TILE_ROWS * 16], int row0, int col0, int m, int n, const float *bias,
                            const float *res, int64_t ldr, int relu, float *c, int64_t ldc) {
    const __m512i exponent = _mm512_set1_epi32(0x7F800000);
    uint32_t not_finite = 0;
    _tile_stored(0, acc[0], 64);
    _tile_stored(1, acc[1], 64);
    _tile_stored(2, acc[2], 64);
    _tile_stored(3, acc[3], 64);
    for (int t = 0; t < 4; ++t) {
        const int r0 = row0 + (t >> 1) * TILE_ROWS, c0 = col0 + (t & 1) * 16;
        const __mmask16 lanes = first_lanes(n - c0);
        if (!lanes) continue;
        const __m512 b = bias ? _mm512_maskz_loadu_ps(lanes, bias + c0) : _mm512_setzero_ps();
        for (int r = 0; r < TILE_ROWS && r0 + r < m; ++r) {
            const __m512 product = _mm512_load_ps(acc[t] + r * 16);
            /* inf or NaN: all exponent bits set */
            const __mmask16 bad =
                _mm512_mask_cmpeq_epi32_mask(lanes, _mm512_and_si512(_mm512_castps_si512(product), exponent), exponent);
            not_finite |= (uint32_t)(bad != 0) << ((t >> 1) * TILE_ROWS + r);
            __m512 v = _mm512_add_ps(product, b);
            if (res) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(lanes, res + (int64_t)(r0 + r) * ldr + c0));
            if (relu) v = _mm512_max_ps(_mm512_setzero_ps(), v);  /* a NaN v: max returns its 2nd operand */
            _mm512_mask_storeu_ps(c + (int64_t)(r0 + r) * ldc + c0, lanes, v);
        }
    }
    return not_finite;
}

/* Process the 32-row block mb: split its rows, multiply them with every column block, store. */
static void row_block(const a_source *src, int mb, uint16_t *panel, const uint16_t *whi, const uint16_t *wlo, int n,
                      const float *bias, const float *res, int64_t ldr, int relu, float *c, int64_t ldc) {
    const int kp = src->kp, kb = kp / TILE_K, n_blocks = (n + BLOCK_N - 1) / BLOCK_N;
    float acc[4][TILE_ROWS * 16] __attribute__((aligned(64)));
    uint16_t *ahi = panel, *alo = panel + (int64_t)BLOCK_M * kp;
    float *scratch = (float *)(panel + (int64_t)2 * BLOCK_M * kp);
    uint32_t not_finite = 0;
    split_panel(src, mb * BLOCK_M, ahi, alo, scratch);
    for (int nb = 0; nb < n_blocks; ++nb) {
        const int64_t strip = (int64_t)(nb * BLOCK_N / 16) * kb * B_TILE_ELEMS;
        block_product(ahi, alo, kp, whi + strip, wlo + strip, kb);
        not_finite |= store_block(acc, mb * BLOCK_M, nb * BLOCK_N, src->m, n, bias, res, ldr, relu, c, ldc);
    }
    /* Rows with a product that is not finite are computed again in fp32 (row_in_fp32), among them every row holding
       an infinity (its products are inf or NaN in every column); not a row holding a NaN, whose products are all
       NaN, in fp32 too. (A bias or residual that is not finite is added as fp32 adds it: no need.) */
    for (int r = 0; r < BLOCK_M; ++r)
        if ((not_finite >> r & 1u) && !has_nan(ahi + (int64_t)r * kp, kp))
            row_in_fp32(ahi + (int64_t)r * kp, alo + (int64_t)r * kp, kp, whi, wlo, n, mb * BLOCK_M + r, bias, res,
                        ldr, relu, c, ldc);
}

/* One counter per thread, each on its own cache line. */
enum { COUNTER_STRIDE = 64 / sizeof(int) };

/* Nonzero: every thread computes its own share only, as OpenMP's static schedule would (for benchmarks/
   bench_paired_switches.py, which measures what taking the other shares' blocks buys). */
int vitzoo_amx_fixed_shares = 0;

/*
 * The row blocks are shared out so that a thread slowed from outside does less of the work instead of holding the
 * others back: each thread first takes the blocks of its own contiguous share (the rows the same thread wrote in
 * the previous layer, still in its cache), one at a time through that share's counter, then the blocks still left
 * in the other threads' shares through theirs. On a shared host the core under one vCPU can run its AMX unit at
 * half speed for seconds while the other's does not (docs/benchmarks.md, section 11); with fixed halves the whole call
 * then took as long as the slow half.
 */
static int product(const a_source *src, const uint16_t *whi, const uint16_t *wlo, int n, const float *bias,
                   const float *res, int64_t ldr, int relu, float *c, int64_t ldc, int threads) {
    const int kp = src->kp;
    const int m_blocks = (src->m + BLOCK_M - 1) / BLOCK_M;
    const int team = threads > 0 ? threads : 1;
    int failed = 0;
    if (src->m <= 0 || n <= 0) return 0;
    int *taken = (int *)calloc((size_t)team * COUNTER_STRIDE, sizeof(int));
    if (!taken) return -1;
#pragma omp parallel num_threads(team)
    {
        /* this thread's hi and lo panels (2 x BLOCK_M rows of kp bf16) and one gathered fp32 row */
        uint16_t *panel = (uint16_t *)aligned_alloc(64, (size_t)2 * BLOCK_M * kp * sizeof(uint16_t) +
                                                            (size_t)kp * sizeof(float));
        if (!panel) {
#pragma omp atomic write
            failed = 1;
        } else {
            configure_tiles();
            const int size = omp_get_num_threads(), me = omp_get_thread_num();
            const int shares = vitzoo_amx_fixed_shares ? 1 : size;
            for (int step = 0; step < shares; ++step) {
                const int share = (me + step) % size;
                const int first = (int)((int64_t)m_blocks * share / size);
                const int end = (int)((int64_t)m_blocks * (share + 1) / size);
                for (;;) {
                    const int mb = first + __atomic_fetch_add(taken + share * COUNTER_STRIDE, 1, __ATOMIC_RELAXED);
                    if (mb >= end) break;
                    row_block(src, mb, panel, whi, wlo, n, bias, res, ldr, relu, c, ldc);
                }
            }
            _tile_release();
            free(panel);
        }
    }
    free(taken);
    return failed ? -1 : 0;
}

/*
 * The weight operand of both entry points: (n, k) split and packed by vitzoo/amx_gemm.py, zero-padded to (np, kp),
 * the multiples of 32 above n and k, and laid out as (np / 16, kp / 32, 16, 16, 2): for each 16-column strip and
 * 32-deep k step one AMX B tile, whose row r holds the pairs (W[col, 2r], W[col, 2r + 1]) of its 16 columns.
 * bias: n floats or NULL; res: fp32 (m, n), row stride ldr, or NULL; c: fp32 (m, n) output, row stride ldc.
 * threads: the OpenMP team size (the caller passes torch.get_num_threads(), so that a fresh Python thread does
 * not run with OpenMP's default). Both return 0, or -1 if memory ran out: for the row counters, or for a thread's
 * panel buffers (c is then incomplete, or complete where the other threads took that thread's rows: treat it as
 * failed either way).
 */

/* C = act(A W^T + bias + R), A: fp32 (m, k), row stride lda (unit column stride). */
int vitzoo_amx_linear_bf16x3(const float *a, int64_t lda, int m, int k, const uint16_t *whi, const uint16_t *wlo,
                             int n, const float *bias, const float *res, int64_t ldr, int relu, float *c,
                             int64_t ldc, int threads) {
    a_source src;
    memset(&src, 0, sizeof src);
    src.a = a;
    src.lda = lda;
    src.m = m;
    src.k = k;
    src.kp = (k + TILE_K - 1) / TILE_K * TILE_K;
    return product(&src, whi, wlo, n, bias, res, ldr, relu, c, ldc, threads);
}

/* A 2-D convolution (one group) on a channels-last fp32 input x of shape (batch, cin, h, w) with strides
   (sb, 1, sh, sw): C = act(im2col(x) W^T + bias + R), one row per output pixel (b, oy, ox), i.e. a channels-last
   (batch, n, oh, ow) output; W is the weight permuted to (n, kh, kw, cin) and packed as above. */
int vitzoo_amx_conv2d_bf16x3(const float *x, int64_t sb, int64_t sh, int64_t sw, int batch, int h, int w, int cin,
                             int kh, int kw, int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w,
                             int oh, int ow, const uint16_t *whi, const uint16_t *wlo, int n, const float *bias,
                             const float *res, int64_t ldr, int relu, float *c, int64_t ldc, int threads) {
    a_source src;
    memset(&src, 0, sizeof src);
    src.a = x;
    src.m = batch * oh * ow;
    src.k = kh * kw * cin;
    src.kp = (src.k + TILE_K - 1) / TILE_K * TILE_K;
    src.conv = 1;
    src.sb = sb;
    src.sh = sh;
    src.sw = sw;
    src.h = h;
    src.w = w;
    src.cin = cin;
    src.kh = kh;
    src.kw = kw;
    src.stride_h = stride_h;
    src.stride_w = stride_w;
    src.pad_h = pad_h;
    src.pad_w = pad_w;
    src.dil_h = dil_h;
    src.dil_w = dil_w;
    src.oh = oh;
    src.ow = ow;
    return product(&src, whi, wlo, n, bias, res, ldr, relu, c, ldc, threads);
}
