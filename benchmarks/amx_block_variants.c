/* Variants of the bf16x3 AMX kernel's inner block (vitzoo/amx_gemm.c), timed in isolation on one core: one 32-row
 * panel of split activations (hi, lo) against every column of a packed weight, the loop the kernel runs per panel.
 * Splitting, threads and the Python side are left out, so the ratios say what a variant could give at most.
 *
 *   1. Tile-product latency: 1-4 independent accumulator chains of TDPBF16PS, operands already in tiles.
 *   2. Block shape: the kernel's 2 x 2 accumulator tiles (10 tile loads per 12 products per 32-deep step) against
 *      1 x 2 and 2 x 1 blocks with six operand tiles, each loaded once per step. Printed: ns per tile product.
 *   3. Epilogue of the 2 x 2 block: the kernel's (accumulators from 0, stored to a buffer, then bias, residual and
 *      ReLU added in fp32 while writing the output) against starting the accumulators from the residual or from
 *      the bias (a tile load of row stride 0 repeats one row) and storing them straight into the output, with the
 *      bias added in place only after a residual and ReLU in place. Printed: kernel's time / variant's time.
 *
 * Operand values are constants (timing only; tests/test_amx_gemm.py checks the kernel's numbers). Results and
 * what came of them: docs/benchmarks.md section 8. Linux, a CPU with AMX:
 *     cc -O2 -mavx512f -mamx-tile -mamx-bf16 benchmarks/amx_block_variants.c -o /tmp/amx_blocks && /tmp/amx_blocks */
#include <stdlib.h>

#include "amx_tiles.h"

enum { TILE_ELEMS = 512 }; /* bf16 elements of one 16 x 32 operand tile */

typedef struct { /* one panel and one packed weight, laid out as the kernel has them */
    const uint16_t *ahi, *alo; /* 32 rows of kp, row stride kp */
    const uint16_t *bhi, *blo; /* (n / 16, kp / 32, 512) */
    int kp, n;
    const float *bias, *res; /* n; 32 x n (row stride n) or NULL */
    int relu;
    float *c; /* 32 x n */
} panel_job;

