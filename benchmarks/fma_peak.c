/* Single-core FP32 multiply-add peak: 12 independent FMA chains on the widest vector registers the compiler
 * targets (build with -O3 -march=native). Prints GMAC/s (one fused multiply-add per lane = one MAC).
 * Used by bench_peak_fraction.py as the measured ceiling (it includes turbo, unlike the nominal clock). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <immintrin.h>

#if defined(__AVX512F__)
typedef __m512 vec;
#define LANES 16
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define STORE _mm512_storeu_ps
#elif defined(__FMA__)
typedef __m256 vec;
#define LANES 8
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define STORE _mm256_storeu_ps
#else
#error "needs a CPU with FMA (AVX2+FMA or AVX-512)"
#endif

#define CHAINS 12

int main(int argc, char **argv) {
    long iters = argc > 1 ? atol(argv[1]) : 100000000L;
    vec acc[CHAINS];
    vec b = SET1(1.0000001f), c = SET1(-0.0000001f);
    for (int i = 0; i < CHAINS; i++) acc[i] = SET1((float)i);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long n = 0; n < iters; n++) {
        for (int i = 0; i < CHAINS; i++) acc[i] = FMA(acc[i], b, c);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double seconds = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    float out[LANES], sum = 0.0f;
    for (int i = 0; i < CHAINS; i++) {
        STORE(out, acc[i]);
        sum += out[0];
    }
    /* the checksum keeps the chains alive; it is printed so the compiler cannot drop the loop */
    printf("%.3f %d %g\n", (double)iters * CHAINS * LANES / seconds / 1e9, LANES, (double)sum);
    return 0;
}
