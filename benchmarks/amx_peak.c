/* Single-core AMX bf16 peak: back-to-back TDPBF16PS tile products (16 x 16 fp32 += 16 x 32 bf16 . 32 x 16 bf16,
 * 8192 MACs each) on four independent accumulator tiles, operands already in tiles. Prints ns per tile product and
 * GMAC/s of bf16; a third of that is the ceiling of fp32 work in split bf16 ("bf16x3", docs/benchmarks.md section 8).
 * Linux, a CPU with AMX (amx_tile, amx_bf16):
 *     cc -O2 -mamx-tile -mamx-bf16 benchmarks/amx_peak.c -o /tmp/amx_peak && /tmp/amx_peak */
#include "amx_tiles.h"

static uint16_t operand[4][512] __attribute__((aligned(64)));

int main(void) {
    if (start_tiles() != 0) return 1;
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 512; ++j) operand[i][j] = 0x3f80; /* bf16 1.0 */
    _tile_loadd(4, operand[0], 64);
    _tile_loadd(5, operand[1], 64);
    _tile_loadd(6, operand[2], 64);
    _tile_loadd(7, operand[3], 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const long rounds = 2000000;
    double best = 1e9;
    for (int repeat = 0; repeat < 5; ++repeat) {
        const double start = seconds();
        for (long i = 0; i < rounds; ++i) {
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        const double elapsed = seconds() - start;
        if (elapsed < best) best = elapsed;
    }
    _tile_release();
    const double per_product = best / (rounds * 4.0);
    printf("%.2f ns per tile product, %.1f GMAC/s bf16 (%.1f GMAC/s of fp32 work in bf16x3)\n", per_product * 1e9,
           8192 / per_product / 1e9, 8192 / per_product / 3e9);
    return 0;
}
