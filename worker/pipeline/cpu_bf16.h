/* bf16 <-> fp32 and e^x for 8 lanes, shared by the project's CPU kernels (cpu_gemm.c, cpu_attention.c). Roundings
 * are torch's: round to nearest even, NaN kept NaN. Needs AVX2 + FMA. */
#ifndef CHAT_CPU_BF16_H
#define CHAT_CPU_BF16_H
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

/* Bit casts through unions (not memcpy), which gcc's vectorizer follows in the prologue's loops. */
typedef union {
  uint32_t u;
  float f;
} bits32;

static inline float bf16_to_f32(uint16_t h) { return (bits32){.u = (uint32_t)h << 16}.f; }

static inline __m256 load_bf16x8_reg(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __m256 load_bf16x8(const uint16_t *p) { return load_bf16x8_reg(_mm_loadu_si128((const __m128i *)p)); }

/* 8 fp32 -> 8 bf16, rounded to nearest even (torch's conversion for finite values) */
static inline __m128i f32x8_to_bf16(__m256 v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

static inline uint16_t f32_to_bf16(float f) {
  uint32_t u = (bits32){.f = f}.u;
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* e^x for 8 lanes, within 2 ulp of fp32 on [-87, 88]: Cephes' expf (S. Moshier). Below -87 it is e^-87 (not the
 * subnormals), above 88.72 (where fp32 overflows) +inf, and NaN stays NaN (the clamps take x as their second
 * operand: maxps / minps return it when it is NaN). */
static inline __m256 exp8(__m256 x) {
  const __m256 over = _mm256_cmp_ps(x, _mm256_set1_ps(88.72283935546875f), _CMP_GT_OQ);
  x = _mm256_min_ps(_mm256_set1_ps(88.f), _mm256_max_ps(_mm256_set1_ps(-87.f), x));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m256 r = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f))),
                           _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  static const float c[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  __m256 p = _mm256_set1_ps(c[0]);
  for (int i = 1; i < 6; i++) p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c[i]));
  p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), _mm256_set1_ps(1.f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_blendv_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_set1_ps(INFINITY), over); /* p 2^n */
}

static inline __m256 round_bf16x8(__m256 v) { return load_bf16x8_reg(f32x8_to_bf16(v)); }

#endif
