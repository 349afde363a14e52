"""Chat messages as stored in a conversation and carried in a task payload."""

from __future__ import annotations

import unicodedata
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_MESSAGE_CHARS = 16_000  # default cap on one message; the producer may configure a lower one


class Role(str, Enum):
    """Who wrote a message, in OASST's role names."""

    system = "system"
    prompter = "prompter"  # the user, in OASST's words
    assistant = "assistant"


def is_blank(text: str) -> bool:
    """Nothing a reader could see: only whitespace and invisible format characters (zero-width spaces,
    direction marks; Unicode category Cf)."""
    return all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in text)


def check_text(text: str, *, field: str = "text") -> str:
    """Reject text a tokenizer or a terminal would choke on: control characters and lone surrogates.

    Tabs and newlines are ordinary text; everything else in Unicode category Cc/Cs is refused.
    """
    for ch in text:
        if ch in "\t\n\r":
            continue
        cat = unicodedata.category(ch)
        if cat == "Cs":  # a lone surrogate: no UTF-8 encoding exists for it
            raise ValueError(f"{field}: invalid UTF-8 (lone surrogate U+{ord(ch):04X})")
        if cat == "Cc":
            raise ValueError(f"{field}: contains a control or invalid character (U+{ord(ch):04X})")
    return text


class ChatMessage(BaseModel):
    """One message of a conversation: stored as JSON in its message list and carried in GenerateTask.messages.
    Frozen. System and prompter text with control characters or lone surrogates is refused (check_text:
    ValidationError); assistant text is kept as the model generated it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    text: str = Field(max_length=MAX_MESSAGE_CHARS * 4)
    turn_id: str | None = None  # the turn that produced an assistant message (idempotency key)

    @model_validator(mode="after")
    def _clean(self) -> ChatMessage:
        # What people type is checked; what a model generated is stored as it came.
        if self.role is not Role.assistant:
            check_text(self.text)
        return self
