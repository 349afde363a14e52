"""Context fitting: a conversation longer than the sequence length never fails.

Keep the system prompt and the newest messages that fit with room for the output; drop whole
oldest turns (so the kept part still starts with a user message); if the newest user message alone
is too long, keep its end. Only content tokens are ever cut, so special tokens are never split.
The output budget is what is left, and a prompt that leaves no room for one token is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.messages import ChatMessage, Role
from worker.pipeline.codec import Codec


class ContextError(ValueError):
    """The prompt cannot fit the sequence length even after dropping and truncating."""


@dataclass(frozen=True)
class FittedPrompt:
    ids: list[int]
    max_new: int  # output budget in tokens
    dropped_messages: int = 0
    truncated_tokens: int = 0


def encode_messages(codec: Codec, messages: list[ChatMessage]) -> list[list[int]]:
    """Token ids per rendered segment (markup and content alternate)."""
    return [codec.encode_segment(s) for s in codec.segments(messages)]


def fit(
    codec: Codec, messages: list[ChatMessage], seq_len: int, output_length: int | None, reserve: int | None = None
) -> FittedPrompt:
    """`reserve` is the room kept for output while choosing what to drop (default: a quarter of the
    sequence length, or output_length if smaller)."""
    if output_length is not None and output_length >= seq_len:
        raise ContextError(f"output_length: {output_length} is beyond this model's sequence length {seq_len}")
    reserve = reserve if reserve is not None else max(1, seq_len // 4)
    if output_length is not None:
        reserve = min(reserve, output_length)
    budget = seq_len - reserve
    head = [m for m in messages[:1] if m.role is Role.system]
    body = messages[len(head) :]
    if not body:
        raise ContextError("messages: a turn needs at least one user message")

    def total(drop: int) -> list[list[int]]:
        return encode_messages(codec, head + body[drop:])

    # Candidate cut points: where a user message starts, and the last message in any case.
    cuts = [d for d in range(len(body)) if body[d].role is Role.prompter or d == len(body) - 1]
    lo, hi = 0, len(cuts) - 1
    if sum(map(len, total(cuts[hi]))) > budget:
        lo = hi  # even the newest message alone is too long: truncate it below
    else:
        while lo < hi:  # smallest cut that fits
            mid = (lo + hi) // 2
            if sum(map(len, total(cuts[mid]))) <= budget:
                hi = mid
            else:
                lo = mid + 1
    drop = cuts[lo]
    parts = total(drop)
    truncated = 0
    excess = sum(map(len, parts)) - budget
    if excess > 0:
        segs = codec.segments(head + body[drop:])
        last = max(i for i, s in enumerate(segs) if s.content)
        if len(parts[last]) <= excess:
            raise ContextError(
                f"prompt: the system prompt and template take {sum(map(len, parts)) - len(parts[last])} tokens, "
                f"more than the {budget} the sequence length {seq_len} leaves after {reserve} for output"
            )
        parts[last] = parts[last][excess:]  # keep the end of the newest message
        truncated = excess
    ids = [t for p in parts for t in p]
    room = seq_len - len(ids)
    max_new = room if output_length is None else min(output_length, room)
    if max_new < 1:
        raise ContextError(f"prompt: {len(ids)} tokens leave no room for output in sequence length {seq_len}")
    return FittedPrompt(ids, max_new, drop, truncated)
