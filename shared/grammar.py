"""What a constrained reply must match: a JSON schema, a regular expression (TGI's `grammar` shape) or a Lark
grammar (llguidance's syntax, as vLLM's `grammar`), compiled to an llguidance grammar.

Producers validate a grammar when the request arrives (`Grammar.compiled` fails on a bad schema or regex, so
the client gets a 4xx before anything is queued); workers compile it again against their tokenizer
(worker/engine/grammar.py) and mask every token that would leave it before sampling.

llguidance rather than xgrammar (measured side by side: `python -m tests.bench.grammar`, docs/BENCHMARKS.md
"Constrained decoding"): both mask 8 rows in well under 1% of a decode step (0.32 vs 0.16 ms on 2 cores), so
what decided is what they bring: llguidance is one 7.9 MB package with no dependencies, xgrammar requires triton
(a 286 MB wheel) on Linux x86_64.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

import llguidance
from pydantic import BaseModel, ConfigDict, model_validator

MAX_SCHEMA_CHARS = 64_000  # a JSON schema's serialized size
MAX_REGEX_CHARS = 4_000
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
