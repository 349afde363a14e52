"""API settings: the shared Settings (CHAT_REDIS_URL, CHAT_KEY_PREFIX, ...) plus the HTTP front end's own."""

from __future__ import annotations

from pydantic import Field, ValidationError

from config.settings import Settings, config_error


class ApiSettings(Settings):
    # Auth: sha256 hex digests of the accepted keys, comma separated, and/or a file of them (one a line,
    # '#' starts a comment). No keys at all = auth off (logged loudly at start).
    api_keys: str = ""
    api_keys_file: str | None = None
    # Per-key token bucket in Redis: refill rate (requests per minute) and bucket size; 0 = no limit.
    rate_limit_per_min: float = Field(120.0, ge=0)
    rate_limit_burst: int = Field(30, ge=1)
    # Admission: a new turn is refused with 503 while its model's queue holds more than this many turns.
    max_queue_depth: int = Field(100, ge=0)
    retry_after_s: int = Field(5, ge=1)
    # A stateless /v1/chat/completions request lives on as a conversation this long (then expires).
    openai_conversation_ttl_s: int = Field(3600, ge=10)
    # A stored /v1/responses chain is kept this long after its latest turn. A response can be continued
    # (previous_response_id) while its turn's record lives too: CHAT_RESULT_TTL_S, a day by default.
    responses_ttl_s: int = Field(86_400, ge=10)
    completion_timeout_s: float = Field(600.0, gt=0)  # a non-streaming completion waits this long at most
    sse_ping_s: float = Field(15.0, gt=0)  # SSE comment line sent this often while nothing else is
    # Browser apps on these origins may call the API (comma separated, "*" = any); empty = CORS off.
    cors_origins: str = ""
    # SIGTERM: open streams get a final event and waiting requests an answer within this, then the process exits.
    api_shutdown_grace_s: float = Field(10.0, ge=0, le=300)
    # A request body larger than this is refused (413) before it is read.
    max_body_bytes: int = Field(4_000_000, ge=1024)
    # A stream or a waiting request rides out a Redis outage this long before it ends with an error.
    redis_outage_s: float = Field(30.0, ge=1)


def load_api_settings(**overrides: object) -> ApiSettings:
    try:
        return ApiSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        raise config_error(e) from None
