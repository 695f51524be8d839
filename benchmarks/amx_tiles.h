/* What the AMX C benchmarks (amx_peak.c, amx_block_variants.c) share: a wall clock, and getting the tile state from
 * Linux with all eight tiles configured as 16 rows x 64 bytes (fp32 16 x 16, bf16 16 x 32), as vitzoo/amx_gemm.c
 * configures them. Included by file name, so the benchmarks build with one cc command from any folder. */
#ifndef VITZOO_BENCHMARKS_AMX_TILES_H
#define VITZOO_BENCHMARKS_AMX_TILES_H

#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* 0 once the tiles are ready; 1, with a message on stderr, where the kernel does not grant the tile state. */
static int start_tiles(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } cfg;
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) {
        fprintf(stderr, "the kernel did not grant the AMX tile state\n");
        return 1;
    }
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
    return 0;
}

#endif
