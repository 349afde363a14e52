/* Weight-quantized matmuls for CPU decode that read each weight once for all rows (worker/pipeline/cpu_gemm.py).
 *
 * y (M, N) bf16 = x (M, K) bf16 @ W^T, W (N, K) quantized, for a handful of rows (the decode slots). torch's packed
 * CPU kernels (int4pack / int8pack) work row by row (in blocks of 4), so 8 rows cost ~2.5x one; here a weight block
 * is unpacked once and used for every row, and the cost per extra row is a few integer instructions.
 *
 * The scheme is llama.cpp's Q4_1 x Q8_1 / Q8_0 x Q8_0 dot product (ggml-cpu, quants.c): activations are
 * quantized per row in blocks of 32 to int8 (absmax / 127), products summed exactly in integers per block
 * (AVX2 vpmaddubsw: unsigned x signed bytes), then scaled in fp32. Columns are tiled by 8 so that one 256-bit
 * register holds 4 consecutive k of 8 output columns (the layout of ggml's q4_0_8x8 repack): the lanes of the
 * integer sums are the 8 outputs, no horizontal sums per block.
 *
 * Each row's arithmetic is the same whatever M is (rows never share a sum), so a row's result does not depend
 * on its batch mates. Threads split the column tiles (OpenMP, torch's own runtime once loaded beside torch).
 * Needs AVX2 + FMA; built with -ffp-contract=off so the compiler cannot fuse differently per row count.
 * Built a second time with AVX512-VNNI (+VL) where the CPU has it: vpdpbusd then does vpmaddubsw's product, the
 * widening and the sum in one instruction. The integer sums are exact either way, so both builds give the same bits.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_bf16.h"

#define GROUP 32 /* weights per scale (Q4_1's block) and activations per int8 scale */
#define TILE 8   /* output columns per tile: one fp32 lane each */
#define ROWS 4   /* rows per pass over a weight tile: 4 accumulators stay in registers */
#define LEVELS 2 /* int8 levels per activation (quantize_row) */
#define FINE 128 /* the second level's step: the first's / FINE */
#ifndef AHEAD
#define AHEAD 2048 /* bytes of 4-bit weights prefetched ahead of the block being read: each call streams its weights
                      * once, and the hardware prefetcher alone kept too few lines in flight (decode step 4.85 ->
                      * 4.69 ms at 1 row, 14.1 -> 13.0 at 8, alternated in one process, AMD EPYC AVX-512 host) */
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI 1
#endif

/* One row of K activations -> int8 in two levels per block of 32: x ~ (FINE * x0 + x1) * u, u = d / FINE, where
 * x0 = round(x / d), d = absmax / 127 (ggml's quantize_row_q8_1), and x1 quantizes what x0 left over in steps of u
 * (|x1| <= 64, as |x - x0 d| <= d / 2). ~15 bits, below bf16's own rounding: one level of int8 alone flipped
 * near-tie greedy tokens against torch's bf16 path. The fixed ratio lets the kernels sum both levels in integers
 * (FINE * dot0 + dot1) and scale once. xq holds the row's blocks as 32 x0 then 32 x1; u its G units; sx its G block
 * sums (what the levels give). */
static void quantize_row(const float *x, int K, int8_t *xq, float *u, float *sx) {
  const int G = K / GROUP;
  for (int g = 0; g < G; g++) {
    const float *b = x + g * GROUP;
    float amax = 0.f, poison = 0.f;
#pragma omp simd reduction(max : amax) reduction(+ : poison)
    for (int j = 0; j < GROUP; j++) {
      amax = fmaxf(amax, fabsf(b[j])); /* fmaxf passes over NaN, */
      poison += b[j] * 0.f;            /* so a NaN or inf makes this NaN instead */
    }
    float d = amax / 127.f, id = d > 0.f && d < INFINITY ? 1.f / d : 0.f, fine = id * FINE;
    if (!(fine < INFINITY)) d = id = fine = 0.f; /* |x| below ~1e-36 (1 / d overflows): the block counts as zeros */
    if (poison != poison) d = NAN; /* the row's outputs become NaN, as torch's would (for an inf too, where torch's
                                    * may be +-inf: the int8 scale cannot carry it) */
    float unit = d / FINE;
    int8_t *q0 = xq + g * 2 * GROUP, *q1 = q0 + GROUP;
    int sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < GROUP; j++) {
      int c = (int)nearbyintf(b[j] * id);
      int f = (int)nearbyintf((b[j] - (float)c * d) * fine);
      q0[j] = (int8_t)c;
      q1[j] = (int8_t)f;
      sum += FINE * c + f;
    }
    u[g] = unit;
    sx[g] = unit * (float)sum;
  }
}

