"""A Llama layer's decode attention as one call (cpu_attention.c, built into cpu_gemm.py's library).

With the weight matmuls in cpu_gemm's kernels, most of what was left of an eager 1-row decode step was torch
dispatch around attention: per layer ~25 operations (rotary's multiplies and adds, two index_copy_ KV writes, the
cache slices, SDPA and its reshapes), each a few microseconds, for arithmetic that takes less. This does rotary on
q and k (rotary.py's `rotate`, in torch's bf16 roundings), the KV-cache write and attention over each row's cached
positions (fp32 sums, as torch's CPU flash attention) in one call. It serves decode only (one token per row, the
cache bound to its first rows); prompts keep torch's SDPA. lean_llama.py reaches the kernel through
cpu_decode_layer.py (a whole layer per call); `decode_attention` is its checked entry point on its own.
"""

from __future__ import annotations

import torch

from worker.pipeline import cpu_gemm

MAX_HEAD_DIM = 256  # cpu_attention.c's accumulators


def check(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor,
           write: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """The head dim, after checking every argument's device, dtype, shape and layout (decode_attention's; ValueError
    naming what is wrong). Positions are checked by the kernel."""
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise ValueError(f"cpu_attention: heads ({heads}) must be a positive multiple of kv_heads ({kv_heads})")
    if k_cache.dim() != 4 or k_cache.shape[1] != kv_heads:
        raise ValueError(f"cpu_attention: k_cache must be (slots, {kv_heads}, positions, head_dim), "
                         f"got {tuple(k_cache.shape)}")
    d = k_cache.shape[3]
    if d % 8 or d > MAX_HEAD_DIM:
        raise ValueError(f"cpu_attention: head_dim must be a multiple of 8 up to {MAX_HEAD_DIM}, got {d}")
    rows = qkv.shape[0] if qkv.dim() == 2 else -1
    for name, t, dtype, shape in (("qkv", qkv, torch.bfloat16, (rows, (heads + 2 * kv_heads) * d)),
                                  ("cos", cos, torch.bfloat16, (cos.shape[0], d)),
                                  ("sin", sin, torch.bfloat16, (cos.shape[0], d)),
                                  ("rot", rot, torch.int64, (rows,)), ("write", write, torch.int64, (rows,)),
                                  ("k_cache", k_cache, torch.bfloat16, tuple(k_cache.shape)),
                                  ("v_cache", v_cache, torch.bfloat16, tuple(k_cache.shape))):
        if t.device.type != "cpu" or t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.is_neg():
            raise ValueError(f"cpu_attention: {name} must be contiguous {dtype} {shape} on the CPU, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    if k_cache.data_ptr() == v_cache.data_ptr():
        raise ValueError("cpu_attention: k_cache and v_cache must be two buffers")
    if rows > k_cache.shape[0]:
        raise ValueError(f"cpu_attention: {rows} rows, but the cache holds {k_cache.shape[0]}")
    return d


def _run(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor,
         write: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    d = check(qkv, heads, kv_heads, cos, sin, rot, write, k_cache, v_cache)
    rows = qkv.shape[0]
    out = torch.empty(rows, heads * d, dtype=torch.bfloat16)
    if not rows:
        return out
    # positions are checked in C (a .max() here would be a torch operation per call)
    status = cpu_gemm.loaded().chat_decode_attention(
        qkv.data_ptr(), rows, heads, kv_heads, d, cos.data_ptr(), sin.data_ptr(), rot.data_ptr(), write.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[2], cos.shape[0], scale, out.data_ptr(),
        torch.get_num_threads())
    raise_for_status(status, "cpu_attention", cos.shape[0], k_cache.shape[2], rows)
    return out


def raise_for_status(status: int, where: str, positions: int, cache_positions: int, rows: int) -> None:
    """The error a kernel's status stands for (none for 0): -2, ValueError (a rotary position outside the tables'
    `positions` or a write outside the cache's `cache_positions`; the kernel wrote nothing); else MemoryError."""
    if status == -2:
        raise ValueError(f"{where}: a rotary position is outside the tables' {positions} or a write position "
                         f"outside the cache's {cache_positions}")
    if status:
        raise MemoryError(f"{where}: no scratch memory for {rows} rows")


@torch.library.custom_op("chat_cpu_attention::decode", mutates_args=("k_cache", "v_cache"))
def _op(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor,
        write: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    return _run(qkv, heads, kv_heads, cos, sin, rot, write, k_cache, v_cache, scale)


@_op.register_fake
def _(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor,
      write: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    return qkv.new_empty(qkv.shape[0], heads * k_cache.shape[3])


def decode_attention(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                     rot: torch.Tensor, write: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One decode step's attention for rows 0..R-1 of the cache (decode binds the first R slots).

    qkv (R, (heads + 2 kv_heads) D) bf16: the layer's fused projection, q heads then k heads then v heads. cos, sin
    (P, D) bf16: rotary.py's tables (cos, sin_signed). rot (R,) int64: each row's rotary position, < P; the row
    attends cached positions 0..rot (itself included). write (R,) int64: where its rotated k and its v are written,
    < the cache's positions (its position, or the scratch column for an idle row). k_cache, v_cache (slots, kv_heads,
    positions, D) bf16, written in place. scale: the softmax scale (D^-0.5). Returns (R, heads D) bf16, q head i
    reading KV head i // (heads / kv_heads) (transformers' repeat_kv). ValueError naming a wrong argument or an
    out-of-range position; MemoryError without scratch memory; RuntimeError where the kernels are not built. Under
    torch.compile an opaque op that mutates the caches."""
    if torch.compiler.is_compiling():
        return _op(qkv, heads, kv_heads, cos, sin, rot, write, k_cache, v_cache, scale)
    return _run(qkv, heads, kv_heads, cos, sin, rot, write, k_cache, v_cache, scale)
