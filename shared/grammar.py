"""What a constrained reply must match: a JSON schema, a regular expression (TGI's `grammar` shape) or a Lark
grammar (llguidance's syntax, as vLLM's `grammar`), compiled to an llguidance grammar.

Producers validate a grammar when the request arrives: its syntax when the model is built (a bad schema or regex),
then, where the model's tokenizer is known (its card), its first step against it (`GrammarCompiler.check`: a
grammar that matches no reply, or that blows llguidance's lexer limits), so the client gets a 4xx before anything
is queued. Workers compile it against the same tokenizer (worker/engine/grammar.py) and mask every token that would
leave it before sampling.

Special tokens never stand for their text: llguidance's token trie reads an added token such as `<|padding|>` as
the characters it is written with, so a grammar asking for that text would let the model take the one token (then
refuse it as special), and one asking for `<|endoftext|>` would let it end the reply. Every special id is masked
out of a constrained row but its end ids, and those only once the grammar accepts (the reply is complete).

llguidance rather than xgrammar (measured side by side: `python -m tests.bench.grammar`, docs/BENCHMARKS.md
"Constrained decoding"): both mask 8 rows in well under 1% of a decode step (0.32 vs 0.16 ms on 2 cores), so
what decided is what they bring: llguidance is one 7.9 MB package with no dependencies, xgrammar requires triton
(a 286 MB wheel) on Linux x86_64.
"""

from __future__ import annotations

import json
import threading
from enum import Enum
from typing import TYPE_CHECKING, Any

import llguidance
from pydantic import BaseModel, ConfigDict, model_validator

if TYPE_CHECKING:
    from shared.codec import Codec

MAX_SCHEMA_CHARS = 64_000  # a JSON schema's serialized size
MAX_REGEX_CHARS = 4_000
CHECK_STEPS = 4  # steps of a grammar dry-run before it is queued (GrammarCompiler.check)
# Compact JSON: with flexible whitespace a small model can emit blank space until max_tokens (measured with
# SmolLM2-135M: a reply of newlines and spaces), and OpenAI's structured outputs are compact too.
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarType(str, Enum):
    """How `Grammar.value` is read (TGI's names)."""

    json = "json"  # a JSON schema (a dict): the reply is one JSON value that validates against it
    regex = "regex"  # a regular expression (Rust regex syntax) the whole reply matches
    lark = "lark"  # a context-free grammar in llguidance's Lark syntax (may embed JSON schemas: `%json {...}`)


class Grammar(BaseModel):
    """A reply constraint: `type` and its `value` (a JSON schema dict for json, a pattern string for regex).
    Validation raises ValueError naming what is wrong (an invalid schema or regex, too large a one)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    type: GrammarType
    """json: `value` is a JSON schema; regex: `value` is a regular expression."""
    value: dict[str, Any] | str
    """The schema (json), the pattern (regex) or the grammar (lark)."""

    @model_validator(mode="after")
    def _check(self) -> Grammar:
        if self.type is GrammarType.json:
            if not isinstance(self.value, dict):
                raise ValueError("value: a JSON schema must be an object")
            if len(json.dumps(self.value)) > MAX_SCHEMA_CHARS:
                raise ValueError(f"value: the JSON schema is longer than {MAX_SCHEMA_CHARS} characters")
        else:
            limit = MAX_REGEX_CHARS if self.type is GrammarType.regex else MAX_SCHEMA_CHARS
            if not isinstance(self.value, str) or not self.value:
                raise ValueError(f"value: a {self.type.value} grammar must be a non-empty string")
            if len(self.value) > limit:
                raise ValueError(f"value: the {self.type.value} grammar is longer than {limit} characters")
        try:
            error = llguidance.LLMatcher.validate_grammar(self.compiled())
        except ValueError as e:  # grammar_from_json_schema: not a JSON object after all
            error = str(e)
        if error:
            # llguidance's message is a first line, then the source with a caret and an `error: ...` line
            lines = error.strip().splitlines()
            why = " ".join([lines[0], *[x.strip() for x in lines[1:] if x.strip().startswith("error:")]])
            kind = {GrammarType.json: "JSON schema", GrammarType.regex: "regex", GrammarType.lark: "lark grammar"}[
                self.type]
            raise ValueError(f"value: invalid {kind}: {why[:300]}")
        return self

    def compiled(self) -> str:
        """The llguidance grammar (a string for llguidance.LLMatcher; building it is string work, microseconds).
        A model that validated compiles to a valid grammar."""
        if self.type is GrammarType.json:
            assert isinstance(self.value, dict)
            return llguidance.LLMatcher.grammar_from_json_schema(self.value, overrides=JSON_OPTIONS)
        assert isinstance(self.value, str)
        if self.type is GrammarType.lark:
            return llguidance.LLMatcher.grammar_from_lark(self.value)
        return llguidance.LLMatcher.grammar_from_regex(self.value)

    @classmethod
    def json_object(cls) -> Grammar:
        """OpenAI's `response_format: {"type": "json_object"}`: any JSON object."""
        return cls(type=GrammarType.json, value={"type": "object"})


