"""The decode step's sampling alone, beside the full-vocabulary sort it replaced, in one run:
`python -m tests.bench.sampling [--vocab 49152] [--threads 2]`.

Each case samples one step's logits (rows × vocab, float32, random) for rows that all carry the same
parameters, as a steady decode batch does. "sort (before)" is the previous implementation's filter
(sort the whole vocabulary, mask, scatter back, softmax and draw over the vocabulary), kept here as
the baseline; "Sampler" is worker/engine/sampling.py. Medians of 50 calls after 5 warm-up calls.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from statistics import median

import torch

from shared.sampling import SamplingParams
from tests.bench.common import cpu_model
from worker.engine.sampling import Sampler


def sort_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The filter before partial selection (commit 15faca3): a full sort of every row."""
    vocab = logits.shape[-1]
    k = torch.where(top_k <= 0, vocab, top_k.clamp(max=vocab))
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    ranks = torch.arange(vocab).unsqueeze(0)
    drop = ranks >= k.unsqueeze(1)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    drop |= (torch.cumsum(probs, dim=-1) - probs) >= top_p.unsqueeze(1)
    drop[:, 0] = False
    return logits.scatter(1, sorted_idx, sorted_logits.masked_fill(drop, float("-inf")))


def sort_sample(logits: torch.Tensor, params: list[SamplingParams]) -> list[int]:
    """The previous sampling of unseeded, non-greedy rows: per-row tensors built, sort, draw over the vocabulary."""
    sub = logits / torch.tensor([p.temperature for p in params]).unsqueeze(1)
    sub = sort_filter(sub, torch.tensor([p.top_k for p in params]), torch.tensor([p.top_p for p in params]))
    return torch.multinomial(torch.softmax(sub, dim=-1), 1).view(-1).tolist()


def time_ms(fn: Callable[[], object]) -> float:
    for _ in range(5):
        fn()
    runs = []
    for _ in range(50):
        t = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t) * 1e3)
    return median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=49152, help="SmolLM2's vocabulary by default")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = {
        "top_k 50, temperature 0.8": SamplingParams(temperature=0.8, top_k=50),
        "top_k 5 (the API's default)": SamplingParams(),
        "top_k 50, top_p 0.9": SamplingParams(top_k=50, top_p=0.9),
        "no top_k, top_p 0.9 (a full sort either way)": SamplingParams(top_k=0, top_p=0.9),
        "no top_k, no top_p": SamplingParams(top_k=0),
    }
    print(f"{cpu_model()}, torch {torch.__version__}, {args.threads} threads, "
          f"vocab {args.vocab}, {time.strftime('%Y-%m-%d')}")
    print("| parameters | rows | sort (before) ms | Sampler ms | speed-up |")
    print("|---|---|---|---|---|")
    for name, p in cases.items():
        for rows in (1, 8):
            logits = torch.randn(rows, args.vocab)
            params = [p] * rows
            sampler = Sampler()
            before = time_ms(lambda: sort_sample(logits, params))  # noqa: B023 - called at once
            after = time_ms(lambda: sampler.draw(logits, params, [None] * rows))  # noqa: B023
            print(f"| {name} | {rows} | {before:.2f} | {after:.2f} | {before / after:.1f}× |")


if __name__ == "__main__":
    main()
