"""Context fitting: which part of a conversation the model sees, shared by producers and workers.

Keep the system prompt and the newest messages that fit with room for the output; drop whole
oldest turns (so the kept part still starts with a user message); if the newest user message alone
is too long, keep its end. Only content tokens are ever cut, so special tokens are never split.
The output budget is what is left, and a prompt that leaves no room for one token is an error.

The cost follows the context, not the history: candidate cuts are tried from the newest message
backwards in doubling steps (1, 2, 4, ... turns), then bisected, so a 20,000-message conversation
is tokenized only about as far back as its kept part reaches (at most twice that).

Producers run the same `fit` before they queue a turn (with the tokenizer the worker published in
its model card), so a turn the worker would refuse is refused to the client first, and the task
payload carries only what fits.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.codec import Codec
from shared.errors import InvalidInput
from shared.messages import ChatMessage, Role


class ContextError(InvalidInput):
    """The prompt cannot fit the sequence length even after dropping and truncating.

    `param` names the request field at fault (`max_tokens`, `messages`, `system`).
    """

    def __init__(self, message: str, param: str = "messages", code: str | None = None):
        super().__init__(message, param, code)


class ContextLengthExceeded(ContextError):
    """The conversation does not fit and the request did not allow dropping its oldest turns."""

    default_code = "context_length_exceeded"


@dataclass(frozen=True)
class FittedPrompt:
    """The prompt as the model sees it.

    ids: token ids, len(ids) < sequence length.
    max_new: output budget in tokens (>= 1).
    dropped_messages: oldest messages (after the system prompt) left out.
    truncated_tokens: tokens cut from the start of an over-long newest message.
    """

    ids: list[int]
    max_new: int
    dropped_messages: int = 0
    truncated_tokens: int = 0


def encode_messages(codec: Codec, messages: list[ChatMessage]) -> list[list[int]]:
    """Token ids per rendered segment (markup and content alternate)."""
    return [codec.encode_segment(s) for s in codec.segments(messages)]


def fit(
    codec: Codec, messages: list[ChatMessage], seq_len: int, max_tokens: int | None, reserve: int | None = None
) -> FittedPrompt:
    """Fit `messages` (an optional system message first, then user/assistant turns ending with the
    user's) into `seq_len` positions.

    `reserve` is the room kept for output while choosing what to drop (default: a quarter of the
    sequence length, or max_tokens if smaller). Raises ContextError naming the field at fault.
    """
    if max_tokens is not None and max_tokens >= seq_len:
        raise ContextError(
            f"max_tokens: {max_tokens} is beyond this model's sequence length {seq_len}", "max_tokens"
        )
    reserve = reserve if reserve is not None else max(1, seq_len // 4)
    if max_tokens is not None:
        reserve = min(reserve, max_tokens)
    budget = seq_len - reserve
    head = [m for m in messages[:1] if m.role is Role.system]
    body = messages[len(head) :]
    if not body:
        raise ContextError("messages: a turn needs at least one user message")

    encoded: dict[int, list[list[int]]] = {}  # cut index -> the prompt's segments' ids (rendered once each)

    def segments(j: int) -> list[list[int]]:  # the prompt that keeps body[cuts[j]:], per segment
        if j not in encoded:
            encoded[j] = encode_messages(codec, head + body[cuts[j] :])
        return encoded[j]

    def size(j: int) -> int:
        return sum(map(len, segments(j)))

    # Candidate cut points: keeping everything (whatever role the history opens with), where a user message
    # starts, and the last message in any case.
    cuts = [d for d in range(len(body)) if d == 0 or body[d].role is Role.prompter or d == len(body) - 1]
    best = len(cuts) - 1  # the newest message alone; truncated below if even that is too long
    if size(best) <= budget:
        # Doubling steps back from the newest cut until one does not fit (or the history ends) ...
        step, lo = 1, best
        while lo > 0:
            probe = max(0, best - step)
            if size(probe) > budget:
                lo = probe + 1
                break
            best, lo, step = probe, probe, step * 2
        # ... then bisect between the last cut that fit and the first that did not.
        hi = best
        while lo < hi:
            mid = (lo + hi) // 2
            if size(mid) <= budget:
                hi = mid
            else:
                lo = mid + 1
        best = hi
    drop = cuts[best]
    parts = list(segments(best))  # a copy: the newest message may be cut below
    truncated = 0
    excess = sum(map(len, parts)) - budget
    if excess > 0:
        segs = codec.segments(head + body[drop:])
        last = max(i for i, s in enumerate(segs) if s.content)
        if len(parts[last]) <= excess:
            param = "system" if head else "messages"
            raise ContextError(
                f"{param}: the system prompt and template take {sum(map(len, parts)) - len(parts[last])} tokens, "
                f"more than the {budget} the sequence length {seq_len} leaves after {reserve} for output",
                param,
            )
        parts[last] = parts[last][excess:]  # keep the end of the newest message
        truncated = excess
    ids = [t for p in parts for t in p]
    room = seq_len - len(ids)
    max_new = room if max_tokens is None else min(max_tokens, room)
    if max_new < 1:
        raise ContextError(f"prompt: {len(ids)} tokens leave no room for output in sequence length {seq_len}")
    return FittedPrompt(ids, max_new, drop, truncated)


def fit_turn(
    codec: Codec, messages: list[ChatMessage], seq_len: int, max_tokens: int | None, *, truncate: bool = True
) -> FittedPrompt:
    """`fit` under a request's policy. truncate=True (conversations): drop the oldest turns as needed,
    keeping a quarter of the context for the reply. truncate=False (OpenAI's rule): the prompt and
    `max_tokens` (or one token) must fit as they are, else ContextLengthExceeded with the numbers."""
    if truncate:
        return fit(codec, messages, seq_len, max_tokens)
    _check_max_tokens(max_tokens, seq_len)
    total = sum(map(len, encode_messages(codec, messages)))
    _check_room("messages", "the messages take", total, max_tokens, seq_len,
                ", or allow dropping the oldest turns (truncate: true)")
    return fit(codec, messages, seq_len, max_tokens, reserve=max_tokens or 1)


def _check_max_tokens(max_tokens: int | None, seq_len: int) -> None:
    """Raises ContextError naming max_tokens when it alone fills the sequence length."""
    if max_tokens is not None and max_tokens >= seq_len:
        raise ContextError(f"max_tokens: {max_tokens} is beyond this model's sequence length {seq_len}", "max_tokens")


def _check_room(field: str, subject: str, total: int, max_tokens: int | None, seq_len: int, also: str = "") -> None:
    """OpenAI's rule: `total` prompt tokens and `max_tokens` (or one token) must fit as they are, else
    ContextLengthExceeded naming `field`, with the numbers (`subject`: "the messages take"; `also`: another way
    out, appended to the advice)."""
    if total + (max_tokens or 1) > seq_len:
        asked = f" and {max_tokens} for the output" if max_tokens else " and at least 1 for the output"
        raise ContextLengthExceeded(
            f"{field}: this model's maximum context length is {seq_len} tokens, but {subject} {total} tokens{asked}; "
            f"shorten the {field} or max_tokens{also}", field)


def fit_raw(codec: Codec, text: str, seq_len: int, max_tokens: int | None) -> FittedPrompt:
    """A raw completion prompt (Codec.encode_raw) with room for `max_tokens` (or one token), as it is: nothing is
    dropped or cut (OpenAI's rule). Raises ContextError naming max_tokens, ContextLengthExceeded naming prompt."""
    _check_max_tokens(max_tokens, seq_len)
    ids = codec.encode_raw(text)
    if not ids:
        raise ContextError("prompt: it is empty once tokenized", "prompt")
    _check_room("prompt", "the prompt takes", len(ids), max_tokens, seq_len)
    return FittedPrompt(ids, min(max_tokens or seq_len, seq_len - len(ids)))
