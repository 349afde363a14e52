"""Constrained decoding: one llguidance matcher per constrained sequence, and the token masks of a batch.

A constrained row's logits are masked before sampling (every token that would leave its grammar set to -inf);
the sampled token is then consumed by its matcher. A batch with no constrained row builds no mask at all, so
free rows pay nothing; constrained and free rows share one batch, each with its own mask or none.
The grammar's end (the matcher stopped: nothing more may follow) finishes the sequence as its end key would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import llguidance
import torch

from shared.grammar import GrammarCompiler

_SHIFTS = torch.arange(32, dtype=torch.int32)
Matcher = llguidance.LLMatcher
__all__ = ["Allowed", "GrammarCompiler", "Matcher", "allowed_tokens"]


@dataclass(frozen=True)
class Allowed:
    """The tokens the constrained rows of a batch may take next: `rows` (n,) int64, their indices in the batch;
    `mask` (n, vocab_size) bool, True = allowed. Free rows are not in it (their logits are left alone)."""

    rows: torch.Tensor
    mask: torch.Tensor


def allowed_tokens(matchers: Sequence[Matcher | None], compiler: GrammarCompiler) -> Allowed | None:
    """What each row's matcher allows next, for the rows that have one; None when no row has one (nothing is
    built: free batches pay nothing). Special ids are never allowed, end ids only once the row's grammar accepts
    (shared/grammar.py says why). A matcher in an error state allows nothing (the sampler then leaves that row
    unmasked and its matcher refuses the token, failing its sequence alone)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    vocab = compiler.codec.vocab_size
    bits = torch.empty((len(rows), (vocab + 31) // 32), dtype=torch.int32)
    for j, i in enumerate(rows):
        m, row = matchers[i], bits[j]
        assert m is not None
        m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
    # Bit b of word w is token 32w + b (llguidance's layout).
    mask = ((bits.unsqueeze(-1) >> _SHIFTS) & 1).bool().view(len(rows), -1)[:, :vocab]
    if compiler.banned:
        mask[:, compiler.banned] = False
    for j, i in enumerate(rows):
        m = matchers[i]
        if m is not None and not m.is_accepting():
            mask[j, compiler.end_ids] = False
    return Allowed(torch.tensor(rows, dtype=torch.long), mask)
