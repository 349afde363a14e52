"""Tool calling on /v1: OpenAI's `tools` / `tool_choice` turned into a prompt and a constraint, and the reply turned
back into `tool_calls`.

Neither model this project ships has a chat template that renders tools (SmolLM2's and OASST's render role and
content only), so tools are rendered by one documented prompt for every model, in the Hermes format that
tool-trained chat models (Qwen, Hermes, SmolLM3) use: the tools' JSON schemas inside `<tools>` in the system prompt,
calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, results as `<tool_response>` in a user turn.
History messages from a tool loop (an assistant message with `tool_calls` and null content, `role: tool` messages)
become those texts, so a full round trip renders the same whatever the template.

`tool_choice`: `none` = the tools are not shown and the reply is text; `auto` (the default with tools) = the model
decides: its reply is free text, and `<tool_call>` blocks in it that parse and name a tool become `tool_calls`;
`required` and a named function are enforced by constrained decoding: the reply is exactly one call,
`<tool_call>\n{"name": <a tool's name>, "arguments": <that tool's parameters schema>}\n</tool_call>` (compact JSON,
name first; objects that do not say otherwise take no properties beyond those listed, as in OpenAI's strict mode):
the prompt's own format, so the reply reads as an auto call would, and it always parses and validates (unless
`max_tokens` cuts it: finish_reason `length`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import first_error
from shared.grammar import JSON_OPTIONS, Grammar, GrammarType, closed
from shared.sampling import SamplingParams

STRICT = ConfigDict(strict=True, extra="forbid")
MAX_TOOLS = 128  # OpenAI's limit
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
TAIL = "}\n" + CLOSE  # what follows a constrained call's arguments
PROMPT = (
    "You can call functions. Their names, descriptions and the JSON schemas of their arguments:\n<tools>\n{tools}\n"
    "</tools>\nTo call one, answer with only:\n<tool_call>\n"
    '{{"name": <function name>, "arguments": <its arguments as a JSON object>}}\n</tool_call>'
)


class FunctionDef(BaseModel):
    """One function a tool offers (OpenAI's `tools[].function`)."""

    model_config = STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None  # a JSON schema; absent = no arguments
    strict: bool | None = None  # accepted either way: required and named calls are always held to the schema

    def schema_(self) -> dict[str, Any]:
        """The arguments' JSON schema: `parameters`, or no arguments when it is absent or `{}`."""
        return self.parameters if self.parameters else EMPTY_PARAMETERS


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    """A call in an assistant message of the history (`tool_calls[].function`): arguments as a JSON string."""

    model_config = STRICT
    name: str = Field(min_length=1, max_length=64)
    arguments: str


class ToolCall(BaseModel):
    model_config = STRICT
    id: str = Field(min_length=1, max_length=100)
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolFields(BaseModel):
    """`tools`, `tool_choice` and `parallel_tool_calls` as a request carries them (/v1/chat/completions and a
    conversation's message): validated together, and what they ask of the turn."""

    model_config = STRICT
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None  # null = auto with tools, none without (OpenAI's defaults)
    parallel_tool_calls: bool | None = None  # auto may make several calls; required and a named choice make one

    @model_validator(mode="after")
    def _tools_agree(self) -> ToolFields:
        check_tools(self.tools or [], self.tool_choice)
        if self.forced_call:
            try:
                grammar_for(self.tools_shown, self.tool_choice)
            except ValidationError as e:
                raise ValueError(f"tool_choice: {first_error(e).msg.removeprefix('value: ')}") from None
        format_ = getattr(self, "response_format", None)
        if self.forced_call and (getattr(self, "grammar", None) is not None or (format_ and format_.type != "text")):
            raise ValueError("tool_choice: a required or named tool call is itself the reply's format: drop "
                             "response_format (or grammar), or let the tool choice be auto")
        return self

    @property
    def tools_shown(self) -> list[Tool]:
        """The tools the model is told about: none under tool_choice none."""
        return [] if self.tool_choice == "none" else list(self.tools or [])

    @property
    def forced_call(self) -> bool:
        """The reply must be one tool call (tool_choice required or named), held to it by constrained decoding."""
        return bool(self.tools) and (self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice))

    def tools_prompt(self) -> str | None:
        """The prompt that shows the tools (after the system prompt), or None when none are shown."""
        return system_prompt(self.tools_shown) if self.tools_shown else None

    def grammar_field(self, otherwise: str) -> str:
        """The field a grammar error names: tool_choice for a required or named call, else `otherwise`."""
        return "tool_choice" if self.forced_call else otherwise

    def constrain(self, sampling: SamplingParams) -> SamplingParams:
        """`sampling` with the grammar of a required or named call, when the choice is one."""
        if not self.forced_call:
            return sampling
        return sampling.model_copy(update={"grammar": grammar_for(self.tools_shown, self.tool_choice)})


