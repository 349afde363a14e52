"""Which worker a new conversation's first turn should go to, so that its next turns find their KV cache.

A conversation that had a turn goes to the worker that answered it (the START script reads that from the
conversation, atomically with the liveness check: producer/store.py). A new one has no such worker; every
stateless `/v1` request is one, resending the whole history. What all the resends of one conversation share
is its opening (system prompt and first user message), so the opening picks the worker: by rendezvous
(highest random weight) hashing over the model's live workers, each producer computes the same choice with
no coordination, and a worker leaving or joining moves only the openings it wins or won.

This is only a preference: START routes to that worker's own queue only if it is live and not overloaded,
otherwise to the model's shared queue.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from shared.messages import ChatMessage, Role


def opening(system: str | None, messages: Sequence[ChatMessage]) -> str:
    """The text every turn of a conversation starts with: its system prompt and its first user message
    (`messages` oldest first; the system prompt, when not given apart, may be the first of them)."""
    first = next((m.text for m in messages if m.role is Role.prompter), "")
    if system is None:
        system = next((m.text for m in messages if m.role is Role.system), "")
    return f"{system}\x00{first}"


def weight(worker: str, key: str) -> int:
    """The worker's rendezvous weight for `key`: a 64-bit hash of both (stable across processes and hosts)."""
    digest = hashlib.blake2b(f"{worker}\x00{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous(key: str, workers: Iterable[str]) -> str | None:
    """The worker of `workers` with the highest weight for `key` (ties: the smallest name); None when there
    are none."""
    best: tuple[int, str] | None = None
    for w in workers:
        score = weight(w, key)
        if best is None or score > best[0] or (score == best[0] and w < best[1]):
            best = (score, w)
    return best[1] if best is not None else None