/* What the kernels apply to x before quantizing it, so a decode layer's RMSNorm and SwiGLU are not separate torch
 * operations (each costs a few microseconds of dispatch, ~20 of them per layer). The roundings are torch's: each
 * intermediate that torch would hold in bf16 is rounded to bf16 here too. */
typedef struct {
  const uint16_t *norm; /* RMSNorm weight (K) bf16, or NULL: x -> bf16(x * rsqrt(mean(x^2) + eps)) * norm */
  float eps;
  int swiglu;               /* x has 2K columns: x -> silu(x[:K]) * x[K:] (after the norm, if any) */
  const uint16_t *residual; /* (M, N) bf16 added to the bf16-rounded output, or NULL */
  int f32;                  /* y is fp32, not rounded to bf16 (logits: bf16's 8 bits turn near-ties into ties) */
} fusion;

/* One row's input as the matmul reads it (K bf16 values, in v as floats). */
static void prologue(const uint16_t *x, int K, const fusion *f, float *v) {
  /* omp simd: the sum of squares in lanes, in the same order at every call */
  if (f->swiglu) {
    for (int k = 0; k < K; k += 8) { /* K is whole groups of 32 */
      __m256 g = load_bf16x8(x + k);
      __m256 silu = round_bf16x8(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(
          _mm256_setzero_ps(), g)))));
      _mm256_storeu_ps(v + k, round_bf16x8(_mm256_mul_ps(silu, load_bf16x8(x + K + k))));
    }
  } else {
#pragma omp simd
    for (int k = 0; k < K; k++) v[k] = bf16_to_f32(x[k]);
  }
  if (f->norm) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int k = 0; k < K; k++) ss += v[k] * v[k];
    float inv = 1.f / sqrtf(ss / (float)K + f->eps);
#pragma omp simd
    for (int k = 0; k < K; k++) v[k] = round_bf16(bf16_to_f32(f->norm[k]) * round_bf16(v[k] * inv));
  }
}

typedef struct {
  int8_t *xq;
  float *dx, *sx, *v;
} quantized_rows;

/* Room for M rows' int8 blocks and scales, and `threads` rows of prologue scratch (v). 0, or -1 when memory ran
 * out. */
static int alloc_rows(int M, int K, int threads, quantized_rows *q) {
  const int G = K / GROUP;
  q->xq = malloc((size_t)M * K * LEVELS);
  q->dx = malloc(sizeof(float) * (size_t)M * G);
  q->sx = malloc(sizeof(float) * (size_t)M * G);
  q->v = malloc(sizeof(float) * (size_t)K * threads);
  return q->xq && q->dx && q->sx && q->v ? 0 : -1;
}

/* Row r of x (M, K or 2K with swiglu) -> its int8 blocks and scales, with the prologue in v (K floats). */
static void quantize_one(const uint16_t *x, int r, int K, const fusion *f, float *v, quantized_rows *q) {
  const int G = K / GROUP, stride = f->swiglu ? 2 * K : K;
  prologue(x + (size_t)r * stride, K, f, v);
  quantize_row(v, K, q->xq + (size_t)r * K * LEVELS, q->dx + (size_t)r * G, q->sx + r * G);
}

static void free_rows(quantized_rows *q) {
  free(q->xq);
  free(q->dx);
  free(q->sx);
  free(q->v);
}

/* The tile's 8 outputs of row r: rounded to bf16 as torch's matmul output, plus the residual in fp32, rounded
 * again (torch's bf16 add); or as they are, in fp32 (f32, no residual). */
static inline void store_row(__m256 acc, const uint16_t *residual, size_t at, void *y, int f32) {
  if (f32) {
    _mm256_storeu_ps((float *)y + at, acc);
    return;
  }
  __m128i out = f32x8_to_bf16(acc);
  if (residual) {
    __m256 sum = _mm256_add_ps(load_bf16x8_reg(out), load_bf16x8(residual + at));
    out = f32x8_to_bf16(sum);
  }
  _mm_storeu_si128((__m128i *)((uint16_t *)y + at), out);
}

/* 4 int8 read as one int32 and broadcast from memory (a load, not a move through a general register) */
typedef int32_t __attribute__((may_alias, aligned(1))) int8x4;
#define X4(x, j) _mm256_set1_epi32(((const int8x4 *)(x))[j])

/* The block's integer dot products for the tile's 8 columns (the 8 int32 lanes), both levels summed as
 * FINE * dot0 + dot1: w the block's 8 registers of weight bytes (byte 4c + i of register j: column c's k = 4j + i),
 * x the row's block (32 x0, then 32 x1: quantize_row). */
