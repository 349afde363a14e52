"""Prompt formats: how a list of chat messages becomes the text the model continues.

A prompt is rendered as *segments*: markup (role tags, special tokens, which the tokenizer must
parse as special) and content (what a person typed, which must always be tokenized as plain text so
that a user writing `<|assistant|>` cannot change roles). Joining the segments gives the text form,
which the golden tests pin.

    oasst          [<|system|>{s}<|endoftext|>]
                   <|prompter|>{u}<|endoftext|><|assistant|>{a}<|endoftext|> ... <|assistant|>
    chat_template  the tokenizer's own Jinja template (ChatML for SmolLM2), generation prompt added
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from shared.messages import ChatMessage, Role


class PromptFormat(str, Enum):
    """How messages become a prompt: OASST's role tags, or the tokenizer's own chat template."""

    oasst = "oasst"
    chat_template = "chat_template"


@dataclass(frozen=True)
class Segment:
    """One piece of a rendered prompt: markup (`content` False, special tokens parsed) or message text."""

    text: str
    content: bool  # True: user/assistant text, tokenized with special tokens split into plain text


class HasChatTemplate(Protocol):
    """A tokenizer with transformers' `apply_chat_template`."""

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        """Render `conversation` (role/content dicts) with the tokenizer's Jinja chat template."""
        ...


OASST_TAGS = {Role.system: "<|system|>", Role.prompter: "<|prompter|>", Role.assistant: "<|assistant|>"}
OASST_END = "<|endoftext|>"
_CHAT_ROLES = {Role.system: "system", Role.prompter: "user", Role.assistant: "assistant"}


def render_segments(
    fmt: PromptFormat, messages: list[ChatMessage], tokenizer: HasChatTemplate | None = None
) -> list[Segment]:
    """`messages` as prompt segments in format `fmt`, ending with the assistant's generation prompt.
    ValueError when the chat_template format is asked for without a `tokenizer`."""
    if fmt is PromptFormat.oasst:
        return _oasst(messages)
    if tokenizer is None:
        raise ValueError("the chat_template format needs the model's tokenizer")
    return _chat_template(messages, tokenizer)


def render_text(fmt: PromptFormat, messages: list[ChatMessage], tokenizer: HasChatTemplate | None = None) -> str:
    """The prompt as one string: render_segments joined (the text form the golden tests pin)."""
    return "".join(s.text for s in render_segments(fmt, messages, tokenizer))


def _oasst(messages: list[ChatMessage]) -> list[Segment]:
    out: list[Segment] = []
    for m in messages:
        out += [Segment(OASST_TAGS[m.role], False), Segment(m.text, True), Segment(OASST_END, False)]
    out.append(Segment(OASST_TAGS[Role.assistant], False))
    return out


_PLACEHOLDER = re.compile("\ue000([0-9a-f]{16}):(\\d+)\ue001")  # one compile: the nonce is matched as a group


def _chat_template(messages: list[ChatMessage], tokenizer: HasChatTemplate) -> list[Segment]:
    # Render the template with a unique placeholder in place of each message's text, then cut the
    # rendered string at the placeholders: what lies between is the template's markup.
    nonce = secrets.token_hex(8)
    marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
    conv = [{"role": _CHAT_ROLES[m.role], "content": mark} for m, mark in zip(messages, marks)]
    rendered: str = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    out: list[Segment] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(rendered):
        if m.group(1) != nonce:  # a message's own text that looks like a placeholder stays text
            continue
        if m.start() > pos:
            out.append(Segment(rendered[pos : m.start()], False))
        out.append(Segment(messages[int(m.group(2))].text, True))
        pos = m.end()
    if pos < len(rendered):
        out.append(Segment(rendered[pos:], False))
    return out