def check_tools(tools: list[Tool], choice: ToolChoice | None) -> None:
    """Raises ValueError naming what is wrong: a duplicate name, a parameters schema that is not a valid JSON
    schema, a named choice that names no tool."""
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError("tools: two tools have the same name")
    for i, t in enumerate(tools):
        if t.function.schema_().get("type") != "object":
            raise ValueError(f"tools[{i}].function.parameters: must be a JSON schema of type object (the arguments "
                             "are an object); leave it out for a function without arguments")
        try:
            Grammar(type=GrammarType.json, value=t.function.schema_())
        except ValidationError as e:
            raise ValueError(f"tools[{i}].function.parameters: {first_error(e).msg.removeprefix('value: ')}") from None
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise ValueError(f"tool_choice: no tool is named {choice.function.name!r}")
    if choice is not None and choice != "none" and not tools:
        raise ValueError("tool_choice: there are no tools to choose from")


def system_prompt(tools: list[Tool]) -> str:
    """The fallback prompt that shows the tools to a model (the module docstring)."""
    lines = [json.dumps({"name": t.function.name, "description": t.function.description or "",
                         "parameters": t.function.schema_()}, ensure_ascii=False) for t in tools]
    return PROMPT.format(tools="\n".join(lines))


def call_text(calls: list[ToolCall], content: str | None) -> str:
    """An assistant message of the history with its calls, as the model would have written them."""
    parts = [content] if content else []
    for c in calls:
        try:
            arguments = json.loads(c.function.arguments)
        except json.JSONDecodeError:
            arguments = c.function.arguments  # kept as the client sent it
        parts.append("<tool_call>\n" + json.dumps({"name": c.function.name, "arguments": arguments},
                                                  ensure_ascii=False) + "\n</tool_call>")
    return "\n".join(parts)


def response_text(content: str) -> str:
    """A `role: tool` message, as the user turn that carries it."""
    return f"<tool_response>\n{content}\n</tool_response>"


