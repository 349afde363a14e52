"""The weight matmuls of one decode step, per kernel and row count: `python -m tests.bench.matmul_rows
[--threads 2] [--rows 1,2,4,8,16]`.

SmolLM2-135M's Linear shapes (30 layers of q, k, v, o, gate, up, down, then the 49,152-row output head), random
weights, bf16 activations, one call per weight in order (as a step reads them: weights cold in cache). Kernels:
`int8pack` (torch._weight_int8pack_mm, the `cpu` preset's decode path), `bf16` (a GEMM on a bf16 copy of the
weights: twice int8's bytes, resident), `dequant` (the int8 weight converted to bf16 at every call, the preset's
prompt-chunk path), `fp32`, and `w8a8` (torch._int_mm on int8 weights, pre-transposed, and the activations quantized
per row at every call — absmax / 127, so a row's result still depends on that row alone — the output scaled back:
reads int8 bytes once for all rows; not yet what the engine runs, and its accuracy is not measured here). Median of
7 steps after 2 warm-ups, ms per step. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from statistics import median

import torch

HIDDEN, INTER, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 30
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTER, HIDDEN), (INTER, HIDDEN),
          (HIDDEN, INTER)] * LAYERS + [(VOCAB, HIDDEN)]
KINDS = ("int8pack", "bf16", "dequant", "fp32", "w8a8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.matmul_rows", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,4,8,16")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    weights = []
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f)
        scales = w.abs().amax(1) / 127
        q = torch.round(w / scales[:, None]).to(torch.int8)
        weights.append((q, scales.to(torch.bfloat16), w.to(torch.bfloat16), w, q.t().contiguous(), scales))

    def step(kind: str, xs: dict[int, torch.Tensor]) -> None:
        for (q, s, b, f, qt, sf), (_, in_f) in zip(weights, SHAPES):
            x = xs[in_f]
            if kind == "w8a8":
                xs_ = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
                xq = torch.round(x.float() / xs_).to(torch.int8)
                (torch._int_mm(xq, qt) * xs_ * sf).to(torch.bfloat16)
            elif kind == "int8pack":
                torch._weight_int8pack_mm(x, q, s)
            elif kind == "bf16":
                x @ b.t()
            elif kind == "dequant":
                (x @ q.to(torch.bfloat16).t()) * s
            else:
                x.float() @ f.t()

    out = {}
    for rows in (int(r) for r in a.rows.split(",")):
        xs = {n: torch.randn(rows, n, dtype=torch.bfloat16) for n in (HIDDEN, INTER)}
        res = {}
        for kind in KINDS:
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
