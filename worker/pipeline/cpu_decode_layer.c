/* A Llama decoder layer's decode step in one call (lean_llama.py's path where every projection runs the project's
 * kernels and the step's attention is cpu_attention.c's): the five kernel calls of a layer in sequence, so Python
 * makes one call per layer instead of five, each with its own checks, allocation and ctypes conversion (~25 us of
 * Python per layer, a quarter of a 1-row SmolLM2 step). The arithmetic is the five calls', bit for bit.
 *
 * h (M, hidden) bf16 is updated in place: h += o_proj(attention(rope(qkv_proj(norm1(h))))), then
 * h += down_proj(swiglu(gate_up_proj(norm2(h)))). In place is safe: a kernel quantizes all of its input before any
 * output is written, and it reads each residual element just before writing the same element.
 */
#include <stddef.h>
#include <stdint.h>

int chat_q4_gemm(const uint16_t *x, int M, int K, const uint8_t *qs, const uint16_t *sz, int N, void *y,
                 int threads, const uint16_t *norm, float eps, int swiglu, const uint16_t *residual, int f32);
int chat_q8_gemm(const uint16_t *x, int M, int K, const int8_t *ws, const uint16_t *sc, int N, void *y,
                 int threads, const uint16_t *norm, float eps, int swiglu, const uint16_t *residual, int f32);
int chat_decode_attention(const uint16_t *qkv, int rows, int H, int Hkv, int D, const uint16_t *cos,
                          const uint16_t *sin, const int64_t *rot, const int64_t *write, uint16_t *kc, uint16_t *vc,
                          int L, int P, float scale, uint16_t *out, int threads);

/* A projection: `bits` 4 or 8, its weight and scales in cpu_gemm.py's layouts. */
typedef struct {
  int bits;
  const void *w;
  const uint16_t *s;
} projection;

static int project(const projection *p, const uint16_t *x, int M, int K, int N, void *y, int threads,
                   const uint16_t *norm, float eps, int swiglu, const uint16_t *residual) {
  return p->bits == 4 ? chat_q4_gemm(x, M, K, p->w, p->s, N, y, threads, norm, eps, swiglu, residual, 0)
                      : chat_q8_gemm(x, M, K, p->w, p->s, N, y, threads, norm, eps, swiglu, residual, 0);
}

/* Rows 0..M-1 (the cache's first M rows). bits: the four projections' (q/k/v fused, o, gate/up fused, down);
 * w0..w3, s0..s3 their weights and scales. norm1, norm2 (hidden) bf16 and eps: the layer's RMSNorms. The attention
 * arguments are chat_decode_attention's. Scratch: qkv (M, (H + 2 Hkv) D), attn (M, H D), gate_up (M, 2 inter)
 * bf16. 0; what a kernel returned otherwise (-1: no scratch memory; -2: a position out of range, nothing written). */
int chat_decode_layer(uint16_t *h, int M, int hidden, int inter, int threads, int bits0, const void *w0,
                      const uint16_t *s0, int bits1, const void *w1, const uint16_t *s1, int bits2, const void *w2,
                      const uint16_t *s2, int bits3, const void *w3, const uint16_t *s3, const uint16_t *norm1,
                      const uint16_t *norm2, float eps, int H, int Hkv, int D, const uint16_t *cos,
                      const uint16_t *sin, const int64_t *rot, const int64_t *write, uint16_t *kc, uint16_t *vc,
                      int L, int P, float scale, uint16_t *qkv, uint16_t *attn, uint16_t *gate_up) {
  const projection qkv_proj = {bits0, w0, s0}, o_proj = {bits1, w1, s1}, gate_up_proj = {bits2, w2, s2},
                   down_proj = {bits3, w3, s3};
  int status = project(&qkv_proj, h, M, hidden, (H + 2 * Hkv) * D, qkv, threads, norm1, eps, 0, NULL);
  if (!status) status = chat_decode_attention(qkv, M, H, Hkv, D, cos, sin, rot, write, kc, vc, L, P, scale, attn,
                                              threads);
  if (!status) status = project(&o_proj, attn, M, H * D, hidden, h, threads, NULL, 0.f, 0, h);
  if (!status) status = project(&gate_up_proj, h, M, hidden, 2 * inter, gate_up, threads, norm2, eps, 0, NULL);
  if (!status) status = project(&down_proj, gate_up, M, inter, hidden, h, threads, NULL, 0.f, 1, h);
  return status;
}
