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
The output head stays int8 (GGUF files keep it at 8 bits, Q8_0/Q6_K).

Where cpu_gemm.py's kernels are built (x86-64 with AVX2 and a C compiler: `native`), both layer kinds run them
instead of torch's: they unpack each weight block once for all decode rows, with activations quantized per row in
blocks of 32, two int8 levels (cpu_gemm.py gives figures; a row's result still depends on that row alone). On a CPU
without a fast bf16 GEMM (no AMX / AVX-512 BF16) they serve prompt chunks too, and no dense copy is kept."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from worker.pipeline import cpu_gemm

REFINE_TOP = 64  # logits per row recomputed in fp32 where torch's int8 head rounded them (Int8WeightOnlyLinear)


def use_cpu_gemm(native: bool | None, act_dtype: torch.dtype, out_features: int, in_features: int) -> bool:
    """Whether a layer runs cpu_gemm.py's kernels: where they are built and the layer fits them (bf16 activations,
    cpu_gemm.fits), unless `native` is False (torch's kernels). `native` True requires them: ValueError where they
    are not built here."""
    if native is False:
        return False
    if native and not cpu_gemm.available():
        raise ValueError("cpu_gemm: the kernels are not built here (no C compiler, no AVX2, or the build failed)")
    return act_dtype == torch.bfloat16 and cpu_gemm.fits(out_features, in_features) and cpu_gemm.available()


class Int8WeightOnlyLinear(nn.Module):
    """An nn.Linear with int8 weights (out, in) and one scale per output channel (absmax / 127), scales and
    bias in `act_dtype`. `native` (use_cpu_gemm): cpu_gemm's q8 kernel, `weight` in its tiled layout
    (cpu_gemm.q8_layout), for up to `gemv_rows` rows, and for all rows where the CPU has no fast bf16 GEMM.
    Otherwise up to `gemv_rows` rows run int8pack_mm; more dequantize and run a bf16 GEMM. `out_dtype`: the
    outputs' dtype, act_dtype unless set (quantize_weights sets fp32 on the output head: the kernel then writes its
    fp32 sums, not their bf16 rounding, which turns near-tie logits into ties)."""

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype, gemv_rows: int = 16, native: bool | None = None):
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # one scale per output channel
        q = torch.round(w / scales[:, None]).to(torch.int8)
        native = use_cpu_gemm(native, act_dtype, linear.out_features, linear.in_features)
        self._setup(cpu_gemm.q8_layout(q) if native else q, scales.to(act_dtype), gemv_rows, native)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(act_dtype), False)

    def _setup(self, weight: torch.Tensor, scales: torch.Tensor, gemv_rows: int, native: bool) -> None:
        self.gemv_rows, self.native, self.out_features = gemv_rows, native, scales.shape[0]
        self.in_features = weight.shape[1] * (cpu_gemm.GROUP if native else 1)
        self.out_dtype = scales.dtype
        self.kernel_shape = cpu_gemm.check_weights(8, weight, scales) if native else (0, 0)  # checked once
        self.dense_prompts = not native or cpu_gemm.fast_bf16_gemm()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_parts(cls, weight: torch.Tensor, scales: torch.Tensor, gemv_rows: int,
                   native: bool) -> Int8WeightOnlyLinear:
        """A layer over already quantized `weight` ((out, in) int8, or cpu_gemm.q8_layout's tiles when `native`) and
        `scales` (out,) in the activations' dtype, without bias (fused_linear.py builds fused layers this way)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(weight, scales, gemv_rows, native)
        self.bias = None
        return self

    def int8_weight(self) -> torch.Tensor:
        """The (out, in) int8 weight, whatever the layout it is kept in."""
        return cpu_gemm.q8_unlayout(self.weight) if self.native else self.weight

    def kernel_rows(self, rows: int) -> bool:
        """Whether `rows` input rows run cpu_gemm's kernel (kernel_mm)."""
        return self.native and (rows <= self.gemv_rows or not self.dense_prompts)

    def kernel_mm(self, x: torch.Tensor, **fusion: Any) -> torch.Tensor:
        """cpu_gemm.q8_mm on this layer's weight, `fusion` its norm / eps / swiglu / residual (native layers)."""
        return cpu_gemm.layer_mm(8, x, self.weight, self.scales, self.kernel_shape, out_dtype=self.out_dtype, **fusion)

    def kernel_parts(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(bits, weight, scales) as the kernel reads them (native layers; checked when built)."""
        return 8, self.weight, self.scales

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, in_features) contiguous, in the activations' dtype -> (rows, out_features), bias not added:
        the bare matmul, for callers (lean_llama.py) that keep activations 2-d and skip forward()'s reshapes."""
        if self.kernel_rows(x.shape[0]):
            return self.kernel_mm(x)
        if x.shape[0] <= self.gemv_rows:
            y = torch._weight_int8pack_mm(x, self.weight, self.scales)
        else:  # int8 -> bf16 is exact (|w| <= 127); the per-channel scale applies to the output
            y = (x @ self.int8_weight().to(x.dtype).t()) * self.scales
        return self._refined(y, x) if self.out_dtype == torch.float32 and y.dtype != torch.float32 else y

    def _refined(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits (rows, out) from torch's kernels, rounded to the activations' dtype, as fp32 with each row's top
        REFINE_TOP recomputed in fp32: bf16's 8 bits make near-ties exact ties (the default chat's first token, 25.33
        against 25.24 in fp32, both 25.25: the lower token id won), and the top is what greedy and top-k read. The
        rest of the row is far below (bf16's error is ~0.4%); an fp32 pass over the whole head would cost 4x."""
        y = y.float()
        top = y.topk(min(REFINE_TOP, y.shape[1]), dim=-1).indices  # (rows, R)
        w = self.int8_weight()[top].float()  # (rows, R, in)
        exact = torch.bmm(w, x.float().unsqueeze(-1)).squeeze(-1) * self.scales[top].float()
        return y.scatter_(-1, top, exact)

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
    format), w = (q - 8) * scale + zero (zero = min + 8 * scale), scale and zero in `act_dtype`. `native`
    (use_cpu_gemm): `packed` and `scales_zeros` in cpu_gemm.q4_layout's tiles, read by cpu_gemm's q4 kernel;
    otherwise torch's int4pack layout: `packed` (out, in / 2) uint8, `scales_zeros` (in / GROUP, out, 2). `dense`
    (out, in) in `act_dtype`, the same weights dequantized once, for prompt chunks of more than `gemv_rows` rows,
    kept where it pays (torch's kernels; cpu_gemm on a CPU with a fast bf16 GEMM), else None. Bias in `act_dtype`.
    ValueError for a layer the kernels do not take (int4_fits)."""

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype, gemv_rows: int = 16, native: bool | None = None):
        super().__init__()
        if not int4_fits(linear):
            raise ValueError(f"int4: in_features a multiple of {GROUP} and out_features of 16; got {linear}")
        w = linear.weight.detach().float()
        out_f, in_f = w.shape
        groups = w.reshape(out_f, in_f // GROUP, GROUP)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-12)  # ggml: d = (max - min) / 15
        q = torch.round((groups - low) / scale).clamp(0, 15)
        scale, zero = scale.to(act_dtype), (low + 8 * scale).to(act_dtype)
        native = use_cpu_gemm(native, act_dtype, out_f, in_f)
        dense = None
        if not native or cpu_gemm.fast_bf16_gemm():
            # The dense copy from the rounded scale and zero, as the kernel reads them: prompt and decode agree.
            dense = ((q - 8) * scale.float() + zero.float()).reshape(out_f, in_f).to(act_dtype)
        q = q.to(torch.int32).reshape(out_f, in_f)
        if native:
            packed, scales_zeros = cpu_gemm.q4_layout(q, scale[..., 0], zero[..., 0])
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
            scales_zeros = torch.cat([scale, zero], -1).transpose(0, 1).contiguous()
        self._setup(packed, scales_zeros, dense, gemv_rows, native, out_f, in_f)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(act_dtype), False)

    def _setup(self, packed: torch.Tensor, scales_zeros: torch.Tensor, dense: torch.Tensor | None, gemv_rows: int,
               native: bool, out_features: int, in_features: int) -> None:
        self.gemv_rows, self.native, self.out_features, self.in_features = gemv_rows, native, out_features, in_features
        self.kernel_shape = cpu_gemm.check_weights(4, packed, scales_zeros) if native else (0, 0)  # checked once
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.register_buffer("dense", dense)

    @classmethod
    def from_parts(cls, packed: torch.Tensor, scales_zeros: torch.Tensor, dense: torch.Tensor | None, gemv_rows: int,
                   native: bool, out_features: int, in_features: int) -> Int4WeightOnlyLinear:
        """A layer over already quantized parts, laid out as the class docstring says (fused_linear.py)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(packed, scales_zeros, dense, gemv_rows, native, out_features, in_features)
        self.bias = None
        return self

    def dequantized(self) -> torch.Tensor:
        """The (out, in) weight in the activations' dtype: `dense`, or computed from the tiles where none is kept."""
        if self.dense is not None:
            return self.dense
        t, g = self.packed.shape[:2]
        halves = torch.stack([self.packed & 15, self.packed >> 4], 2)  # t, g, half, j, column, i
        q = halves.permute(0, 4, 1, 2, 3, 5).reshape(self.out_features, self.in_features).float()
        scale, zero = self.scales_zeros.permute(2, 0, 3, 1).reshape(2, self.out_features, g)  # (N / TILE, g, 2, TILE)
        w = (q - 8) * scale.float().repeat_interleave(GROUP, 1) + zero.float().repeat_interleave(GROUP, 1)
        return w.to(self.scales_zeros.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) weight (what transformers reads for shapes and dtypes)."""
        return self.dequantized()

    def kernel_rows(self, rows: int) -> bool:
        """Whether `rows` input rows run cpu_gemm's kernel (kernel_mm)."""
        return self.native and (self.dense is None or rows <= self.gemv_rows)

    def kernel_mm(self, x: torch.Tensor, **fusion: Any) -> torch.Tensor:
        """cpu_gemm.q4_mm on this layer's weight, `fusion` its norm / eps / swiglu / residual (native layers)."""
        return cpu_gemm.layer_mm(4, x, self.packed, self.scales_zeros, self.kernel_shape, **fusion)

    def kernel_parts(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(bits, weight, scales) as the kernel reads them (native layers; checked when built)."""
        return 4, self.packed, self.scales_zeros

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, in_features) contiguous, in the activations' dtype -> (rows, out_features), bias not added."""
        if self.kernel_rows(x.shape[0]):
            return self.kernel_mm(x)
        if self.dense is not None and x.shape[0] > self.gemv_rows:
            return x @ self.dense.t()
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features), in the activations' dtype."""
        shape = x.shape
        y = self.mm(x.reshape(-1, shape[-1]).to(self.scales_zeros.dtype).contiguous())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def quantize_weights(model: nn.Module, bits: int, act_dtype: torch.dtype = torch.bfloat16,
                     gemv_rows: int = 16, native: bool | None = None) -> nn.Module:
    """Replace every nn.Linear in place: `bits` 8, all Int8WeightOnlyLinear; 4, Int4WeightOnlyLinear where it fits
    (int4_fits), int8 for the rest and for the output head. The rest of the model moves to act_dtype. `native`:
    cpu_gemm's kernels where they fit (None: where built; use_cpu_gemm). The head's logits come out fp32.
    ValueError for other bits."""
    if bits not in (4, 8):
        raise ValueError(f"quantize: 4 or 8 bits, not {bits}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                four = bits == 4 and child is not head and int4_fits(child)
                kind = Int4WeightOnlyLinear if four else Int8WeightOnlyLinear
                setattr(module, child_name, kind(child, act_dtype, gemv_rows, native))
                if child is head:
                    getattr(module, child_name).out_dtype = torch.float32
    # Cast after quantizing: from the loaded weights, not their bf16 rounding (int4 must find Q4_1's exact grid).
    return model.to(act_dtype)

