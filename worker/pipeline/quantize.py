"""Weight-only int8 and int4 for Linear layers on CPU (as gpt-fast does): a quarter (an eighth) of fp32's
bytes per decode step, activations kept in bf16, so each row's result is independent of its batch mates
(unlike dynamic activation quantization, whose scale is shared by the whole batch).

int8pack_mm is a per-row kernel: its cost grows with the rows (8 rows cost ~4x one row, 64 rows
more than an fp32 GEMM). Up to `gemv_rows` rows (decode: one per slot) it is used; beyond (prompt
chunks) the weight is dequantized to bf16 once per call and a GEMM runs, 2-3x faster at 64+ rows.
Decode never crosses the threshold, so a decoding row's result still never depends on its batch.

int4 (`quantize: int4`) is GGUF's Q4_1 layout: groups of 32 weights along the input, each with a scale and a
minimum, w = q * scale + min, q in 0..15 (ggml's quantize_row_q4_1). A Q4_1 block always holds its min (q = 0) and
max (q = 15), so re-quantizing a Q4_1 model's dequantized weights finds the same scale, minimum and q: the
weights come back as the file had them, up to bf16 rounding of the scale and minimum; per-channel int8 of the
same weights adds its own rounding instead. torch._weight_int4pack_mm_for_cpu reads half int8's bytes: 5.6 vs
11.9 ms for one SmolLM2 step's weight matmuls at 1 row, 17.9 vs 27.2 at 8 (tests/bench/matmul_rows.py). It too is a
per-row kernel; prompt chunks run a bf16 GEMM on a resident dequantized copy (built once: 2 bytes per weight).
The output head stays int8 (GGUF files keep it at 8 bits, Q8_0/Q6_K)."""

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

    @classmethod
    def from_parts(cls, weight: torch.Tensor, scales: torch.Tensor, gemv_rows: int) -> Int8WeightOnlyLinear:
        """A layer over already quantized `weight` (out, in) int8 and `scales` (out,) in the activations' dtype,
        without bias (fused_linear.py builds fused layers this way)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.gemv_rows, self.bias, self.out_features = gemv_rows, None, weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        return self

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, in_features) contiguous, in the activations' dtype -> (rows, out_features), bias not added:
        the bare matmul, for callers (lean_llama.py) that keep activations 2-d and skip forward()'s reshapes."""
        if x.shape[0] <= self.gemv_rows:
            return torch._weight_int8pack_mm(x, self.weight, self.scales)
        # int8 -> bf16 is exact (|w| <= 127); the per-channel scale applies to the output
        return (x @ self.weight.to(x.dtype).t()) * self.scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features), in act_dtype."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.scales.dtype).contiguous()
        y = self.mm(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


GROUP = 32  # Q4_1's block: weights per scale and minimum
PACK_BLOCK_N = 64  # torch's int4 CPU packing interleaves output rows in blocks of 64 (tests/test_quantize.py)


def int4_fits(linear: nn.Linear) -> bool:
    """Whether torch's int4 CPU kernel takes this layer: in_features a multiple of GROUP, out_features of 16."""
    return linear.in_features % GROUP == 0 and linear.out_features % 16 == 0


class Int4WeightOnlyLinear(nn.Module):
    """An nn.Linear with 4-bit weights in groups of GROUP along in_features (the module docstring gives the
    format): `packed`, torch's (out, in / 2) uint8 layout; `scales_zeros` (in / GROUP, out, 2) in `act_dtype`, torch's
    kernel reading w = (q - 8) * scale + zero, so zero = min + 8 * scale; `dense` (out, in) in `act_dtype`, the same
    weights dequantized once, for prompt chunks; bias in `act_dtype`. Up to `gemv_rows` input rows run int4pack_mm, more
    a GEMM on `dense`. ValueError for a layer the kernel does not take (int4_fits)."""

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype, gemv_rows: int = 16):
        super().__init__()
        if not int4_fits(linear):
            raise ValueError(f"int4: in_features a multiple of {GROUP} and out_features of 16; got {linear}")
        self.gemv_rows, self.out_features = gemv_rows, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(act_dtype), False)
        w = linear.weight.detach().float()
        out_f, in_f = w.shape
        groups = w.reshape(out_f, in_f // GROUP, GROUP)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-12)  # ggml: d = (max - min) / 15
        q = torch.round((groups - low) / scale).clamp(0, 15)
        scale, zero = scale.to(act_dtype), (low + 8 * scale).to(act_dtype)
        # The dense copy from the rounded scale and zero, as the kernel reads them: prompt and decode agree.
        dense = (q - 8) * scale.float() + zero.float()
        q = q.to(torch.int32).reshape(out_f, in_f)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_zeros", torch.cat([scale, zero], -1).transpose(0, 1).contiguous())
        self.register_buffer("dense", dense.reshape(out_f, in_f).to(act_dtype))

    @classmethod
    def from_parts(cls, packed: torch.Tensor, scales_zeros: torch.Tensor, dense: torch.Tensor,
                   gemv_rows: int) -> Int4WeightOnlyLinear:
        """A layer over already quantized parts, laid out as the class docstring says (fused_linear.py)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.gemv_rows, self.bias, self.out_features = gemv_rows, None, dense.shape[0]
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.register_buffer("dense", dense)
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) weight (what transformers reads for shapes and dtypes)."""
        return self.dense

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, in_features) contiguous, in the activations' dtype -> (rows, out_features), bias not added."""
        if x.shape[0] <= self.gemv_rows:
            return torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)
        return x @ self.dense.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features), in the activations' dtype."""
        shape = x.shape
        y = self.mm(x.reshape(-1, shape[-1]).to(self.dense.dtype).contiguous())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def quantize_weights(model: nn.Module, bits: int, act_dtype: torch.dtype = torch.bfloat16,
                     gemv_rows: int = 16) -> nn.Module:
    """Replace every nn.Linear in place: `bits` 8, all Int8WeightOnlyLinear; 4, Int4WeightOnlyLinear where it fits
    (int4_fits), int8 for the rest and for the output head. The rest of the model moves to act_dtype.
    ValueError for other bits."""
    if bits not in (4, 8):
        raise ValueError(f"quantize: 4 or 8 bits, not {bits}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                four = bits == 4 and child is not head and int4_fits(child)
                kind = Int4WeightOnlyLinear if four else Int8WeightOnlyLinear
                setattr(module, child_name, kind(child, act_dtype, gemv_rows))
    # Cast after quantizing: from the loaded weights, not their bf16 rounding (int4 must find Q4_1's exact grid).
    return model.to(act_dtype)

