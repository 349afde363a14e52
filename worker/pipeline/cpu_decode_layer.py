"""A Llama decode step's layers as one kernel call each (cpu_decode_layer.c, built into cpu_gemm.py's library).

Where every projection of a layer runs cpu_gemm's kernels and its attention cpu_attention's, lean_llama.py's layer
is five kernel calls; from Python each cost ~5 us of checks, allocation and ctypes conversion besides the kernel.
This makes them one call per layer: the weights were checked when the layers were built, the step's activations,
positions, tables and caches are checked once here, and the scratch is allocated once per step. The arithmetic is
the five calls' (tests/test_cpu_decode_layer.py compares them bit for bit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from worker.pipeline import cpu_attention, cpu_gemm


@dataclass(frozen=True)
class LayerKernels:
    """One decoder layer as the kernels read it: its four projections (native Int4/Int8WeightOnlyLinear, no bias:
    q/k/v fused, o, gate/up fused, down) and its two RMSNorm weights (hidden,) bf16 with their eps."""

    qkv: nn.Module
    o: nn.Module
    gate_up: nn.Module
    down: nn.Module
    norm1: torch.Tensor
    norm2: torch.Tensor
    eps: float

    def __post_init__(self) -> None:
        if not LayerKernels.fits(self.qkv, self.o, self.gate_up, self.down):
            raise ValueError("cpu_decode_layer: the four projections must run the kernels, without bias, q/k/v and "
                             "gate/up reading what o and down write, down reading half of what gate/up writes")
        hidden = self.o.kernel_shape[1]
        for name, t in (("norm1", self.norm1), ("norm2", self.norm2)):
            if not t.is_cpu or t.dtype != torch.bfloat16 or t.shape != (hidden,) or not t.is_contiguous():
                raise ValueError(f"cpu_decode_layer: {name} must be contiguous bf16 ({hidden},) on the CPU, got "
                                 f"{tuple(t.shape)} {t.dtype} on {t.device}")

    @staticmethod
    def fits(qkv: nn.Module, o: nn.Module, gate_up: nn.Module, down: nn.Module) -> bool:
        """Whether the four projections run the kernels (native, no bias) at the shapes a layer call assumes:
        q/k/v and gate/up read what o and down write (hidden), down reads half of what gate/up writes."""
        projections = (qkv, o, gate_up, down)
        if not all(getattr(p, "native", False) and p.bias is None for p in projections):
            return False
        hidden, inter = o.kernel_shape[1], down.kernel_shape[0]
        return qkv.kernel_shape[0] == hidden and gate_up.kernel_shape == (hidden, 2 * inter) and \
            down.kernel_shape[1] == hidden


def decode_layers(h: torch.Tensor, layers: Sequence[LayerKernels], heads: int, kv_heads: int, cos: torch.Tensor,
                  sin: torch.Tensor, rot: torch.Tensor, write: torch.Tensor,
                  caches: Sequence[tuple[torch.Tensor, torch.Tensor]], scale: float) -> torch.Tensor:
    """Every layer's decode step on h (R, hidden) bf16 contiguous, in place, for rows 0..R-1 of the caches; returns h.
    The attention arguments are cpu_attention.decode_attention's (`caches`: each layer's (k, v), all alike, as
    every layer's projections). ValueError naming a wrong argument or an out-of-range position (nothing written
    then: checked before the first layer); MemoryError without scratch memory."""
    rows = h.shape[0]
    d = caches[0][0].shape[3]
    hidden = layers[0].o.kernel_shape[1]
    inter = layers[0].down.kernel_shape[0]
    qkv = torch.empty(rows, (heads + 2 * kv_heads) * d, dtype=torch.bfloat16)
    if not h.is_cpu or h.dtype != torch.bfloat16 or h.shape != (rows, hidden) or not h.is_contiguous():
        raise ValueError(f"cpu_decode_layer: h must be contiguous bf16 ({rows}, {hidden}) on the CPU, got "
                         f"{tuple(h.shape)} {h.dtype} on {h.device}")
    if layers[0].o.kernel_shape[0] != heads * d or layers[0].qkv.kernel_shape != (hidden, qkv.shape[1]):
        raise ValueError("cpu_decode_layer: the projections' shapes do not match the attention's heads")
    cpu_attention.check(qkv, heads, kv_heads, cos, sin, rot, write, *caches[0])
    first = [p.kernel_shape for p in (layers[0].qkv, layers[0].o, layers[0].gate_up, layers[0].down)]
    for i, (layer, (k, v)) in enumerate(zip(layers, caches, strict=True)):  # the rest like the first, cheaply
        if (k.shape != caches[0][0].shape or v.shape != k.shape or k.dtype != torch.bfloat16 or v.dtype != k.dtype
                or not k.is_contiguous() or not v.is_contiguous() or not k.is_cpu or not v.is_cpu
                or [p.kernel_shape for p in (layer.qkv, layer.o, layer.gate_up, layer.down)] != first):
            raise ValueError(f"cpu_decode_layer: layer {i}'s caches or projections differ from layer 0's")
    attn = torch.empty(rows, heads * d, dtype=torch.bfloat16)
    gate_up = torch.empty(rows, 2 * inter, dtype=torch.bfloat16)
    if not rows:
        return h
    fn = cpu_gemm.loaded().chat_decode_layer
    threads = torch.get_num_threads()
    for layer, (k, v) in zip(layers, caches, strict=True):
        parts = []
        for p in (layer.qkv, layer.o, layer.gate_up, layer.down):
            bits, w, s = p.kernel_parts()
            parts += [bits, w.data_ptr(), s.data_ptr()]
        status = fn(h.data_ptr(), rows, hidden, inter, threads, *parts, layer.norm1.data_ptr(),
                    layer.norm2.data_ptr(), layer.eps, heads, kv_heads, d, cos.data_ptr(), sin.data_ptr(),
                    rot.data_ptr(), write.data_ptr(), k.data_ptr(), v.data_ptr(), k.shape[2], cos.shape[0], scale,
                    qkv.data_ptr(), attn.data_ptr(), gate_up.data_ptr())
        cpu_attention.raise_for_status(status, "cpu_decode_layer", cos.shape[0], k.shape[2], rows)
    return h
