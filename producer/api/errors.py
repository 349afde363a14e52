"""One error shape for every route, as OpenAI and text-generation-inference clients expect:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}}
"""

from __future__ import annotations

import logging
import re
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import ChatError

log = logging.getLogger(__name__)
_PARAM = re.compile(r"^[A-Za-z_][\w.\[\]]*$")

TYPES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("conflict_error", "turn_in_flight"),
    422: ("invalid_request_error", "invalid_value"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    503: ("overloaded_error", "unavailable"),
    504: ("timeout_error", "timeout"),
}


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


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), err.status, headers=err.headers)


def from_chat_error(e: ChatError) -> ApiError:
    """shared.errors -> ApiError; an InvalidInput message 'field: why' names its param."""
    message = str(e)
    param = None
    head, sep, _ = message.partition(":")
    if e.status == 422 and sep and _PARAM.match(head):
        param = head
    code = None
    if e.status == 404:
        code = "model_not_found" if message.startswith("unknown model") else None
    return ApiError(e.status, message, param=param, code=code)


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


def validation_error(e: RequestValidationError) -> ApiError:
    err = e.errors()[0]
    if err.get("type") == "json_invalid":
        return ApiError(422, f"invalid JSON body: {err.get('ctx', {}).get('error', err['msg'])}", code="json_invalid")
    param = _param(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return ApiError(422, f"{param}: {msg}" if param else msg, param=param)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(ChatError)
    async def _chat(_: Request, e: ChatError) -> JSONResponse:
        return error_response(from_chat_error(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(e.status_code, str(e.detail), headers=dict(e.headers or {})))

    @app.exception_handler(redis.RedisError)
    async def _redis(_: Request, e: redis.RedisError) -> JSONResponse:
        log.warning("Redis error: %s", e)
        return error_response(ApiError(503, f"Redis unavailable: {e}", headers={"Retry-After": "5"}))

    @app.exception_handler(Exception)
    async def _other(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(ApiError(500, f"internal error: {type(e).__name__}"))