# llguidance's terse errors that have a plain meaning for a client
PLAIN_ERRORS = {"NoExtensionBias": "the grammar matches no reply"}


def first_line(error: str) -> str:
    """llguidance's error without the parser state it appends (internal, long, not for clients)."""
    line = error.split("\n<state>")[0].strip().splitlines()[0][:300] if error.strip() else "invalid grammar"
    return PLAIN_ERRORS.get(line, line)


class GrammarCompiler:
    """Matchers for one codec's tokenizer (shared/codec.py). The llguidance tokenizer is built on first use (about
    a second for a 49,152-token vocabulary), not at start: most processes never see a grammar. Thread-safe."""

    def __init__(self, codec: Codec):
        self.codec = codec
        self._tok: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        # Special ids a constrained row may never take (its end ids only as the end: see the module docstring).
        self.banned = sorted(codec.special_ids - codec.end_ids)
        self.end_ids = sorted(codec.end_ids)
        self._plain: int | None = None  # bitmask (as an int) of the ordinary tokens, for `check`

    def _tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tok is None:
                import llguidance.hf  # transformers, imported only where a grammar is used

                c = self.codec  # its real ids are the engine's logits' width; its end ids end a grammar's reply
                self._tok = llguidance.hf.from_tokenizer(c.tokenizer, n_vocab=c.vocab_size, eos_token=self.end_ids)
            return self._tok

    def matcher(self, grammar: Grammar) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start. Raises ValueError naming `grammar` when it cannot be built for
        this tokenizer."""
        m = llguidance.LLMatcher(self._tokenizer(), grammar.compiled(), log_level=0)
        if m.is_error():
            raise ValueError(f"grammar: {first_line(m.get_error())}")
        return m

    def check(self, grammar: Grammar, field: str = "grammar") -> llguidance.LLMatcher:
        """Dry-run the grammar's first CHECK_STEPS steps on this tokenizer (taking the lowest allowed id each time):
        raises ValueError naming `field` when it cannot be built, exceeds llguidance's limits on the way (a huge
        counted repetition such as `a{1000000}` does at the second step), or matches no reply at all (no ordinary
        token may start it and the empty reply is not accepted: a $ref cycle, `[^\\s\\S]`). A few masks'
        time (well under a millisecond) once the tokenizer is built. A limit met later fails the turn instead.
        Returns the matcher, reset to the grammar's start: building it again would cost its compile twice."""
        try:
            m = self.matcher(grammar)
        except ValueError as e:
            raise ValueError(f"{field}: {str(e).removeprefix('grammar: ')}") from None
        for step in range(CHECK_STEPS):
            raw = int.from_bytes(m.compute_bitmask(), "little")
            bits = raw & self._plain_bits()
            if m.is_error():
                raise ValueError(f"{field}: {first_line(m.get_error())}")
            if not bits:
                special = [i for i in self.banned + self.end_ids if raw >> i & 1]
                if special and not m.is_accepting():
                    text = self.codec.tokenizer.convert_ids_to_tokens(special[0])
                    raise ValueError(f"{field}: the grammar asks for the text of a special token ({text}), which a "
                                     "reply cannot hold")
                if step == 0 and not m.is_accepting():
                    raise ValueError(f"{field}: the grammar matches no reply")
                break
            m.consume_token((bits & -bits).bit_length() - 1)  # the lowest allowed id: a deterministic walk
            if m.is_error():
                raise ValueError(f"{field}: {first_line(m.get_error())}")
        m.reset()
        return m

    def _plain_bits(self) -> int:
        if self._plain is None:
            plain = (1 << self.codec.vocab_size) - 1
            for i in self.banned + self.end_ids:
                plain &= ~(1 << i)
            self._plain = plain
        return self._plain


def closed(schema: Any) -> Any:
    """`schema` (a JSON schema, or any part of one) with every object that lists its properties and says nothing of
    others closed to them (`additionalProperties: false`), as OpenAI's strict mode requires them to be written.
    Clients leave it out (LangChain's bind_tools, a plain pydantic `model_json_schema()` sent as strict), and a
    constrained small model then keeps adding properties until max_tokens ({"a":1,"b":2,"c":3,...} measured with
    SmolLM2-135M), even repeating a key."""
    if isinstance(schema, list):
        return [closed(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out