/* The kernel's 2 x 2 step sequence on accumulators 0-3, A tiles 4-5, B tiles 6-7. */
static void products_2x2(const panel_job *j, const uint16_t *bh, const uint16_t *bl) {
    const int kb = j->kp / 32;
    const int64_t a_stride = (int64_t)j->kp * 2, a_next = 16 * (int64_t)j->kp, b_next = (int64_t)kb * TILE_ELEMS;
    for (int s = 0; s < kb; ++s) {
        const int64_t ka = s * 32, kw = (int64_t)s * TILE_ELEMS;
        _tile_loadd(4, j->ahi + ka, a_stride);
        _tile_loadd(5, j->ahi + a_next + ka, a_stride);
        _tile_loadd(6, bh + kw, 64);
        _tile_loadd(7, bh + b_next + kw, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        _tile_loadd(4, j->alo + ka, a_stride);
        _tile_loadd(5, j->alo + a_next + ka, a_stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        _tile_loadd(4, j->ahi + ka, a_stride);
        _tile_loadd(5, j->ahi + a_next + ka, a_stride);
        _tile_loadd(6, bl + kw, 64);
        _tile_loadd(7, bl + b_next + kw, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
}

static void zero_accumulators(void) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

static float scratch[4][256] __attribute__((aligned(64)));

/* Tile numbers must be compile-time constants. */
static void store_accumulators(void) {
    _tile_stored(0, scratch[0], 64);
    _tile_stored(1, scratch[1], 64);
    _tile_stored(2, scratch[2], 64);
    _tile_stored(3, scratch[3], 64);
}

static void block_2x2(const panel_job *j) {
    const int kb = j->kp / 32;
    for (int nb = 0; nb < j->n / 32; ++nb) {
        zero_accumulators();
        products_2x2(j, j->bhi + (int64_t)nb * 2 * kb * TILE_ELEMS, j->blo + (int64_t)nb * 2 * kb * TILE_ELEMS);
        store_accumulators();
    }
}

/* 1 x 2: 16 rows x 32 columns on accumulators 0-1; A hi / lo in tiles 2-3, B hi in 4-5, B lo in 6-7. */
static void block_1x2(const panel_job *j) {
    const int kb = j->kp / 32;
    const int64_t a_stride = (int64_t)j->kp * 2, b_next = (int64_t)kb * TILE_ELEMS;
    for (int nb = 0; nb < j->n / 32; ++nb) {
        const uint16_t *bh = j->bhi + (int64_t)nb * 2 * kb * TILE_ELEMS, *bl = j->blo + (int64_t)nb * 2 * kb * TILE_ELEMS;
        for (int half = 0; half < 2; ++half) {
            const uint16_t *ah = j->ahi + half * 16 * j->kp, *al = j->alo + half * 16 * j->kp;
            _tile_zero(0);
            _tile_zero(1);
            for (int s = 0; s < kb; ++s) {
                const int64_t ka = s * 32, kw = (int64_t)s * TILE_ELEMS;
                _tile_loadd(2, ah + ka, a_stride);
                _tile_loadd(4, bh + kw, 64);
                _tile_loadd(5, bh + b_next + kw, 64);
                _tile_dpbf16ps(0, 2, 4);
                _tile_dpbf16ps(1, 2, 5);
                _tile_loadd(3, al + ka, a_stride);
                _tile_dpbf16ps(0, 3, 4);
                _tile_dpbf16ps(1, 3, 5);
                _tile_loadd(6, bl + kw, 64);
                _tile_loadd(7, bl + b_next + kw, 64);
                _tile_dpbf16ps(0, 2, 6);
                _tile_dpbf16ps(1, 2, 7);
            }
            _tile_stored(0, scratch[0], 64);
            _tile_stored(1, scratch[1], 64);
        }
    }
}

/* 2 x 1: 32 rows x 16 columns on accumulators 0-1; A hi of both halves in 2-3, A lo in 4-5, B hi / lo in 6-7. */
static void block_2x1(const panel_job *j) {
    const int kb = j->kp / 32;
    const int64_t a_stride = (int64_t)j->kp * 2, a_next = 16 * (int64_t)j->kp;
    for (int strip = 0; strip < j->n / 16; ++strip) {
        const uint16_t *bh = j->bhi + (int64_t)strip * kb * TILE_ELEMS, *bl = j->blo + (int64_t)strip * kb * TILE_ELEMS;
        _tile_zero(0);
        _tile_zero(1);
        for (int s = 0; s < kb; ++s) {
            const int64_t ka = s * 32, kw = (int64_t)s * TILE_ELEMS;
            _tile_loadd(2, j->ahi + ka, a_stride);
            _tile_loadd(6, bh + kw, 64);
            _tile_dpbf16ps(0, 2, 6);
            _tile_loadd(3, j->ahi + a_next + ka, a_stride);
            _tile_dpbf16ps(1, 3, 6);
            _tile_loadd(4, j->alo + ka, a_stride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(5, j->alo + a_next + ka, a_stride);
            _tile_dpbf16ps(1, 5, 6);
            _tile_loadd(7, bl + kw, 64);
            _tile_dpbf16ps(0, 2, 7);
            _tile_dpbf16ps(1, 3, 7);
        }
        _tile_stored(0, scratch[0], 64);
        _tile_stored(1, scratch[1], 64);
    }
}

/* The kernel's epilogue: accumulators from 0, stored to a buffer, bias / residual / ReLU added while writing. */
static void epilogue_buffered(const panel_job *j) {
    const int kb = j->kp / 32;
    for (int nb = 0; nb < j->n / 32; ++nb) {
        zero_accumulators();
        products_2x2(j, j->bhi + (int64_t)nb * 2 * kb * TILE_ELEMS, j->blo + (int64_t)nb * 2 * kb * TILE_ELEMS);
        store_accumulators();
        for (int t = 0; t < 4; ++t) {
            const int r0 = (t >> 1) * 16, c0 = nb * 32 + (t & 1) * 16;
            const __m512 b = _mm512_loadu_ps(j->bias + c0);
            for (int r = 0; r < 16; ++r) {
                __m512 v = _mm512_add_ps(_mm512_load_ps(scratch[t] + r * 16), b);
                if (j->res) v = _mm512_add_ps(v, _mm512_loadu_ps(j->res + (int64_t)(r0 + r) * j->n + c0));
                if (j->relu) v = _mm512_max_ps(v, _mm512_setzero_ps());
                _mm512_storeu_ps(j->c + (int64_t)(r0 + r) * j->n + c0, v);
            }
        }
    }
}

/* The variant: accumulators from the residual or the bias, stored straight into the output. */
static void epilogue_direct(const panel_job *j) {
    const int kb = j->kp / 32;
    const int64_t stride = (int64_t)j->n * sizeof(float);
    for (int nb = 0; nb < j->n / 32; ++nb) {
        const int c0 = nb * 32;
        if (j->res) {
            const float *r = j->res + c0;
            _tile_loadd(0, r, stride);
            _tile_loadd(1, r + 16, stride);
            _tile_loadd(2, r + 16 * (int64_t)j->n, stride);
            _tile_loadd(3, r + 16 * (int64_t)j->n + 16, stride);
        } else {
            _tile_loadd(0, j->bias + c0, 0);
            _tile_loadd(1, j->bias + c0 + 16, 0);
            _tile_loadd(2, j->bias + c0, 0);
            _tile_loadd(3, j->bias + c0 + 16, 0);
        }
        products_2x2(j, j->bhi + (int64_t)nb * 2 * kb * TILE_ELEMS, j->blo + (int64_t)nb * 2 * kb * TILE_ELEMS);
        float *out = j->c + c0;
        _tile_stored(0, out, stride);
        _tile_stored(1, out + 16, stride);
        _tile_stored(2, out + 16 * (int64_t)j->n, stride);
        _tile_stored(3, out + 16 * (int64_t)j->n + 16, stride);
        if (!j->res && !j->relu) continue;
        const __m512 b0 = _mm512_loadu_ps(j->bias + c0), b1 = _mm512_loadu_ps(j->bias + c0 + 16);
        for (int r = 0; r < 32; ++r, out += j->n) {
            __m512 v0 = _mm512_loadu_ps(out), v1 = _mm512_loadu_ps(out + 16);
            if (j->res) {
                v0 = _mm512_add_ps(v0, b0);
                v1 = _mm512_add_ps(v1, b1);
            }
            if (j->relu) {
                v0 = _mm512_max_ps(v0, _mm512_setzero_ps());
                v1 = _mm512_max_ps(v1, _mm512_setzero_ps());
            }
            _mm512_storeu_ps(out, v0);
            _mm512_storeu_ps(out + 16, v1);
        }
    }
}

/* Best of 5 timings of `rounds` calls, in seconds per call. */
static double best_time(void (*variant)(const panel_job *), const panel_job *j, long rounds) {
    double best = 1e30;
    for (int repeat = 0; repeat < 5; ++repeat) {
        const double start = seconds();
        for (long i = 0; i < rounds; ++i) variant(j);
        const double elapsed = (seconds() - start) / rounds;
        if (elapsed < best) best = elapsed;
    }
    return best;
}

static void latency_chains(void) {
    static uint16_t operand[4][TILE_ELEMS] __attribute__((aligned(64)));
    _tile_loadd(4, operand[0], 64);
    _tile_loadd(5, operand[1], 64);
    _tile_loadd(6, operand[2], 64);
    _tile_loadd(7, operand[3], 64);
    const long n = 4000000;
    for (int chains = 1; chains <= 4; ++chains) {
        zero_accumulators();
        const double start = seconds();
        for (long i = 0; i < n; ++i) {
            _tile_dpbf16ps(0, 4, 6);
            if (chains > 1) _tile_dpbf16ps(1, 4, 7);
            if (chains > 2) _tile_dpbf16ps(2, 5, 6);
            if (chains > 3) _tile_dpbf16ps(3, 5, 7);
        }
        printf("  %d independent accumulator chain%s: %.2f ns per tile product\n", chains, chains > 1 ? "s" : "",
               (seconds() - start) / (n * (double)chains) * 1e9);
    }
}

/* A panel and a packed weight of (kp, n) filled with constants, a bias and a residual. */
static panel_job make_job(int kp, int n) {
    uint16_t *ahi = aligned_alloc(64, 32 * (size_t)kp * 2), *alo = aligned_alloc(64, 32 * (size_t)kp * 2);
    uint16_t *bhi = aligned_alloc(64, (size_t)n * kp * 2), *blo = aligned_alloc(64, (size_t)n * kp * 2);
    float *bias = aligned_alloc(64, (size_t)n * 4), *res = aligned_alloc(64, 32 * (size_t)n * 4);
    float *c = aligned_alloc(64, 32 * (size_t)n * 4);
    if (!ahi || !alo || !bhi || !blo || !bias || !res || !c) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (int i = 0; i < 32 * kp; ++i) {
        ahi[i] = 0x3f80; /* bf16 1.0 */
        alo[i] = 0x3000;
    }
    for (int i = 0; i < n * kp; ++i) {
        bhi[i] = 0x3f80;
        blo[i] = 0x3000;
    }
    for (int i = 0; i < n; ++i) bias[i] = 1.0f;
    for (int i = 0; i < 32 * n; ++i) res[i] = 1.0f;
    panel_job job = {ahi, alo, bhi, blo, kp, n, bias, res, 0, c};
    return job;
}

static void free_job(panel_job *j) {
    free((void *)j->ahi), free((void *)j->alo), free((void *)j->bhi), free((void *)j->blo);
    free((void *)j->bias), free((void *)j->res), free(j->c);
}

int main(void) {
    if (start_tiles() != 0) return 1;
    printf("1. tile-product latency\n");
    latency_chains();
    /* (kp, n) of SHViT's 1x1 convolutions: S1's 128 -> 256 and 224 -> 448 FFN layers and their way back, S4's
       320 -> 640 / 640 -> 320 ones, and a 128 -> 384 (qkv-like) layer */
    const int shapes[][2] = {{128, 256}, {256, 128}, {128, 384}, {224, 448}, {448, 224}, {320, 640}, {640, 320}};
    const int count = sizeof shapes / sizeof shapes[0];
    printf("2. block shape, ns per tile product (smaller is faster)\n  %4s %4s %8s %8s %8s\n", "k", "n", "2x2", "1x2",
           "2x1");
    for (int s = 0; s < count; ++s) {
        panel_job job = make_job(shapes[s][0], shapes[s][1]);
        const float *res = job.res;
        job.res = NULL; /* the block loops add nothing; only the epilogue section below reads it */
        const long rounds = 20000000L / ((long)job.kp * job.n / 32);
        const double products = 12.0 * (job.kp / 32) * (job.n / 32);
        printf("  %4d %4d", job.kp, job.n);
        printf(" %8.2f", best_time(block_2x2, &job, rounds) / products * 1e9);
        printf(" %8.2f", best_time(block_1x2, &job, rounds) / products * 1e9);
        printf(" %8.2f\n", best_time(block_2x1, &job, rounds) / products * 1e9);
        job.res = res;
        free_job(&job);
    }
    printf("3. epilogue: the kernel's time / the direct-store variant's (> 1: the variant is faster)\n"
           "  %4s %4s %8s %8s %8s\n", "k", "n", "bias", "+ReLU", "+res");
    for (int s = 0; s < count; ++s) {
        panel_job job = make_job(shapes[s][0], shapes[s][1]);
        const float *res = job.res;
        const long rounds = 20000000L / ((long)job.kp * job.n / 32);
        printf("  %4d %4d", job.kp, job.n);
        for (int mode = 0; mode < 3; ++mode) { /* bias; bias and ReLU; bias and residual */
            job.res = mode == 2 ? res : NULL;
            job.relu = mode == 1;
            printf(" %8.3f", best_time(epilogue_buffered, &job, rounds) / best_time(epilogue_direct, &job, rounds));
        }
        printf("\n");
        job.res = res;
        free_job(&job);
    }
    _tile_release();
    return 0;
}