static inline __m256i q4_dot(const __m256i w[8], const int8_t *x) { /* w unsigned 0..15 */
  const int8_t *x0 = x, *x1 = x + GROUP;
#ifdef VNNI
  __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
  for (int j = 0; j < 8; j++) {
    s0 = _mm256_dpbusd_epi32(s0, w[j], X4(x0, j));
    s1 = _mm256_dpbusd_epi32(s1, w[j], X4(x1, j));
  }
#else
  /* pairs of 15 * 127: 8 steps sum to at most 30,480, within int16 */
  __m256i s0 = _mm256_maddubs_epi16(w[0], X4(x0, 0));
  __m256i s1 = _mm256_maddubs_epi16(w[0], X4(x1, 0));
  for (int j = 1; j < 8; j++) {
    s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(w[j], X4(x0, j)));
    s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(w[j], X4(x1, j)));
  }
  const __m256i ones = _mm256_set1_epi16(1);
  s0 = _mm256_madd_epi16(s0, ones);
  s1 = _mm256_madd_epi16(s1, ones);
#endif
  return _mm256_add_epi32(_mm256_slli_epi32(s0, 7), s1); /* FINE = 2^7; at most 128 * 60,960 + 30,480 */
}

/* signed x signed as unsigned x signed: |w| times x carrying w's sign (aw = |w|); at most 128 * 520,192 + 260,096 */
static inline __m256i q8_dot(const __m256i aw[8], const __m256i w[8], const int8_t *x) {
  const int8_t *x0 = x, *x1 = x + GROUP;
  __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
  for (int j = 0; j < 8; j++) {
    __m256i a = _mm256_sign_epi8(X4(x0, j), w[j]), b = _mm256_sign_epi8(X4(x1, j), w[j]);
#ifdef VNNI
    s0 = _mm256_dpbusd_epi32(s0, aw[j], a);
    s1 = _mm256_dpbusd_epi32(s1, aw[j], b);
#else
    /* a pair reaches 2 * 128 * 127, so each step widens to int32 at once */
    const __m256i ones = _mm256_set1_epi16(1);
    s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(aw[j], a), ones));
    s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(aw[j], b), ones));
#endif
  }
  return _mm256_add_epi32(_mm256_slli_epi32(s0, 7), s1);
}

/* 4-bit: tile t, block g holds 128 bytes: byte 32j + 4c + i = q[c][4j + i] | q[c][4(j + 4) + i] << 4 (c the column
 * in the tile, q in 0..15), and 16 bf16: the 8 columns' scales, then their zeros, w = (q - 8) * scale + zero (torch's
 * int4pack convention). Sum over k of w x = scale * dx * sum(q xq) + (zero - 8 scale) * sx. */
static inline __attribute__((always_inline)) void q4_tile(int mr, int t, int K, int N, const int8_t *xq,
                                                          const float *dx, const float *sx, const uint8_t *qs,
                                                          const uint16_t *sz, const uint16_t *res, void *y,
                                                          int f32) {
  const int G = K / GROUP;
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[ROWS];
  for (int r = 0; r < mr; r++) acc[r] = _mm256_setzero_ps();
  for (int g = 0; g < G; g++) {
    const uint8_t *wb = qs + ((size_t)t * G + g) * 128;
    const uint16_t *sb = sz + ((size_t)t * G + g) * 16;
    _mm_prefetch((const char *)(wb + AHEAD), _MM_HINT_T0);
    _mm_prefetch((const char *)(wb + AHEAD + 64), _MM_HINT_T0);
    if (!(g & 1)) _mm_prefetch((const char *)(sb + AHEAD / 4), _MM_HINT_T0);
    __m256i w[8];
    for (int j = 0; j < 4; j++) {
      __m256i b = _mm256_loadu_si256((const __m256i *)(wb + 32 * j));
      w[j] = _mm256_and_si256(b, low);
      w[j + 4] = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
    }
    __m256 scale = load_bf16x8(sb), minimum = _mm256_fmadd_ps(_mm256_set1_ps(-8.f), scale, load_bf16x8(sb + 8));
    for (int r = 0; r < mr; r++) {
      __m256 p = _mm256_cvtepi32_ps(q4_dot(w, xq + (size_t)r * LEVELS * K + g * LEVELS * GROUP));
      acc[r] = _mm256_fmadd_ps(p, _mm256_mul_ps(scale, _mm256_set1_ps(dx[r * G + g])), acc[r]);
      acc[r] = _mm256_fmadd_ps(minimum, _mm256_set1_ps(sx[r * G + g]), acc[r]);
    }
  }
  for (int r = 0; r < mr; r++) store_row(acc[r], res, (size_t)r * N + t * TILE, y, f32);
}

