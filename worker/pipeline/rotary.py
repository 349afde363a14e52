"""Rotary position tables computed once for every position, and the rotation the lean forwards apply with them.

transformers' rotary modules compute cos and sin from the positions at every step, in fp32, then cast them to the
activations' dtype; the tables here are that same computation done once for positions 0..max_len-1 (gpt-fast's
`precompute_freqs_cis`). `rotate_half(x) * sin` (RoFormer's rotation as transformers writes it:
cat(-x2, x1) * sin) equals `x.roll(half, -1) * sin_signed` with sin_signed = cat(-sin1, sin2) exactly (a sign flip
is exact), one operation fewer per call.
"""

from __future__ import annotations

from typing import Any

import torch


def plain_rope(config: Any) -> bool:
    """Whether a transformers config asks for the plain rotary embedding rotary_tables computes (no scaling type)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("rope_type", "default") == "default"


def rotary_tables(rope: Any, max_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin_signed), each (max_len, rotary_dim) in `dtype`, from a transformers rotary module's `inv_freq`
    (rotary_dim / 2,) and `attention_scaling` (the plain, unscaled rope: callers check the rope type)."""
    pos = torch.arange(max_len, dtype=torch.float32, device=rope.inv_freq.device)
    freqs = torch.outer(pos, rope.inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    half = freqs.shape[-1]
    sin = emb.sin() * rope.attention_scaling
    return (emb.cos() * rope.attention_scaling).to(dtype), torch.cat((-sin[:, :half], sin[:, half:]), -1).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x (..., rotary_dim) rotated: x * cos + rotate_half(x) * sin, with tables from rotary_tables broadcast to x."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed
