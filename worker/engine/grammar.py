"""Constrained decoding: one llguidance matcher per constrained sequence, and the token masks of a batch.

A constrained row's logits are masked before sampling (every token that would leave its grammar set to -inf);
the sampled token is then consumed by its matcher. A batch with no constrained row builds no mask at all, so
free rows pay nothing; constrained and free rows share one batch, each with its own mask or none.
The grammar's end (the matcher stopped: nothing more may follow) finishes the sequence as its end key would.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import llguidance
import llguidance.hf
import torch

from shared.codec import Codec
from shared.grammar import Grammar

_SHIFTS = torch.arange(32, dtype=torch.int32)
Matcher = llguidance.LLMatcher


class GrammarCompiler:
    """Matchers for one codec's tokenizer (shared/codec.py). The llguidance tokenizer is built on first use (about
    a second for a 49,152-token vocabulary), not at worker start: most workers never see a grammar. Thread-safe."""

    def __init__(self, codec: Codec):
        self._codec = codec
        self._tok: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def _tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tok is None:
                c = self._codec  # its real ids are the engine's logits' width; its end ids end a grammar's reply
                self._tok = llguidance.hf.from_tokenizer(c.tokenizer, n_vocab=c.vocab_size, eos_token=sorted(c.end_ids))
            return self._tok

    def matcher(self, grammar: Grammar) -> Matcher:
        """A fresh matcher at the grammar's start. Raises ValueError (param grammar) when the grammar cannot be
        built for this tokenizer (the producer validated it without one)."""
        m = llguidance.LLMatcher(self._tokenizer(), grammar.compiled(), log_level=0)
        if m.is_error():
            raise ValueError(f"grammar: {m.get_error()[:300]}")
        return m


@dataclass(frozen=True)
class Allowed:
    """The tokens the constrained rows of a batch may take next: `rows` (n,) int64, their indices in the batch;
    `mask` (n, vocab_size) bool, True = allowed. Free rows are not in it (their logits are left alone)."""

    rows: torch.Tensor
    mask: torch.Tensor


def allowed_tokens(matchers: Sequence[Matcher | None], vocab_size: int) -> Allowed | None:
    """What each row's matcher allows next, for the rows that have one; None when no row has one (nothing is
    built: free batches pay nothing). A matcher in an error state allows nothing (the sampler then leaves that row
    unmasked and its matcher refuses the token, failing its sequence alone)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    bits = torch.empty((len(rows), (vocab_size + 31) // 32), dtype=torch.int32)
    for j, i in enumerate(rows):
        m, row = matchers[i], bits[j]
        assert m is not None
        m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
    # Bit b of word w is token 32w + b (llguidance's layout).
    mask = ((bits.unsqueeze(-1) >> _SHIFTS) & 1).bool().view(len(rows), -1)[:, :vocab_size]
    return Allowed(torch.tensor(rows, dtype=torch.long), mask)
