"""The generate-task payload and the turn result: what travels through Celery and Redis."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_serializer

from shared.keys import ID_PATTERN
from shared.messages import ChatMessage
from shared.sampling import SamplingParams

MAX_PAYLOAD_BYTES = 1_000_000  # a task payload above this is refused before parsing


class TurnStatus(str, Enum):
    """Where a turn is. queued -> running -> done | failed; running -> queued when its worker hands it
    back (cold shutdown) or vanishes (the watchdog queues it again)."""

    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"

    @property
    def finished(self) -> bool:
        """done or failed: the turn will not run again."""
        return self in (TurnStatus.done, TurnStatus.failed)


class FinishReason(str, Enum):
    """Why a reply ended: a TurnResult's finish_reason."""

    end_key = "end_key"  # the model produced its end key (<|endoftext|>, <|im_end|>, ...)
    length = "length"  # max_tokens reached, or the sequence length is full
    stop = "stop"  # a stop string matched
    cancelled = "cancelled"  # the producer cancelled it, or its deadline passed


class GenerateTask(BaseModel):
    """One templated next turn. The worker renders `messages` with its model's prompt format."""

    model_config = ConfigDict(extra="forbid")

    turn_id: str = Field(pattern=ID_PATTERN)
    conversation_id: str = Field(pattern=ID_PATTERN)
    model: str = Field(min_length=1, max_length=100)
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    sampling: SamplingParams = SamplingParams()
    enqueued_at: float = 0.0  # unix time the producer enqueued it
    deadline: float | None = None  # unix time after which the turn is cut short (finish_reason cancelled)
    # Oldest messages the producer left out because they could not fit the context (the payload carries
    # only what can fit, so its size follows the model's context, not the conversation's history).
    dropped_messages: int = Field(0, ge=0)
    # False: nothing may be dropped or cut to fit the context (the turn fails with context_length_exceeded).
    truncate: bool = True
    # True: a raw completion (/v1/completions): `messages` is one prompter message whose text is the whole prompt,
    # tokenized as is (Codec.encode_raw), no template. Left out of payloads when False (older workers forbid it).
    raw: bool = False

    @model_serializer(mode="wrap")
    def _without_defaults_new_workers_add(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        if not self.raw:
            out.pop("raw", None)
        return out

    @field_serializer("sampling")
    def _given_sampling(self, sampling: SamplingParams) -> dict[str, Any]:
        # Only the fields set away from their defaults travel: a worker that predates a sampling field still
        # reads every payload that does not use it (SamplingParams forbids unknown fields), so producers and
        # workers can be upgraded in any order as long as nobody asks for the new feature meanwhile.
        return sampling.model_dump(mode="json", exclude_defaults=True)


class Timings(BaseModel):
    """Where a turn's time went, in seconds: part of its TurnResult."""

    queued_s: float = 0.0  # enqueue -> worker picked it up
    prefill_s: float = 0.0  # prompt processed, first token sampled
    decode_s: float = 0.0  # the rest of the tokens
    total_s: float = 0.0  # enqueue -> reply committed


class TokenLogprob(BaseModel):
    """One reply token's log probability (natural log, of the distribution it was drawn from: after logit_bias, the
    grammar's mask, penalties and temperature, before top-k / top-p) and its likeliest alternatives', as
    (token text, logprob) pairs, most likely first. Token text is the token decoded alone."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = Field(default_factory=list)


class TurnResult(BaseModel):
    """A finished turn's reply, finish_reason, token counts and timings: committed to Redis as JSON (the turn
    hash's `result` and the stream's done event). `attempt` is the attempt that produced it."""

    turn_id: str
    conversation_id: str
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    # Of prompt_tokens, those whose KV the worker reused from an earlier sequence instead of prefilling them
    # (worker/engine/prefix_cache.py; OpenAI's usage.prompt_tokens_details.cached_tokens).
    cached_tokens: int = 0
    dropped_messages: int = 0  # oldest messages left out to fit the sequence length
    truncated_tokens: int = 0  # tokens cut from the start of an over-long newest message
    worker: str = ""
    attempt: int = 1
    timings: Timings = Timings()
    logprobs: list[TokenLogprob] | None = None  # per reply token, when the turn's sampling asked (`logprobs`)
