"""Request and response bodies of the conversation routes. Requests are strict: a string is not a number
and a bool is not an int (`"top_k": true` is an error naming top_k, not greedy decoding)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from producer.api.tools import ToolFields
from producer.api.tools import response_text as tool_response_text
from shared.errors import first_error
from shared.grammar import Grammar, GrammarType, closed
from shared.messages import is_blank
from shared.sampling import (
    MAX_LOGIT_BIAS,
    Bias,
    MaxTokens,
    Penalty,
    RepetitionPenalty,
    SamplingParams,
    Seed,
    StopStrings,
    Temperature,
    TopK,
    TopP,
)
from shared.wire import TurnResult

STRICT = ConfigDict(strict=True, extra="forbid")


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema` as OpenAI defines it. `strict` is accepted either way: the reply is always
    held to the schema (constrained decoding), never only asked to follow it."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=False)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # absent = any JSON value
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: text (free), json_object (any JSON object) or json_schema."""

    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema: give it exactly when type is json_schema")
        return self

    def grammar(self) -> Grammar | None:
        """The constraint it asks for. Raises ValueError naming json_schema.schema for an invalid schema."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return Grammar.json_object()
        assert self.json_schema is not None
        schema = self.json_schema.schema_ or {}
        if self.json_schema.strict:  # OpenAI's strict mode wants objects closed; a schema that left it out is closed
            schema = closed(schema)
        try:
            return Grammar(type=GrammarType.json, value=schema)
        except ValidationError as e:
            raise ValueError("json_schema.schema: " + first_error(e).msg.removeprefix("value: ")) from None


def refused(*fields: str, why: str, allowed: tuple[Any, ...] = ()) -> Any:
    """A field validator for request fields this server does not implement: a value that is set (truthy) and not
    one of `allowed` is refused with `why` (OpenAI clients send many fields; one that would change the answer is
    never silently ignored). Use as `_no_x = refused("x", why="...")` in the model's body."""

    def check(cls: type, v: Any) -> Any:
        if v and v not in allowed:
            raise ValueError(why)
        return v

    return field_validator(*fields)(classmethod(check))


def _not_blank(v: str | None) -> str | None:
    if v is not None and is_blank(v):
        raise ValueError("must not be empty")
    return v


class SamplingFields(BaseModel):
    """Sampling, by the names OpenAI and TGI use, each constrained as shared/sampling.py constrains it.
    Left out = the project's default (SamplingParams)."""

    model_config = STRICT

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    max_tokens: MaxTokens | None = None
    seed: Seed | None = None
    stop: StopStrings | None = None  # a string or a list of them (a string is read as a list of one)
    ignore_eos: bool | None = None  # extension (vLLM's): generate past the end key, to max_tokens
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = Field(None, max_length=MAX_LOGIT_BIAS)  # token id (as a string) -> bias
    response_format: ResponseFormat | None = None
    grammar: Grammar | None = None  # extension (TGI's): {"type": "json" | "regex", "value": schema or pattern}

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        seen: set[int] = set()
        for key in v or {}:
            if not (key.isascii() and key.isdigit()) or len(key) > 9:
                raise ValueError(f"keys must be token ids (non-negative integers, as strings), got {key[:20]!r}")
            if int(key) in seen:
                raise ValueError(f"token id {int(key)} is given twice (as {key!r} and another spelling)")
            seen.add(int(key))
        return v

    @field_validator("response_format")
    @classmethod
    def _valid_schema(cls, v: ResponseFormat | None) -> ResponseFormat | None:
        if v is not None:
            v.grammar()  # an invalid schema is this request's 4xx, before anything is queued
        return v

    @field_validator("grammar")
    @classmethod
    def _one_constraint(cls, v: Grammar | None, info: ValidationInfo) -> Grammar | None:
        fmt = info.data.get("response_format")  # validated before: declared before it
        if v is not None and fmt is not None and fmt.type != "text":
            raise ValueError("give either grammar or response_format, not both")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: object) -> object:
        # Before validation, so a bad single string is named for what is wrong with it, not for not being a list.
        return [v] if isinstance(v, str) else v

    @property
    def grammar_param(self) -> str:
        """The field a grammar error names: response_format when the constraint came from it, else grammar."""
        fmt = self.response_format
        return "response_format" if fmt is not None and fmt.type != "text" else "grammar"

    def sampling(self, max_tokens: int | None = None) -> SamplingParams:
        given: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "max_tokens": max_tokens or self.max_tokens,
            "seed": self.seed,
            "stop": self.stop,
            "ignore_eos": self.ignore_eos,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": {int(k): b for k, b in self.logit_bias.items()} if self.logit_bias else None,
            "grammar": self.grammar or (self.response_format.grammar() if self.response_format else None),
        }
        return SamplingParams(**{k: v for k, v in given.items() if v is not None})


class CreateConversation(BaseModel):
    model_config = STRICT
    model: str = Field(min_length=1, max_length=100)
    system: str | None = None

    _system = field_validator("system")(_not_blank)


class ConversationOut(BaseModel):
    id: str
    model: str
    system: str | None
    busy_turn: str | None = None


class PostMessage(SamplingFields, ToolFields):
    """A user message (or, with `tool_call_id`, the result of a tool call the last reply made) and how to answer
    it: sampling, and tools as on /v1 (producer/api/tools.py)."""

    model_config = STRICT
    content: str
    tool_call_id: str | None = Field(None, min_length=1, max_length=100)  # `content` is that call's result

    _content = field_validator("content")(_not_blank)

    @property
    def text(self) -> str:
        """What the model sees: the content, or the tool result in its tags."""
        return tool_response_text(self.content) if self.tool_call_id else self.content


class TurnCreated(BaseModel):
    turn_id: str
    conversation_id: str
    status: str = "queued"
    queue_position: int  # 1 = served next
    dropped_messages: int = 0  # oldest messages the model will not see (they did not fit its context)
    truncated_tokens: int = 0  # cut from the start of this message: alone it was longer than the context
    events_url: str
    turn_url: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0  # of prompt_tokens, reused from the worker's prefix cache (not prefilled)


class TurnOut(BaseModel):
    id: str
    conversation_id: str
    status: str  # queued | running | done | failed
    attempt: int
    queue_position: int | None = None  # while queued
    worker: str | None = None
    reply: str | None = None  # the full reply when done; what has streamed so far while running
    tool_calls: list[dict[str, Any]] | None = None  # the reply's <tool_call> blocks, as OpenAI's tool_calls (when done)
    finish_reason: str | None = None
    usage: Usage | None = None
    dropped_messages: int | None = None  # oldest messages left out to fit the context (when done)
    truncated_tokens: int | None = None  # cut from the start of the newest message (when done)
    timings: dict[str, float] | None = None
    error: str | None = None
    enqueued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None


class MessageOut(BaseModel):
    role: str  # system | user | assistant
    content: str
    turn_id: str | None = None


def usage(res: TurnResult) -> Usage:
    return Usage(
        prompt_tokens=res.prompt_tokens,
        completion_tokens=res.completion_tokens,
        total_tokens=res.prompt_tokens + res.completion_tokens,
        cached_tokens=res.cached_tokens,
    )
