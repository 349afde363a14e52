"""Errors a producer raises to its caller; the HTTP layer maps them to status codes."""


class ChatError(Exception):
    status = 400


class InvalidInput(ChatError, ValueError):
    status = 422


class NotFound(ChatError, KeyError):
    status = 404

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "not found"


class Busy(ChatError):
    status = 409


class Unavailable(ChatError):
    status = 503


class TurnFailed(ChatError):
    status = 500
