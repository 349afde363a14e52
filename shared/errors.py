"""Errors a producer raises to its caller; the HTTP layer maps them to status codes.

Each carries `param`, the request field at fault when there is one (`messages`, `max_tokens`,
`top_k`, ...), and `code`, a machine-readable reason, so the HTTP answer names them without parsing
the message text.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pydantic import ValidationError


class FieldError(NamedTuple):
    """The first error of a pydantic ValidationError, the one every boundary reports (`first_error`)."""

    loc: tuple[str | int, ...]  # the field's path in the validated input, e.g. ("sampling", "top_k")
    msg: str  # pydantic's message, less its "Value error, " prefix for a validator's own ValueError
    input: Any  # the value at fault

    @property
    def dotted(self) -> str:
        """The path as `sampling.top_k` (list indices as numbers: `messages.2.text`)."""
        return ".".join(str(p) for p in self.loc)


def first_error(e: ValidationError) -> FieldError:
    """The first of `e`'s errors (pydantic orders them by field): what a boundary reports to its caller."""
    err = e.errors()[0]
    return FieldError(tuple(err.get("loc", ())), str(err.get("msg", "invalid value")).removeprefix("Value error, "),
                      err.get("input"))


class ChatError(Exception):
    """Base of every error a producer raises: `status` the HTTP status it maps to, `param` the request
    field at fault (or None), `code` a machine-readable reason (or the class's default)."""

    status = 400
    default_code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def __str__(self) -> str:
        return self.message


class InvalidInput(ChatError, ValueError):
    """The request itself is wrong (for this model): a client error, before anything is stored."""

    status = 422


class NotFound(ChatError, KeyError):
    """No such conversation or turn (or another caller's: reported alike)."""

    status = 404


class Busy(ChatError):
    """The conversation has a turn in flight: one turn at a time per conversation."""

    status = 409
    default_code = "turn_in_flight"


class Unavailable(ChatError):
    """Nothing was stored: the client may retry (after `retry_after_s`)."""

    status = 503

    def __init__(self, message: str, param: str | None = None, code: str | None = None, retry_after_s: int = 5):
        super().__init__(message, param, code)
        self.retry_after_s = retry_after_s


class TurnFailed(ChatError):
    """The turn ended failed (the worker's reason is the message): raised by a caller that waits for it."""

    status = 500
    default_code = "turn_failed"
