"""When one sequence ends: every stop condition of a sequence in one object, as text-generation-inference's
`StoppingCriteria` (server/text_generation_server/utils/tokens.py) holds them.

By token   an end id (unless ignore_eos) -> end_key; the max_new-th new token -> length
By text    a stop string in the detokenized reply -> stop (matched by the sequence's Detokenizer, which
           holds back text that could begin one, so a stop string never reaches a reader)
By clock   a cancel (the client left, a newer attempt took the turn, shutdown) or the deadline passing
           -> cancelled

The engine asks after each sampled token (`on_token`, `on_text`) and once per iteration (`on_clock`).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.wire import FinishReason
from worker.engine.detok import Detokenizer


@dataclass
class StoppingCriteria:
    """Every stop condition of one sequence, built by Engine.submit and asked by the engine thread."""

    end_ids: frozenset[int]
    """Token ids that end the reply (the model's end keys); empty when the request ignores them."""
    max_new: int
    """New tokens at most, ≥ 1: the request's output length already capped to the room left in the context
    (sequence length − prompt tokens), so a sequence never writes past its KV cache."""
    deadline: float | None = None
    """Wall-clock time (time.time(), seconds) after which the sequence is cancelled; None = none."""
    cancelled: bool = False
    """Set from any thread (Handle.cancel, Engine.abandon_all); read by the engine thread at its next step."""

    def on_token(self, token: int, generated: int) -> FinishReason | None:
        """After sampling `token`, the `generated`-th new token (counting it): end_key if it is an end id
        (the token is not part of the reply), length if it fills max_new, else None."""
        if token in self.end_ids:
            return FinishReason.end_key
        if generated >= self.max_new:
            return FinishReason.length
        return None

    @staticmethod
    def on_text(detok: Detokenizer) -> FinishReason | None:
        """After the token's text went through `detok`: stop if it completed a stop string."""
        return FinishReason.stop if detok.stopped else None

    def on_clock(self, now: float) -> FinishReason | None:
        """Between steps: cancelled if cancelled or past the deadline (`now`: time.time())."""
        if self.cancelled or (self.deadline is not None and now > self.deadline):
            return FinishReason.cancelled
        return None