def _pointer(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")  # RFC 6901


def _hoisted(tool: str, params: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """`params` (a tool's arguments schema) made to live under the call's schema: its `$defs` / `definitions` move
    to the root's `defs` under names of its own, itself too (as `<tool>`), and every local `$ref` ("#...", written
    relative to `params`' root, as pydantic writes nested models) is rewritten to match. Returns a `$ref` to it."""
    params = dict(params)
    own = {**params.pop("definitions", {}), **params.pop("$defs", {})}
    root = f"{tool}"

    def fix(node: Any) -> Any:
        if isinstance(node, list):
            return [fix(x) for x in node]
        if not isinstance(node, dict):
            return node
        out = {k: fix(v) for k, v in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            for prefix in ("#/$defs/", "#/definitions/"):
                if ref.startswith(prefix):
                    name, _, rest = ref[len(prefix):].partition("/")
                    out["$ref"] = f"#/$defs/{_pointer(tool + '.' + name)}" + (f"/{rest}" if rest else "")
                    break
            else:
                out["$ref"] = f"#/$defs/{_pointer(root)}{ref[1:]}"
        return out

    for name, sub in own.items():
        defs[f"{tool}.{name}"] = fix(sub)
    defs[root] = fix(params)
    return {"$ref": f"#/$defs/{_pointer(root)}"}


def grammar_for(tools: list[Tool], choice: ToolChoice | None) -> Grammar | None:
    """The constraint of `required` or a named choice: exactly one call, name first. None otherwise."""
    if choice == "required":
        chosen = tools
    elif isinstance(choice, NamedToolChoice):
        chosen = [t for t in tools if t.function.name == choice.function.name]
    else:
        return None
    defs: dict[str, Any] = {}
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                               "arguments": _hoisted(t.function.name, closed(t.function.schema_()),
                                                                     defs)},
              "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]
    schema = {**(calls[0] if len(calls) == 1 else {"anyOf": calls}), "x-guidance": JSON_OPTIONS}
    if defs:
        schema["$defs"] = defs
    # In its tags, as the prompt asks for calls: the reply reads (and is stored) as an auto call would.
    lark = f'start: "{OPEN}\\n" call "\\n{CLOSE}"\ncall: %json {json.dumps(schema)}'
    return Grammar(type=GrammarType.lark, value=lark)


@dataclass
class ParsedReply:
    """A reply read for tool calls: `calls` as OpenAI's `tool_calls` (empty = a text reply) and the text left."""

    content: str | None
    calls: list[dict[str, Any]]


def call_id(turn_id: str, index: int) -> str:
    """A call's id: from its turn and its place in the reply, so every read of the turn (streamed, waited for,
    fetched again) names it alike."""
    return f"call_{turn_id[:24]}_{index}"


def _call(obj: Any, names: set[str] | None, turn_id: str, index: int) -> dict[str, Any] | None:
    if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments", {}), dict)):
        return None
    if names is not None and obj["name"] not in names:
        return None
    return {"id": call_id(turn_id, index), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(obj.get("arguments", {}), ensure_ascii=False)}}


def parse_reply(text: str, turn_id: str, tools: list[Tool] | None = None, constrained: bool = False) -> ParsedReply:
    """`text` as tool calls: the whole reply when it was constrained to one call, else each `<tool_call>` block that
    parses (and names one of `tools`, when given); the rest of the text is the content (None when nothing else is
    left). Ids come from `turn_id` (call_id)."""
    names = {t.function.name for t in tools} if tools is not None else None
    if constrained:
        head = CallStreamer.HEAD.match(text)
        if head is None or not text.endswith(TAIL):  # cut by max_tokens: returned as text, finish_reason length
            return ParsedReply(text, [])
        try:
            call = _call(json.loads(text[len(OPEN) + 1: -len(CLOSE) - 1]), names, turn_id, 0)
        except json.JSONDecodeError:
            call = None
        if call is None:
            return ParsedReply(text, [])
        # The arguments exactly as generated (and as streamed: CallStreamer), not re-serialized.
        call["function"]["arguments"] = text[head.end(): -len(TAIL)]
        return ParsedReply(None, [call])
    calls = []
    for m in CALL.finditer(text):
        try:
            call = _call(json.loads(m.group(1)), names, turn_id, len(calls))
        except json.JSONDecodeError:
            call = None
        if call:
            calls.append(call)
    if not calls:
        return ParsedReply(text, [])
    rest = CALL.sub("", text).strip()
    return ParsedReply(rest or None, calls)


class CallStreamer:
    """Streams a constrained call's text as OpenAI streams tool calls: one delta with the call's id and name once
    the name is complete, then the arguments' text as it comes (the last characters held back: they may be the
    call's closing brace and tag)."""

    HEAD = re.compile(r'^<tool_call>\n\{"name":\s?"((?:[^"\\]|\\.)*)",\s?"arguments":\s?')

    def __init__(self, turn_id: str) -> None:
        self.turn_id = turn_id
        self.text = ""
        self.sent = 0  # characters of the arguments already sent
        self.id: str | None = None
        self._start = -1

    def feed(self, piece: str) -> list[dict[str, Any]]:
        """The tool_calls deltas `piece` completes (OpenAI's `delta.tool_calls` items)."""
        self.text += piece
        out: list[dict[str, Any]] = []
        if self.id is None:
            m = self.HEAD.match(self.text)
            if m is None:
                return out
            self.id, self._start = call_id(self.turn_id, 0), m.end()
            out.append({"index": 0, "id": self.id, "type": "function",
                        "function": {"name": json.loads(f'"{m.group(1)}"'), "arguments": ""}})
        args = self.text[self._start:-len(TAIL)]  # the end may be the call's closing brace and tag
        if len(args) > self.sent:
            out.append({"index": 0, "function": {"arguments": args[self.sent:]}})
            self.sent = len(args)
        return out

    def finish(self) -> list[dict[str, Any]]:
        """The deltas left at the end: the arguments' last characters, without the call's closing brace."""
        if self.id is None:
            return []
        args = self.text[self._start:].removesuffix(TAIL)
        if len(args) > self.sent:
            tail, self.sent = args[self.sent:], len(args)
            return [{"index": 0, "function": {"arguments": tail}}]
        return []


class ReplyShaper:
    """Turns a streamed reply into chat.completion.chunk deltas: plain `content` without tools, else tool calls as
    `delta.tool_calls` (a constrained call streamed as it comes; under `auto`, text is streamed until a
    `<tool_call>` tag may be starting, and the calls are sent whole at the end)."""

    TAG = "<tool_call>"

    def __init__(self, turn_id: str, tools: list[Tool] | None = None, constrained: bool = False):
        self.turn_id = turn_id
        self.tools = tools or []
        self.constrained = constrained
        self.call = CallStreamer(turn_id) if constrained else None
        self.full = ""
        self.sent = 0  # characters of `full` already sent as content (auto)

    def feed(self, piece: str) -> list[dict[str, Any]]:
        """The deltas for `piece` of the reply's text."""
        if self.call is not None:
            return [{"tool_calls": [d]} for d in self.call.feed(piece)]
        self.full += piece
        safe = len(self.full)
        if self.tools:
            cut = self.full.find(self.TAG, self.sent)
            if cut >= 0:
                safe = cut
            else:  # hold back a trailing prefix of the tag
                for k in range(min(len(self.TAG) - 1, len(self.full)), 0, -1):
                    if self.full.endswith(self.TAG[:k]):
                        safe = len(self.full) - k
                        break
        if safe <= self.sent:
            return []
        out, self.sent = self.full[self.sent:safe], safe
        return [{"content": out}]

    def finish(self, finish: str) -> tuple[list[dict[str, Any]], str]:
        """The last deltas, once the whole reply has been fed, and the finish_reason to send (tool_calls when calls
        were made and the reply ended normally)."""
        if self.call is not None:
            if self.call.id is None:  # cut before the name was complete: nothing was sent
                return ([{"content": self.call.text}] if self.call.text else []), finish
            return [{"tool_calls": [d]} for d in self.call.finish()], "tool_calls" if finish == "stop" else finish
        if not self.tools:
            return [], finish
        parsed = parse_reply(self.full, self.turn_id, self.tools)
        if not parsed.calls:
            rest = self.full[self.sent:]
            return ([{"content": rest}] if rest else []), finish
        deltas: list[dict[str, Any]] = []
        unsent = CALL.sub("", self.full[self.sent:]).strip()
        if unsent:
            deltas.append({"content": unsent})
        deltas += [{"tool_calls": [{"index": i, **c}]} for i, c in enumerate(parsed.calls)]
        return deltas, "tool_calls" if finish == "stop" else finish
