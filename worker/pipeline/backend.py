"""What the engine asks of a device: prefill one slot, decode a batch of slots, detach.

Every backend keeps a KV cache of `slots x max_len` positions on its device. Shapes are static:
prefill runs in chunks from a fixed set of sizes, decode over a fixed row count per call site, so
compiled graphs (CUDA graphs, poptorch executables) are reused instead of rebuilt per prompt.
"""

from __future__ import annotations

from typing import Protocol

import torch

PREFILL_CHUNKS = (16, 32, 64, 128, 256)  # prompt chunk sizes; a prompt is cut into these


def chunk_plan(n: int, chunks: tuple[int, ...] = PREFILL_CHUNKS) -> list[tuple[int, int]]:
    """Cut n prompt tokens into (real, padded) chunk sizes: full largest chunks, then the smallest
    chunk size that holds the rest."""
    plan = []
    big = chunks[-1]
    while n > big:
        plan.append((big, big))
        n -= big
    plan.append((n, next(c for c in chunks if c >= n)))
    return plan


class Backend(Protocol):
    slots: int  # sequences decoded together (the micro-batch on IPU)
    max_len: int  # positions per slot (the compiled sequence length)
    attached: bool

    def prefill(self, slot: int, ids: list[int], start: int) -> torch.Tensor:
        """Write `ids` into `slot` at positions start.., return the last token's logits (vocab,) fp32."""
        ...

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """One token for each of the first `len(ids)` slots at `positions`; rows where `active` is
        False are idle (their writes go nowhere). Returns logits (rows, vocab) fp32."""
        ...

    def detach(self) -> None:
        """Release the device. Idempotent."""
        ...