/* 8-bit, one scale per output column: tile t, block g holds 256 bytes: byte 32j + 4c + i = w[c][4j + i]. */
static inline __attribute__((always_inline)) void q8_tile(int mr, int t, int K, int N, const int8_t *xq,
                                                          const float *dx, const int8_t *ws, const uint16_t *sc,
                                                          const uint16_t *res, void *y, int f32) {
  const int G = K / GROUP;
  __m256 acc[ROWS];
  for (int r = 0; r < mr; r++) acc[r] = _mm256_setzero_ps();
  for (int g = 0; g < G; g++) {
    const int8_t *wb = ws + ((size_t)t * G + g) * 256;
    for (int c = 0; c < 256; c += 64) _mm_prefetch((const char *)(wb + 2 * AHEAD + c), _MM_HINT_T0);
    __m256i w[8], aw[8];
    for (int j = 0; j < 8; j++) {
      w[j] = _mm256_loadu_si256((const __m256i *)(wb + 32 * j));
      aw[j] = _mm256_sign_epi8(w[j], w[j]); /* |w|, -128 read as unsigned 128 */
    }
    for (int r = 0; r < mr; r++) {
      __m256i s = q8_dot(aw, w, xq + (size_t)r * LEVELS * K + g * LEVELS * GROUP);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dx[r * G + g]), acc[r]);
    }
  }
  __m256 scale = load_bf16x8(sc + (size_t)t * TILE);
  for (int r = 0; r < mr; r++) store_row(_mm256_mul_ps(acc[r], scale), res, (size_t)r * N + t * TILE, y, f32);
}

/* The row-count switches give the compiler a constant row count, so the accumulators live in registers. */
#define DISPATCH(call_mr)              \
  switch (mr) {                        \
    case 1: call_mr(1); break;         \
    case 2: call_mr(2); break;         \
    case 3: call_mr(3); break;         \
    default: call_mr(ROWS); break;     \
  }

/* y (M, N) bf16 = prologue(x) @ W^T (+ residual): `bits` 4, W in q4_tile's layout with scales and zeros `s`; 8, in
 * q8_tile's with per-column scales `s` (N) bf16. Returns 0, or -1 when scratch memory could not be allocated (y
 * untouched). */
static int gemm(int bits, const uint16_t *x, int M, int K, const void *w, const uint16_t *s, int N, void *y,
                int threads, const fusion *f) {
  quantized_rows q;
  threads = threads < 1 ? 1 : threads;
  if (alloc_rows(M, K, threads, &q)) {
    free_rows(&q);
    return -1;
  }
  const int G = K / GROUP;
  /* One team for both stages: the rows' prologue and quantization split between the threads (a row's bits do
   * not depend on which thread made them), then, past the barrier, the column tiles. */
#pragma omp parallel num_threads(threads)
  {
    float *v = q.v + (size_t)omp_get_thread_num() * K;
#pragma omp for schedule(static)
    for (int r = 0; r < M; r++) quantize_one(x, r, K, f, v, &q);
#pragma omp for schedule(static)
    for (int t = 0; t < N / TILE; t++) {
      for (int r0 = 0; r0 < M; r0 += ROWS) {
        int mr = M - r0 < ROWS ? M - r0 : ROWS;
        const int8_t *xq = q.xq + (size_t)r0 * K * LEVELS;
        const float *dx = q.dx + r0 * G;
        const uint16_t *res = f->residual ? f->residual + (size_t)r0 * N : NULL;
        void *yr = (char *)y + (size_t)r0 * N * (f->f32 ? 4 : 2);
        if (bits == 4) {
#define Q4(n) q4_tile(n, t, K, N, xq, dx, q.sx + r0 * G, w, s, res, yr, f->f32)
          DISPATCH(Q4)
#undef Q4
        } else {
#define Q8(n) q8_tile(n, t, K, N, xq, dx, w, s, res, yr, f->f32)
          DISPATCH(Q8)
#undef Q8
        }
      }
    }
  }
  free_rows(&q);
  return 0;
}

/* The exported entry points (cpu_gemm.py): x (M, K), or (M, 2K) with swiglu; norm (K) bf16 or NULL, eps, swiglu 0/1,
 * residual (M, N) bf16 or NULL, f32 0/1 (y (M, N) fp32, else bf16): see `fusion`. */
int chat_q4_gemm(const uint16_t *x, int M, int K, const uint8_t *qs, const uint16_t *sz, int N, void *y,
                 int threads, const uint16_t *norm, float eps, int swiglu, const uint16_t *residual, int f32) {
  const fusion f = {norm, eps, swiglu, residual, f32};
  return gemm(4, x, M, K, qs, sz, N, y, threads, &f);
}

int chat_q8_gemm(const uint16_t *x, int M, int K, const int8_t *ws, const uint16_t *sc, int N, void *y,
                 int threads, const uint16_t *norm, float eps, int swiglu, const uint16_t *residual, int f32) {
  const fusion f = {norm, eps, swiglu, residual, f32};
  return gemm(8, x, M, K, ws, sc, N, y, threads, &f);
}
