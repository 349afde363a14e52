"""What producers know about the models they queue turns for: the card and liveness workers publish
(shared/cards.py), and a Codec rebuilt from the card's tokenizer, so a producer fits and checks a turn
with the code and tokenizer the worker itself uses.

A model's facts are read in one script call and kept for `ttl_s` (2 s); tokenizers are loaded once per
content hash. Whether a live worker serves the model is checked again, atomically, when the turn is
queued (producer/store.py START).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import redis

from config.presets import load_presets
from shared.cards import ModelCard, WorkerReport, read_card, read_reports
from shared.codec import Codec
from shared.keys import Keys

MODEL_INFO = """
-- KEYS: card, live zset   ARGV: worker key prefix
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local names = redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')
local reports = {}
if #names > 0 then
  for i, n in ipairs(names) do names[i] = ARGV[1] .. n end
  reports = redis.call('MGET', unpack(names))
end
return {redis.call('GET', KEYS[1]) or '', reports}
"""


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """One model as producers see it right now."""

    name: str
    card: ModelCard | None  # None: no worker ever served it here
    workers: list[WorkerReport]  # live ones

    @property
    def served(self) -> bool:
        return bool(self.workers)

    @property
    def sequence_length(self) -> int:
        """What every live worker can hold (the smallest), else the card's, else the preset's."""
        if self.workers:
            return min(w.sequence_length for w in self.workers)
        if self.card is not None:
            return self.card.sequence_length
        try:
            return load_presets().model(self.name).sequence_length
        except KeyError:
            return 0

    @property
    def slots(self) -> int:
        return sum(w.slots for w in self.workers)


class ModelCatalog:
    def __init__(self, r: redis.Redis, keys: Keys, ttl_s: float = 2.0):
        self.r = r
        self.keys = keys
        self.ttl_s = ttl_s
        self._info = r.register_script(MODEL_INFO)
        self._cache: dict[str, tuple[float, ModelInfo]] = {}
        self._codecs: dict[str, Codec] = {}
        self._lock = threading.Lock()

    def known(self) -> set[str]:
        """Preset names plus every model a worker has served on this Redis."""
        try:
            served = self.r.smembers(self.keys.models)
        except redis.ResponseError as e:  # another type under the key: workers repair it (worker/presence.py)
            log.warning("%s is unreadable (%s): listing the presets only", self.keys.models, e)
            served = set()
        return set(load_presets().models) | {m.decode() for m in served}

    def info(self, model: str, fresh: bool = False) -> ModelInfo:
        now = time.monotonic()
        hit = self._cache.get(model)
        if hit is not None and not fresh and now - hit[0] < self.ttl_s:
            return hit[1]
        try:
            card_raw, reports = self._info(keys=[self.keys.card(model), self.keys.live(model)],
                                           args=[f"{self.keys.prefix}:worker:"])
        except redis.ResponseError as e:  # a key of another type: as if unknown until workers repair it
            log.warning("model %r: its card or liveness is unreadable (%s)", model, e)
            card_raw, reports = None, []
        card = read_card(card_raw, model)
        workers = [w for w in read_reports(reports) if w.model == model]
        info = ModelInfo(model, card, workers)
        self._cache[model] = (now, info)
        return info

    def codec(self, card: ModelCard) -> Codec | None:
        """The model's tokenizer as a Codec (loaded once per tokenizer), or None if its files are gone."""
        with self._lock:
            if card.tokenizer_sha in self._codecs:
                return self._codecs[card.tokenizer_sha]
            try:
                files = self.r.hgetall(self.keys.tokenizer(card.tokenizer_sha))
            except redis.ResponseError:  # another type under the key (a worker's start repairs it)
                files = {}
            if not files:
                return None
            from transformers import AutoTokenizer  # only producers that check prompts pay for the import

            try:
                with tempfile.TemporaryDirectory() as d:
                    for name, content in unpack_files(files).items():
                        Path(d, Path(name).name).write_bytes(content)
                    tokenizer = AutoTokenizer.from_pretrained(d)
                codec = Codec(tokenizer, card.prompt_format, card.end_keys)
            except Exception as e:  # stored files that are not a tokenizer: as without a card (the worker checks)
                log.warning("model %r: its stored tokenizer is unreadable, ignored (%s: %s)", card.model,
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                return None
            self._codecs[card.tokenizer_sha] = codec
            return codec

    def live_models(self) -> list[ModelInfo]:
        """Every model some live worker serves now."""
        return [info for m in sorted(self.known()) if (info := self.info(m)).served]


def unpack_files(fields: dict[bytes, bytes]) -> dict[str, bytes]:
    """The inverse of worker/presence.py's pack_files: `{name}:{i}` pieces -> whole files."""
    pieces: dict[str, list[tuple[int, bytes]]] = {}
    for field, piece in fields.items():
        name, _, i = field.decode().rpartition(":")
        pieces.setdefault(name, []).append((int(i), piece))
    return {name: zlib.decompress(b"".join(p for _, p in sorted(parts))) for name, parts in pieces.items()}


def describe(info: ModelInfo) -> dict[str, object]:
    """The model as /v1/models and /api/models show it."""
    out: dict[str, object] = {"id": info.name, "served": info.served, "workers": len(info.workers),
                              "slots": info.slots, "context_length": info.sequence_length}
    if info.card is not None:
        out["vocab_size"] = info.card.vocab_size
        out["prompt_format"] = info.card.prompt_format.value
    return out

