"""Runtime settings from CHAT_* environment variables (pydantic-settings), applied over the presets."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticUseDefault
from pydantic_settings import BaseSettings, SettingsConfigDict

from config.presets import DevicePreset, ModelPreset, load_presets
from config.redis_clients import DEFAULT_MASTER_NAME, check_redis_url
from shared.errors import first_error
from shared.replication import Replication


class ConfigError(Exception):
    """A bad configuration value: the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHAT_", extra="ignore")

    # Redis Sentinel: CHAT_REDIS_URL=sentinel://h1:26379/0;sentinel://h2:26379;sentinel://h3:26379 (db and
    # credentials on the first entry) and the name the sentinels monitor the primary under
    # (config/redis_clients.py).
    redis_master_name: str = Field(DEFAULT_MASTER_NAME, pattern=r"^[^\s;]{1,200}$")
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The data nodes' password when the URL carries none (kept out of URLs: no encoding of ':@/', not in ps).
    redis_password: SecretStr | None = None
    # Durability across a failover (docs/GUARANTEES.md): after each write a turn depends on (its creation,
    # its claim, its stream, its commit or failure) wait until this many replicas hold it (Redis WAIT), at
    # most redis_wait_ms. 0 = acknowledged by the primary alone (one Redis, or when losing the last
    # moments of writes in a failover is acceptable).
    redis_wait_replicas: int = Field(0, ge=0, le=16)
    redis_wait_ms: int = Field(500, ge=1, le=60_000)
    key_prefix: str = Field("chat", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    model: str = "smollm2-135m"  # preset name, hub id or local path
    device: str = "cpu"  # preset name in presets.yaml
    slots: int | None = Field(None, ge=1, le=1024)  # overrides the device preset
    # Prefix reuse across turns (worker/engine/prefix_cache.py); both override the device preset.
    prefix_cache: bool | None = None  # keep finished sequences' KV for prompts that extend it
    prefix_cache_slots: int | None = Field(None, ge=0, le=4096)  # extra KV rows for it (default: = slots)
    sequence_length: int | None = Field(None, ge=16)  # overrides the model preset
    threads: int | None = Field(None, ge=1, le=1024)  # torch intra-op threads on CPU (more than the cores: warned)
    # Where a model loaded from a GGUF is kept as safetensors after its first load, so the next start skips
    # dequantizing it (worker/pipeline/weights_cache.py); "" = no cache.
    weights_cache: str = "~/.cache/chat-worker-pool/weights"

    # Delivery. A running turn holds a lease its worker renews every half second; a turn whose lease is
    # older than this is queued again by the other workers' watchdog (its worker died or froze).
    lease_s: float = Field(10.0, ge=2, le=600)
    # kombu's own net behind the lease: an unacked delivery this old is delivered again (a duplicate of a
    # live or finished turn is skipped).
    visibility_timeout_s: int = Field(3600, ge=10)
    turn_timeout_s: float = Field(600.0, gt=0)  # a turn running longer is cut (finish_reason cancelled)
    shutdown_grace_s: float = Field(30.0, ge=0)  # warm shutdown waits this long for turns in flight
    max_attempts: int = Field(3, ge=1)  # attempts whose worker vanished before a turn is given up (poison)
    # A queued turn whose message no queue and no live delivery holds after this long is queued again.
    lost_after_s: float = Field(30.0, ge=1)

    # Producers: refuse a turn at once (503) when no live worker serves its model; true = queue it anyway
    # (for deployments whose workers start after the producers).
    queue_without_workers: bool = False
    # Where producers queue a turn. cache_aware: on the own queue of the worker that holds the conversation's
    # KV cache (the one that answered its last turn; for a new conversation, a rendezvous hash of its opening
    # over the live workers) while that worker is live and its own queue holds fewer than route_max_backlog
    # turns, else on the model's shared queue. shared: always the shared queue (any worker; for benchmarks).
    routing: Literal["cache_aware", "shared"] = "cache_aware"
    # A worker's own queue at this length counts as overloaded: further turns go to the shared queue.
    # 0 = never route to a worker's own queue (as routing=shared).
    route_max_backlog: int = Field(4, ge=0, le=10_000)
    # Workers: a turn that has waited this long on a live worker's own queue (its slots busy with long replies,
    # or its consumer stuck) is moved to the shared queue by the watchdogs, for any worker. 0 = no limit.
    route_max_wait_s: float = Field(10.0, ge=0)
    # Messages kept per conversation in Redis; older ones are dropped (counted in the conversation's
    # `trimmed` field). 0 = keep everything. What a turn sends the model is bounded by its context anyway.
    max_history_messages: int = Field(10_000, ge=0)

    # Streaming: deltas are coalesced and flushed at most this often (x1 up to 2 streams, growing to x4 at 8
    # streams on a worker), so Redis and reader load follow turns, not tokens. A turn's first text goes at once.
    stream_flush_ms: int = Field(50, ge=0, le=5000)
    stream_maxlen: int = Field(10_000, ge=10)
    stream_ttl_s: int = Field(3600, ge=10)
    result_ttl_s: int = Field(86_400, ge=10)

    max_message_chars: int = Field(16_000, ge=1)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str, info: ValidationInfo) -> str:
        """Checked now (check_redis_url), so a typo fails at start with the part at fault named, before the
        worker loads a model or the broker reads the URL otherwise than our clients."""
        check_redis_url(v, info.data.get("redis_master_name", DEFAULT_MASTER_NAME))
        return v

    @field_validator("redis_password", mode="before")
    @classmethod
    def _no_password(cls, v: object) -> object:
        """`CHAT_REDIS_PASSWORD=` (blank) is no password, for our clients and Celery's broker alike."""
        return None if isinstance(v, str) and not v else v

    @field_validator("slots", "sequence_length", "threads", "prefix_cache", "prefix_cache_slots", "route_max_backlog",
                     "route_max_wait_s", mode="before")
    @classmethod
    def _blank_is_default(cls, v: object) -> object:
        """`CHAT_THREADS=` (as docker-compose passes an unset `${CPU_THREADS:-}`) means the default."""
        if isinstance(v, str) and not v.strip():
            raise PydanticUseDefault()
        return v

    def redis_options(self) -> dict[str, Any]:
        """What config/redis_clients.py's clients take besides the URL: master name and password."""
        return {"master_name": self.redis_master_name,
                "password": self.redis_password.get_secret_value() if self.redis_password else None}

    def replication(self) -> Replication:
        """How the project's writes wait for replicas (shared/replication.py), from redis_wait_*."""
        return Replication(self.redis_wait_replicas, self.redis_wait_ms)

    def model_preset(self) -> ModelPreset:
        try:
            preset = load_presets().model(self.model)
        except KeyError as e:
            raise ConfigError(f"CHAT_MODEL: {e.args[0]}") from None
        if self.sequence_length is not None:
            if self.sequence_length > preset.max_sequence_length:
                raise ConfigError(
                    f"CHAT_SEQUENCE_LENGTH: {self.sequence_length} exceeds this model's maximum of "
                    f"{preset.max_sequence_length}"
                )
            preset = preset.model_copy(update={"sequence_length": self.sequence_length})
        return preset

    def device_preset(self) -> DevicePreset:
        try:
            preset = load_presets().device(self.device)
        except KeyError as e:
            raise ConfigError(f"CHAT_DEVICE: {e.args[0]} (set by CHAT_DEVICE or the CLI's --device)") from None
        update = {k: getattr(self, k) for k in ("slots", "prefix_cache", "prefix_cache_slots")
                  if getattr(self, k) is not None}
        return preset.model_copy(update=update) if update else preset


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment plus explicit overrides; one clear error naming the bad key."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
        settings.model_preset()
        settings.device_preset()
        return settings
    except ValidationError as e:
        raise config_error(e) from None


def config_error(e: ValidationError) -> ConfigError:
    """A settings ValidationError as the environment variable at fault: `CHAT_TOP_K: message (got ...)`."""
    err = first_error(e)
    key = "CHAT_" + "_".join(str(p) for p in err.loc).upper()
    return ConfigError(f"{key}: {err.msg} (got {err.input!r:.60})")
