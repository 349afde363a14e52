"""Prefix reuse: the KV of finished sequences stays in the cache's rows, and a new prompt that starts
with tokens one of them holds prefills only the rest (vLLM's automatic prefix caching, SGLang's
RadixAttention, TGI 3's prefix cache: the same idea over this engine's row layout).

The backend's KV cache has `slots` decode rows (a step decodes the first n of them, so they stay
packed) and `spare` rows beyond them that only ever hold cached prefixes. Every row remembers the
token ids whose keys and values it holds at positions 0..len-1. A sequence that leaves a decode row
leaves its tokens there; when the row is given to a new sequence with another prefix, that entry is
first moved to another row not in use (a spare row or a free decode row: the least recently used one is
evicted) if it is the more recent. A new
sequence is placed in the lowest free decode row, and the longest matching entry of any row is copied
into it (or is already there). A row in use is read too, but only as far as its sequence has written
(its entry: the reused prefix at first, the whole prompt once prefilled): a running sequence only ever
writes past its own position, so what it wrote stays put. Matching is on token ids only: a stateful `/api`
conversation and a stateless `/v1` resend of the same history hit alike.

The plan is pure bookkeeping (no tensors): `place` returns the row copies to run, in order, before
the row is written. An entry is dropped as soon as its row is given to a sequence that does not
continue it, so nothing is ever read from a row that was overwritten. All methods run under the
engine's lock.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

from worker.pipeline.backend import Copy


class Placement(NamedTuple):
    """Where a prompt starts: `cached` of its tokens are in its row once `copies` have run."""

    cached: int
    copies: list[Copy]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists. Slice comparisons run in C: a binary search
    over them is ~50x faster than a Python loop on 2,000-token prompts."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class _Entry:
    tokens: list[int] = field(default_factory=list)  # ids whose KV the row holds at positions 0..len-1
    used: int = 0  # logical clock of the last store or hit (LRU)


@dataclass
class PrefixCache:
    """Bookkeeping of what each of `slots + spare` KV rows holds. Rows 0..slots-1 decode; the rest only cache."""

    slots: int
    spare: int
    hit_tokens: int = 0  # prompt tokens served from the cache, since start
    prompt_tokens: int = 0  # prompt tokens placed, since start
    _rows: list[_Entry] = field(init=False)
    _clock: itertools.count = field(init=False, default_factory=itertools.count)

    def __post_init__(self) -> None:
        self._rows = [_Entry() for _ in range(self.slots + self.spare)]

    def cached(self, row: int) -> list[int]:
        """The token ids row `row` holds (a copy)."""
        return list(self._rows[row].tokens)

    def place(self, prompt: list[int], slot: int, busy: set[int]) -> Placement:
        """Plan the start of `prompt` in decode row `slot` (free; `busy`: decode rows holding a sequence,
        never written to). At most len(prompt) - 1 tokens are reused: the last one is prefilled for its
        logits."""
        limit = len(prompt) - 1
        best, best_n = -1, 0
        for row, e in enumerate(self._rows):
            if not e.tokens:
                continue
            n = min(common_prefix(e.tokens, prompt), limit)
            if n > best_n or (n == best_n and n and row == slot):  # a tie: no copy beats a copy
                best, best_n = row, n
        copies: list[Copy] = []
        here = self._rows[slot]
        if here.tokens and best != slot:
            copies += self._demote(slot, avoid={best, *busy})
        if best_n and best != slot:
            copies.append(Copy(best, slot, best_n))
        if best_n and best != slot and best not in busy and best_n == len(self._rows[best].tokens):
            # All of it goes into `slot`, which keeps it even if the sequence ends before writing more: the
            # copy left behind is a duplicate that would crowd out another conversation's entry (LRU), so the
            # row is freed (a conversation's turns otherwise leave a trail of their older prefixes).
            self._rows[best] = _Entry()
        elif best_n:
            self._rows[best].used = next(self._clock)
        # The row holds the reused prefix from now on; the sequence's own tokens are recorded when it leaves.
        self._rows[slot] = _Entry(list(prompt[:best_n]), next(self._clock))
        self.hit_tokens += best_n
        self.prompt_tokens += len(prompt)
        return Placement(best_n, copies)

    def _demote(self, slot: int, avoid: set[int]) -> list[Copy]:
        """Move decode row `slot`'s entry to the least recently used other row (spare rows first on a tie:
        a free decode row is the next to be taken), if it is the more recent one (else it is the one
        evicted). `avoid`: rows in use, and the row about to be copied from."""
        here = self._rows[slot]
        spares = [r for r in reversed(range(len(self._rows))) if r != slot and r not in avoid]
        if not spares:
            return []
        victim = min(spares, key=lambda r: (bool(self._rows[r].tokens), self._rows[r].used))
        if self._rows[victim].tokens and self._rows[victim].used > here.used:
            return []
        self._rows[victim] = _Entry(here.tokens, here.used)
        return [Copy(slot, victim, len(here.tokens))]

    def store(self, slot: int, tokens: list[int]) -> None:
        """Decode row `slot` holds KV for `tokens` at positions 0..len-1 (a prompt prefilled, a sequence
        that left)."""
        self._rows[slot] = _Entry(tokens, next(self._clock))

    def drop(self, row: int) -> None:
        """Forget what row `row` holds (its content is not trusted: a failed write, a failed copy)."""
        self._rows[row] = _Entry()

    def clear(self) -> None:
        """Forget every row."""
        for row in range(len(self._rows)):
            self.drop(row)
