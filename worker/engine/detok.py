"""Incremental detokenizing with stop strings.

Decoding token by token breaks multi-byte characters and words whose spelling depends on their
neighbours, so (as text-generation-inference does) each new token is decoded together with a few
before it and only the text that has become stable is emitted. Text that might be the start of a
stop string is held back until it is known not to be one.
"""

from __future__ import annotations

from collections.abc import Callable


class Detokenizer:
    """One sequence's token ids to text, incrementally (text-generation-inference's prefix/read offsets), with
    `decode` the codec's decode. `text` is the stable text so far, cut before a stop string once one matched
    (then `stopped` is set and push() returns '')."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str] | None = None):
        self.decode = decode
        self.stop = stop or []
        self.ids: list[int] = []
        self.text = ""  # all stable text so far
        self.sent = 0  # characters of `text` already emitted
        self._prefix = 0
        self._read = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; returns the text that may be shown now ('' while it is unstable)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        prefix_text = self.decode(self.ids[self._prefix : self._read])
        new_text = self.decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._emit()

    def _emit(self) -> str:
        if self.stop:
            for s in self.stop:
                at = self.text.find(s, max(0, self.sent - len(s)))
                if at != -1:
                    self.text = self.text[:at]
                    self.stopped = True
            if not self.stopped:
                hold = max(len(s) for s in self.stop) - 1  # could be a stop string's beginning
                safe = max(self.sent, len(self.text) - hold)
                out, self.sent = self.text[self.sent : safe], safe
                return out
        out, self.sent = self.text[self.sent :], len(self.text)
        return out

    def flush(self) -> str:
        """At the end: whatever is held back (an unfinished character is dropped)."""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out
