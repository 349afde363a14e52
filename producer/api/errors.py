"""One error shape for every route, as OpenAI and text-generation-inference clients expect:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}}

Client errors are 422 on the conversation routes (TGI's convention) and 400 on /v1 (OpenAI's: its
clients raise BadRequestError for it). Every error from the producer library (shared/errors.py)
carries the field at fault; on /v1 it is named as the OpenAI request names it.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import ChatError, Unavailable

log = logging.getLogger(__name__)

TYPES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("conflict_error", "turn_in_flight"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", "invalid_value"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    503: ("overloaded_error", "unavailable"),
    504: ("timeout_error", "timeout"),
}
# The producer library's names for a field -> the name an OpenAI request gives it.
OPENAI_PARAMS = {"content": "messages", "message": "messages", "system": "messages"}
CONVERSATION_PARAMS = {"message": "content"}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    etype, default_code = TYPES.get(status, ("server_error", "error"))
    return {"error": {"message": message, "type": etype, "param": param, "code": code or default_code}}


def is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def error_response(err: ApiError, openai: bool = False) -> JSONResponse:
    status = 400 if openai and err.status == 422 else err.status
    # The body keeps the client error's own code (invalid_value, json_invalid...) whatever the status.
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), status, headers=err.headers)


def from_chat_error(e: ChatError, openai: bool = False, names: dict[str, str] | None = None) -> ApiError:
    """shared.errors -> ApiError, the field named as the route's request names it (also at the head of the
    message: "content: ..." reads "messages: ..." on /v1). `names` adds the request's own renamings (a /v1
    request that gave `max_completion_tokens` reads that name wherever `max_tokens` stood)."""
    table = {**(OPENAI_PARAMS if openai else CONVERSATION_PARAMS), **(names or {})}
    param = table.get(e.param, e.param) if e.param else None
    message = e.message
    if e.param and param != e.param and message.startswith(f"{e.param}:"):
        message = f"{param}:{message[len(e.param) + 1:]}"
    if names and "max_tokens" in names:  # the output length by the name this request gave it, throughout
        message = message.replace("max_tokens", names["max_tokens"])
    headers = {"Retry-After": str(e.retry_after_s)} if isinstance(e, Unavailable) else None
    return ApiError(e.status, message, param=param, code=e.code, headers=headers)


# pydantic puts the member of a union it tried into an error's location ("stop.list[str][0]"); a request's
# field path never holds those.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "model", "literal", "union", "tagged-union",
              "is-instance", "function-after", "function-before", "function-wrap", "function-plain", "nullable"}


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # The first part is always a field of the request (`model` is one, not only a tag).
    parts = parts[:1] + [p for p in parts[1:]
                         if p.isdigit() or (p not in _TYPE_TAGS and not any(c in p for c in "[(<"))]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


def validation_error(errors: list[Any]) -> ApiError:
    """The first pydantic error as `param: message`, the param named as the request names it."""
    err = errors[0]
    if err.get("type") == "json_invalid":
        return ApiError(422, f"invalid JSON body: {err.get('ctx', {}).get('error', err['msg'])}", code="json_invalid")
    param = _param(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if param is None and (named := _NAMED.match(msg)):  # a whole-body check names its field first
        return ApiError(422, msg, param=named.group(1))
    return ApiError(422, f"{param}: {msg}" if param else msg, param=param)


_NAMED = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e, is_openai(request))

    @app.exception_handler(ChatError)
    async def _chat(request: Request, e: ChatError) -> JSONResponse:
        return error_response(from_chat_error(e, is_openai(request)), is_openai(request))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(e.errors())), is_openai(request))

    @app.exception_handler(ValidationError)
    async def _invalid_model(request: Request, e: ValidationError) -> JSONResponse:
        return error_response(validation_error(list(e.errors())), is_openai(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 400 and str(e.detail).startswith("There was an error parsing the body"):
            # FastAPI's answer for a body it cannot decode at all (not UTF-8, nested past the parser's depth,
            # an integer of thousands of digits): a client error like any other invalid JSON.
            err = ApiError(422, "invalid JSON body: it cannot be decoded (not UTF-8, or nested or sized past "
                           "what a parser accepts)", code="json_invalid")
            return error_response(err, is_openai(request))
        return error_response(ApiError(e.status_code, str(e.detail), headers=dict(e.headers or {})))

    @app.exception_handler(redis.RedisError)
    async def _redis(_: Request, e: redis.RedisError) -> JSONResponse:
        # Only reads end here (every write goes through the producer library, which answers Unavailable
        # after withdrawing what it may have created): nothing was changed, the client may retry.
        log.warning("Redis error: %s", e, exc_info=e)
        return error_response(ApiError(503, f"Redis unavailable: {e}", headers={"Retry-After": "5"}))

    @app.exception_handler(Exception)
    async def _other(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(ApiError(500, f"internal error: {type(e).__name__}"))


def turn_failure(message: str) -> tuple[int, str, str]:
    """(status, message, code) for a failed turn: 400 `grammar_failed` when its grammar could not go on (the
    request's own constraint: retrying it would fail again; GrammarCompiler.check refuses what it can foresee before
    anything is queued), else 500 `turn_failed`."""
    if message.startswith("grammar:"):
        return 400, message, "grammar_failed"
    return 500, message, "turn_failed"
