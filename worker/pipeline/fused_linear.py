"""Several Linear layers that read the same input as one matmul (q/k/v; gate/up), without a second copy of
their weights.

One call instead of three (or two) saves the per-call cost of each weight matmul: on CPU a decode step is
~211 small matmuls, each with a fixed dispatch cost beside its arithmetic (docs/BENCHMARKS.md, issue 15).
The fused weight is built once by concatenating the layers' weights along the output dimension; each original
layer then reads a view of it (a block of rows of a row-major matrix is contiguous), so transformers' modules
keep working on the same memory and nothing is held twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.pipeline.quantize import PACK_BLOCK_N, Int4WeightOnlyLinear, Int8WeightOnlyLinear


class Concatenated(nn.Module):
    """The fallback where weights cannot be fused: each layer's matmul, outputs concatenated along the last dim."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(layers)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, in) -> (rows, sum of out)."""
        return torch.cat([part.mm(x) for part in self.parts], -1)


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for x (rows, in) contiguous in the layer's activation dtype -> (rows, out), with no reshapes: quantized
    and fused layers' bare `mm` (plus their bias), nn.Linear's forward (F.linear, no module hooks)."""
    if not hasattr(layer, "mm"):
        return layer.forward(x)
    y = layer.mm(x)
    bias = getattr(layer, "bias", None)
    return y if bias is None else y + bias


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm of x (rows, features): normalized in fp32, cast back to x's dtype, then times `weight`.
    (F.rms_norm for the middle: fewer calls, no faster on CPU, measured side by side.)"""
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def project(layer: nn.Module, x: torch.Tensor, *, norm: nn.Module | None = None, swiglu: bool = False,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """A Llama decode layer's step around one weight matmul: linear(layer, x') (+ residual), x' = rms_norm(x,
    norm.weight, norm.variance_epsilon) with `norm`, silu(x[:, :half]) * x[:, half:] with `swiglu`. x (rows, in) or
    (rows, 2 * in) with swiglu, contiguous, in the layer's activation dtype -> (rows, out). Where the layer runs
    cpu_gemm's kernel for these rows, all of it is that one call (the kernel folds them in, in torch's roundings);
    elsewhere the same operations in torch."""
    if getattr(layer, "native", False) and layer.bias is None and layer.kernel_rows(x.shape[0]):
        fusion: dict[str, Any] = {"swiglu": swiglu, "residual": residual}
        if norm is not None:
            fusion |= {"norm": norm.weight, "eps": float(norm.variance_epsilon)}
        return layer.kernel_mm(x, **fusion)
    if swiglu:
        half = x.shape[1] // 2
        x = F.silu(x[:, :half]) * x[:, half:]
    if norm is not None:
        x = rms_norm(x, norm.weight, norm.variance_epsilon)
    y = linear(layer, x)
    return y if residual is None else residual + y


def _views(layers: Sequence[nn.Module], name: str, fused: torch.Tensor, dim: int = 0) -> None:
    """Re-point each layer's buffer `name` at its block of `fused` (split along `dim` by the layers' sizes)."""
    sizes = [getattr(layer, name).shape[dim] for layer in layers]
    for layer, part in zip(layers, fused.split(sizes, dim), strict=True):
        setattr(layer, name, part)  # a registered buffer: plain assignment re-registers it


def fuse_linears(layers: Sequence[nn.Module]) -> nn.Module:
    """One module computing `torch.cat([layer(x) for layer in layers], -1)` for `layers` all of one kind (nn.Linear,
    Int8WeightOnlyLinear or Int4WeightOnlyLinear) over the same in_features, none with a bias. The layers are
    re-pointed at views of the fused weights. Layers on torch's int4 layout whose out_features are not multiples of
    its packing block (PACK_BLOCK_N), or layers on different layouts, cannot be fused: they come back as a
    Concatenated. ValueError for anything else."""
    kinds = {type(layer) for layer in layers}
    kind = kinds.pop() if len(kinds) == 1 else None
    if kind not in (nn.Linear, Int8WeightOnlyLinear, Int4WeightOnlyLinear):
        raise ValueError(f"fuse_linears: layers all of one kind, got {sorted(map(str, {type(x) for x in layers}))}")
    if any(layer.bias is not None for layer in layers) or len({layer.in_features for layer in layers}) != 1:
        raise ValueError("fuse_linears: layers without bias over the same in_features")
    gemv_rows = getattr(layers[0], "gemv_rows", 0)
    if len({getattr(layer, "native", False) for layer in layers}) != 1:
        return Concatenated(layers)  # one on cpu_gemm's tiles, one on torch's layout
    native = getattr(layers[0], "native", False)
    out_features = sum(layer.out_features for layer in layers)
    if kind is Int4WeightOnlyLinear:
        if not native and any(layer.out_features % PACK_BLOCK_N for layer in layers):
            return Concatenated(layers)
        # cpu_gemm's tiles run along dim 0 (output columns); torch's scales_zeros along dim 1
        dense = None if layers[0].dense is None else torch.cat([layer.dense for layer in layers])
        fused = Int4WeightOnlyLinear.from_parts(
            torch.cat([layer.packed for layer in layers]),
            torch.cat([layer.scales_zeros for layer in layers], 0 if native else 1),
            dense, gemv_rows, native, out_features, layers[0].in_features)
        _views(layers, "packed", fused.packed)
        if dense is not None:
            _views(layers, "dense", fused.dense)
        if native:  # torch's small scales_zeros stay each layer's own: a view along dim 1 is not contiguous
            _views(layers, "scales_zeros", fused.scales_zeros)
        return fused
    weight = torch.cat([layer.weight.detach() for layer in layers])
    if kind is Int8WeightOnlyLinear:
        fused = Int8WeightOnlyLinear.from_parts(weight, torch.cat([layer.scales for layer in layers]), gemv_rows,
                                                native)
        _views(layers, "weight", fused.weight)
        _views(layers, "scales", fused.scales)
        return fused
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    for layer, w in zip(layers, weight.split([layer.weight.shape[0] for layer in layers]), strict=True):
        layer.weight = nn.Parameter(w, requires_grad=False)
    return fused
