/* A Llama layer's decode attention in one call (worker/pipeline/cpu_attention.py), instead of ~25 torch operations
 * whose dispatch cost more than their arithmetic: rotary on q and k, the KV-cache write, and attention over the
 * row's cached positions, for one new token per row.
 *
 * Rotary is rotary.py's `rotate` in torch's bf16 roundings: bf16(bf16(x * cos) + bf16(roll(x, D/2) * sin_signed)),
 * so the cache holds the bits torch's path writes. Attention is computed in fp32 from the bf16 q, k and v as
 * torch's CPU flash attention does: softmax with the maximum subtracted, V weighted by the probabilities rounded
 * to bf16 (their sum kept in fp32), the output rounded to bf16.
 * Each (row, KV head) is one task: its result depends on that row alone, whatever the batch and thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_bf16.h"

/* x (D) bf16 rotated into out (D) bf16 with the tables' row (cos, sin_signed (D) bf16). */
static void rotate(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, int D, uint16_t *out) {
  const int half = D / 2;
  for (int i = 0; i < D; i++) {
    float rolled = bf16_to_f32(x[i < half ? i + half : i - half]);
    float a = round_bf16(bf16_to_f32(x[i]) * bf16_to_f32(cos[i]));
    float b = round_bf16(rolled * bf16_to_f32(sin[i]));
    out[i] = f32_to_bf16(a + b);
  }
}

static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* One query head (q (D) bf16) over n cached positions (keys, values: n x D bf16, rows `D` apart) -> out (D) bf16.
 * s: scratch for n scores. Inlined with D a constant for the common head sizes: q and the output then stay in
 * registers across positions. */
static inline __attribute__((always_inline)) void attend(const uint16_t *q, const uint16_t *keys,
                                                         const uint16_t *values, int n, int D, float scale, float *s,
                                                         uint16_t *out) {
  float m = -INFINITY;
  __m256 qf[32]; /* D <= 256 (cpu_attention.py checks) */
  for (int d = 0; d < D / 8; d++) qf[d] = load_bf16x8(q + 8 * d);
  for (int j = 0; j < n; j++) {
    __m256 acc = _mm256_setzero_ps();
    for (int d = 0; d < D / 8; d++) acc = _mm256_fmadd_ps(qf[d], load_bf16x8(keys + (size_t)j * D + 8 * d), acc);
    s[j] = hsum8(acc) * scale;
    m = s[j] > m ? s[j] : m;
  }
  float l = 0.f;
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(m)));
    _mm256_storeu_ps(s + j, e);
    l += hsum8(e);
  }
  for (; j < n; j++) {
    s[j] = expf(s[j] - m);
    l += s[j];
  }
  __m256 o[32];
  for (int d = 0; d < D / 8; d++) o[d] = _mm256_setzero_ps();
  for (j = 0; j < n; j++) {
    __m256 p = _mm256_set1_ps(round_bf16(s[j])); /* torch's kernel multiplies V by bf16 weights (its sum is fp32's) */
    for (int d = 0; d < D / 8; d++) o[d] = _mm256_fmadd_ps(p, load_bf16x8(values + (size_t)j * D + 8 * d), o[d]);
  }
  __m256 inv = _mm256_set1_ps(1.f / l);
  for (int d = 0; d < D / 8; d++) _mm_storeu_si128((__m128i *)(out + 8 * d), f32x8_to_bf16(_mm256_mul_ps(o[d], inv)));
}

/* Rows r = 0..rows-1 are the cache's first rows (decode binds the first n slots).
 * qkv (rows, (H + 2 Hkv) D) bf16: the layer's fused projection, q heads then k heads then v heads.
 * cos, sin_signed (P, D) bf16: rotary.py's tables. rot (rows) int64: each row's rotary position; it attends
 * positions 0..rot (its cache must hold them, the new one included). write (rows) int64: where its k and v go (its
 * position, or the scratch column for an idle row). kc, vc (slots, Hkv, L, D) bf16: the layer's cache.
 * out (rows, H D) bf16; q head i reads KV head i / (H / Hkv), as transformers' repeat_kv. 0; -2, nothing written,
 * when a rot is outside 0..P-1 and L-1 or a write outside 0..L-1; -1 when scratch memory could not be allocated. */
int chat_decode_attention(const uint16_t *qkv, int rows, int H, int Hkv, int D, const uint16_t *cos,
                          const uint16_t *sin, const int64_t *rot, const int64_t *write, uint16_t *kc, uint16_t *vc,
                          int L, int P, float scale, uint16_t *out, int threads) {
  for (int r = 0; r < rows; r++)
    if (rot[r] < 0 || rot[r] >= P || rot[r] >= L || write[r] < 0 || write[r] >= L) return -2;
  const int group = H / Hkv, width = (H + 2 * Hkv) * D;
  int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * Hkv > 1) reduction(| : failed)
  for (int task = 0; task < rows * Hkv; task++) {
    const int r = task / Hkv, h = task % Hkv, n = (int)rot[r] + 1;
    const uint16_t *x = qkv + (size_t)r * width, *c = cos + (size_t)rot[r] * D, *sn = sin + (size_t)rot[r] * D;
    uint16_t *keys = kc + ((size_t)r * Hkv + h) * L * D, *values = vc + ((size_t)r * Hkv + h) * L * D;
    rotate(x + (size_t)(H + h) * D, c, sn, D, keys + (size_t)write[r] * D);
    for (int d = 0; d < D; d++) values[(size_t)write[r] * D + d] = x[(size_t)(H + Hkv + h) * D + d];
    float *s = malloc(sizeof(float) * (size_t)n);
    if (!s) {
      failed = 1;
      continue;
    }
    uint16_t q[256];
    for (int i = 0; i < group; i++) {
      const int head = h * group + i;
      rotate(x + (size_t)head * D, c, sn, D, q);
      uint16_t *o = out + (size_t)r * H * D + (size_t)head * D;
      switch (D) { /* the common head sizes as constants */
        case 64: attend(q, keys, values, n, 64, scale, s, o); break;
        case 128: attend(q, keys, values, n, 128, scale, s, o); break;
        default: attend(q, keys, values, n, D, scale, s, o); break;
      }
    }
    free(s);
  }
  return failed ? -1 : 0;
}
