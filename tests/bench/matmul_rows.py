"""The weight matmuls of one decode step, per kernel and row count: `python -m tests.bench.matmul_rows
[--threads 2] [--rows 1,2,4,8,16] [--kinds ...]`.

SmolLM2-135M's Linear shapes as the lean forward runs them (30 layers of fused q/k/v, o, fused gate/up, down,
then the 49,152-row output head: 121 calls), random weights, bf16 activations, one call per weight in order (as a
step reads them: weights cold in cache). Kernels: `int8pack` (torch._weight_int8pack_mm, the `cpu-int8` preset's
decode path on torch's kernels), `int4pack` (torch._weight_int4pack_mm_for_cpu, 4-bit weights in groups of 32 with a
bf16 scale and zero each, the layout of the GGUF's Q4_1 blocks: half int8's bytes; the head too), `cpu_gemm`
(worker/pipeline/cpu_gemm.py, the `cpu` preset's decode path where it builds: the 4-bit layers on its q4 kernel, the
int8 head on its q8 kernel, activations quantized per row in blocks of 32), `bf16` (a GEMM on a bf16 copy of the
weights: twice int8's bytes, resident), `dequant` (the int8 weight converted to bf16 at every call, the `cpu-int8`
prompt-chunk path on torch's kernels), `fp32`, and `w8a8` (torch._int_mm on int8 weights, pre-transposed, and the
activations quantized per row at every call — absmax / 127 — the output scaled back: reads int8 bytes once for all
rows; not what the engine runs). Median of 7 steps after 2 warm-ups, ms per step. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from statistics import median

import torch

from worker.pipeline import cpu_gemm
from worker.pipeline.quantize import GROUP, Int4WeightOnlyLinear

HIDDEN, INTER, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 30
SHAPES = [(HIDDEN + 2 * KV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)] * LAYERS
SHAPES += [(VOCAB, HIDDEN)]
KINDS = ("int8pack", "int4pack", "cpu_gemm", "bf16", "dequant", "fp32", "w8a8")


def int4pack(w: torch.Tensor, native: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) fp32 -> the packed 4-bit weight and its scales and zeros (quantize.py's layer), in torch's int4pack
    layout or (`native`) cpu_gemm's."""
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w
    q = Int4WeightOnlyLinear(linear, torch.bfloat16, native=native)
    return q.packed, q.scales_zeros


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.matmul_rows", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--kinds", default=",".join(KINDS))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    weights = []
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f)
        scales = w.abs().amax(1) / 127
        q = torch.round(w / scales[:, None]).to(torch.int8)
        native = "cpu_gemm" in a.kinds.split(",") and cpu_gemm.available()
        weights.append((q, scales.to(torch.bfloat16), w.to(torch.bfloat16), w, q.t().contiguous(), scales,
                        int4pack(w), (int4pack(w, True) if out_f != VOCAB else cpu_gemm.q8_layout(q)) if native
                        else None))

    def step(kind: str, xs: dict[int, torch.Tensor]) -> None:
        for (q, s, b, f, qt, sf, (p4, sz), ours), (out_f, in_f) in zip(weights, SHAPES, strict=True):
            x = xs[in_f]
            if kind == "cpu_gemm":
                cpu_gemm.q8_mm(x, ours, s) if out_f == VOCAB else cpu_gemm.q4_mm(x, *ours)
            elif kind == "w8a8":
                xs_ = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
                xq = torch.round(x.float() / xs_).to(torch.int8)
                (torch._int_mm(xq, qt) * xs_ * sf).to(torch.bfloat16)
            elif kind == "int8pack":
                torch._weight_int8pack_mm(x, q, s)
            elif kind == "int4pack":
                torch._weight_int4pack_mm_for_cpu(x, p4, GROUP, sz)
            elif kind == "bf16":
                x @ b.t()
            elif kind == "dequant":
                (x @ q.to(torch.bfloat16).t()) * s
            else:
                x.float() @ f.t()

    out = {}
    for rows in (int(r) for r in a.rows.split(",")):
        kinds = [k for k in KINDS if k in a.kinds.split(",") and (k != "cpu_gemm" or cpu_gemm.available())]
        xs = {n: torch.randn(rows, n, dtype=torch.bfloat16) for n in (HIDDEN, INTER)}
        res = {}
        for kind in kinds:
            for _ in range(2):
                step(kind, xs)
            times = []
            for _ in range(7):
                t = time.perf_counter()
                step(kind, xs)
                times.append(time.perf_counter() - t)
            res[kind] = round(median(times) * 1e3, 1)
        out[rows] = res
    print(json.dumps({"torch": torch.__version__, "threads": a.threads, "ms_per_step": out}, indent=1))


if __name__ == "__main__":
    main()
