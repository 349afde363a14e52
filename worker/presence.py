"""A worker's presence in Redis: its model's card (published once it is ready) and its liveness report
(renewed every HEARTBEAT_S with a TTL, withdrawn at detach). Producers read both (producer/cards.py)."""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from shared.cards import LIVENESS_TTL_S, ModelCard, WorkerReport, read_reports
from shared.codec import Codec
from shared.keys import Keys

log = logging.getLogger(__name__)

# SET the report with a TTL and index it by its expiry on Redis' clock; drop index entries long expired.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 3600)
return 1
"""


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The tokenizer as the files `save_pretrained` writes (tokenizer.json, its config, chat template)."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}


PIECE_BYTES = 256 * 1024  # tokenizer files are stored zlib-compressed in pieces of at most this size


def pack_files(files: dict[str, bytes]) -> dict[str, bytes]:
    """Hash fields `{name}:{i}`: each file zlib-compressed, cut into PIECE_BYTES pieces (small values keep
    every Redis client fast, fakeredis included, whose parser is quadratic in a value's size)."""
    out = {}
    for name, content in files.items():
        packed = zlib.compress(content, 6)
        for i in range(0, max(1, len(packed)), PIECE_BYTES):
            out[f"{name}:{i // PIECE_BYTES}"] = packed[i : i + PIECE_BYTES]
    return out


def files_sha(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def model_card(model: str, codec: Codec, sequence_length: int, end_keys: list[str], sha: str) -> ModelCard:
    tok = codec.tokenizer
    return ModelCard(
        model=model,
        sequence_length=sequence_length,
        vocab_size=codec.vocab_size,
        prompt_format=codec.prompt_format,
        end_keys=end_keys,
        special_tokens=sorted(tok.convert_ids_to_tokens(sorted(codec.special_ids))),
        tokenizer_sha=sha,
    )


class Presence:
    """Publishes one worker's card and liveness."""

    def __init__(self, r: redis.Redis, keys: Keys, report: WorkerReport):
        self.r = r
        self.keys = keys
        self.report = report
        self._beat = r.register_script(HEARTBEAT)
        self.withdrawn = False

    def publish_card(self, card: ModelCard, files: dict[str, bytes]) -> None:
        key = self.keys.tokenizer(card.tokenizer_sha)
        self._fix_types({key: "hash"})
        if not self.r.exists(key):  # content-addressed: written once, then only read
            staging = f"{key}:staging:{self.report.name}"
            self.r.delete(staging)
            for field, piece in pack_files(files).items():
                self.r.hset(staging, field, piece)
            self.r.rename(staging, key)  # readers see all pieces or none

        def write() -> None:
            pipe = self.r.pipeline(transaction=True)
            pipe.set(self.keys.card(card.model), card.model_dump_json())
            pipe.sadd(self.keys.models, card.model)
            pipe.execute()

        self._repairing({self.keys.card(card.model): "string", self.keys.models: "set"}, write)

    def heartbeat(self, busy: int) -> None:
        rep = self.report.model_copy(update={"busy": busy, "at": time.time()})
        keys = [self.keys.worker(rep.name), self.keys.live(rep.model)]
        self._repairing(dict(zip(keys, ("string", "zset"), strict=True)),
                        lambda: self._beat(keys=keys, args=[rep.model_dump_json(), LIVENESS_TTL_S, rep.name]))

    def _repairing(self, expected: dict[str, str], write: Callable[[], object]) -> None:
        """`write`, once more after `_fix_types` if a key held another type (WRONGTYPE)."""
        try:
            write()
        except redis.ResponseError as e:
            if "WRONGTYPE" not in str(e):
                raise
            self._fix_types(expected)
            write()

    def _fix_types(self, expected: dict[str, str]) -> None:
        """Presence keys are the workers' to rebuild: one that holds another type (written by hand or by
        another program) would stop every worker's heartbeat and every producer's check, so it is deleted,
        with an error log naming it; heartbeats rebuild it within HEARTBEAT_S."""
        for key, kind in expected.items():
            actual = self.r.type(key)
            actual = actual.decode() if isinstance(actual, bytes) else str(actual)
            if actual not in ("none", kind):
                log.error("%s held a %s, not a %s: deleted (workers rebuild it)", key, actual, kind)
                self.r.delete(key)

    def withdraw(self) -> None:
        self.withdrawn = True
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.keys.worker(self.report.name))
        pipe.zrem(self.keys.live(self.report.model), self.report.name)
        pipe.execute()


def workers_on_host(r: redis.Redis, keys: Keys, host: str) -> list[WorkerReport]:
    """The live workers (of any model) whose reports name `host`: CPU workers sharing a host share its
    cores, so each should run on its part of them (runtime.py warns)."""
    names = []
    for model in r.smembers(keys.models):
        try:
            names += r.zrange(keys.live(model.decode()), 0, -1)
        except redis.ResponseError:  # another type under that model's key: its own workers repair it
            continue
    raw = r.mget([keys.worker(n.decode()) for n in names]) if names else []
    return [w for w in read_reports(raw) if w.host == host]

