"""Weight-only int8 for Linear layers on CPU (as gpt-fast does): a quarter of fp32's bytes per
decode step, activations kept in bf16, so each row's result is independent of its batch mates
(unlike dynamic activation quantization, whose scale is shared by the whole batch).

int8pack_mm is a per-row kernel: its cost grows with the rows (8 rows cost ~4x one row, 64 rows
more than an fp32 GEMM). Up to `gemv_rows` rows (decode: one per slot) it is used; beyond (prompt
chunks) the weight is dequantized to bf16 once per call and a GEMM runs, 2-3x faster at 64+ rows.
Decode never crosses the threshold, so a decoding row's result still never depends on its batch."""

from __future__ import annotations

import torch
from torch import nn


class Int8WeightOnlyLinear(nn.Module):
    """An nn.Linear with int8 weights (out, in) and one scale per output channel (absmax / 127), scales and
    bias in `act_dtype`. Up to `gemv_rows` input rows run int8pack_mm; more dequantize and run a GEMM."""

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype, gemv_rows: int = 16):
        super().__init__()
        self.gemv_rows = gemv_rows
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # one scale per output channel
        self.register_buffer("weight", torch.round(w / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales.to(act_dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(act_dtype), False)
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features), in act_dtype."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.scales.dtype).contiguous()
        if x2.shape[0] <= self.gemv_rows:
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales)
        else:  # int8 -> bf16 is exact (|w| <= 127); the per-channel scale applies to the output
            y = (x2 @ self.weight.to(x2.dtype).t()) * self.scales
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def quantize_int8(model: nn.Module, act_dtype: torch.dtype = torch.bfloat16, gemv_rows: int = 16) -> nn.Module:
    """Replace every nn.Linear (the output head included) in place; the rest moves to act_dtype."""
    model.to(act_dtype)
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8WeightOnlyLinear(child, act_dtype, gemv_rows))
    return model
