"""The tokenizer, wrapped with what generation needs: which ids are real, which end a turn, and
how to tokenize rendered prompt segments so user text never becomes a special token."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from shared.messages import ChatMessage
from shared.prompts import PromptFormat, Segment, render_segments

if TYPE_CHECKING:
    from shared.grammar import GrammarCompiler


class Codec:
    """A model's tokenizer with its prompt format: `vocab_size` (real ids are [0, vocab_size)), `end_ids` (the
    end keys' and eos's ids) and `special_ids`. ValueError when no end key (nor eos) is a token of the tokenizer."""

    def __init__(self, tokenizer: Any, prompt_format: PromptFormat, end_keys: list[str]):
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        # Real token ids are [0, vocab_size): a model's embedding may be padded past them (OASST: 50288
        # rows for 50282 tokens) and those rows must never be sampled.
        self.vocab_size = len(tokenizer)
        ends = set(end_keys)
        if tokenizer.eos_token:
            ends.add(tokenizer.eos_token)
        self.end_ids = {
            i
            for t in ends
            if (i := tokenizer.convert_tokens_to_ids(t)) is not None
            and i != tokenizer.unk_token_id
            and i < self.vocab_size
        }
        if not self.end_ids:
            raise ValueError(f"none of the end keys {sorted(ends)} is a token of this tokenizer")
        self.special_ids = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special
        }

    @cached_property
    def grammars(self) -> GrammarCompiler:
        """Constrained-decoding matchers for this tokenizer (shared/grammar.py), built on first use."""
        from shared.grammar import GrammarCompiler

        return GrammarCompiler(self)

    def segments(self, messages: list[ChatMessage]) -> list[Segment]:
        """`messages` as prompt segments in this model's prompt format (prompts.render_segments)."""
        return render_segments(self.prompt_format, messages, self.tokenizer)

    def encode_segment(self, seg: Segment) -> list[int]:
        """Token ids of one segment, no BOS/EOS added: markup parses special tokens, content never does."""
        # Content is split on special-token text, so "<|assistant|>" typed by a user stays plain text.
        return self.tokenizer(seg.text, add_special_tokens=False, split_special_tokens=seg.content)["input_ids"]

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` as plain text: no BOS/EOS added, special-token text split into ordinary tokens."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def encode_raw(self, text: str) -> list[int]:
        """Token ids of a raw completion prompt, as the tokenizer reads it on its own (OpenAI's and vLLM's
        /v1/completions): special-token text parsed, BOS added where the tokenizer adds it. Never used for chat
        messages, whose text never becomes special tokens (encode_segment)."""
        return self.tokenizer(text)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens skipped, spacing as decoded (no clean-up)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
