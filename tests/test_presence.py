"""worker/presence.py and its readers (producer/cards.py, shared/cards.py): whatever is stored under the
presence keys, workers keep publishing and producers keep serving (real Redis, flushed around each test)."""

import logging

from config.celery import queue_name
from producer.cards import ModelCatalog, describe
from producer.client import ChatClient, TurnRequest
from shared.cards import ModelCard, WorkerReport
from shared.keys import Keys
from shared.prompts import PromptFormat
from shared.sampling import SamplingParams
from tests.conftest import tiny_settings
from worker.presence import Presence, workers_on_host

KEYS = Keys("chat")
CARD = ModelCard(model="tiny-neox", sequence_length=256, vocab_size=100, prompt_format=PromptFormat.oasst,
                 end_keys=["<|endoftext|>"], tokenizer_sha="f" * 64)


def report(name: str, host: str = "h") -> WorkerReport:
    return WorkerReport(name=name, model="tiny-neox", sequence_length=256, slots=4, host=host)


def junk_presence(r) -> None:
    """What a hand or another program may leave: a live entry whose report is not one, a card that is not one,
    a tokenizer that is not one (the failing inputs of the adversarial run, 2026-11-30)."""
    r.sadd(KEYS.models, "tiny-neox")
    r.zadd(KEYS.live("tiny-neox"), {"fake": 9_999_999_999, "bad": 9_999_999_999})
    r.set(KEYS.worker("fake"), "garbage")
    r.set(KEYS.worker("bad"), '{"name": "bad"}')
    r.set(KEYS.card("tiny-neox"), '{"model": "tiny-neox"}')


def test_unreadable_reports_and_cards_are_skipped_by_every_reader(r, caplog):
    junk_presence(r)
    me = Presence(r, KEYS, report("w1"))
    me.heartbeat(0)
    with caplog.at_level(logging.WARNING):
        assert [w.name for w in workers_on_host(r, KEYS, "h")] == ["w1"]
        info = ModelCatalog(r, KEYS).info("tiny-neox")
    assert info.card is None and [w.name for w in info.workers] == ["w1"] and info.served
    assert describe(info)["workers"] == 1
    assert "unreadable worker report" in caplog.text and "stored card is unreadable" in caplog.text


def test_a_stored_tokenizer_that_is_not_one_reads_as_no_codec(r):
    r.hset(KEYS.tokenizer(CARD.tokenizer_sha), mapping={"tokenizer.json:0": b"not zlib"})
    assert ModelCatalog(r, KEYS).codec(CARD) is None
    r.delete(KEYS.tokenizer(CARD.tokenizer_sha))
    r.set(KEYS.tokenizer(CARD.tokenizer_sha), "a string, not a hash")
    assert ModelCatalog(r, KEYS).codec(CARD) is None


def test_a_turn_starts_beside_junk_presence(r, redis_url):
    junk_presence(r)
    client = ChatClient(tiny_settings(redis_url, queue_without_workers=True))
    started = client.start_turn(TurnRequest("hi", SamplingParams(), model="tiny-neox"))
    assert r.llen(queue_name(client.settings, "tiny-neox")) == 1 and started.turn_id
    client.close()


def test_presence_keys_of_another_type_are_rebuilt_by_the_worker(r, caplog):
    r.rpush(KEYS.live("tiny-neox"), "a", "b")
    r.set(KEYS.models, "junk")
    r.hset(KEYS.worker("w1"), "x", "y")
    r.set(KEYS.tokenizer(CARD.tokenizer_sha), "junk")
    catalog = ModelCatalog(r, KEYS)
    assert catalog.info("tiny-neox").workers == [] and "tiny-neox" in catalog.known()  # readers go on
    me = Presence(r, KEYS, report("w1"))
    with caplog.at_level(logging.ERROR):
        me.publish_card(CARD, {"tokenizer.json": b"{}"})
        me.heartbeat(1)
    assert r.type(KEYS.live("tiny-neox")) == b"zset" and r.type(KEYS.models) == b"set"
    assert r.type(KEYS.tokenizer(CARD.tokenizer_sha)) == b"hash"
    assert r.smembers(KEYS.models) == {b"tiny-neox"}
    info = ModelCatalog(r, KEYS).info("tiny-neox")
    assert info.card == CARD and [w.busy for w in info.workers] == [1]
    assert r.type(KEYS.worker("w1")) == b"string"  # SET replaces any type by itself
    for key in (KEYS.live("tiny-neox"), KEYS.models, KEYS.tokenizer(CARD.tokenizer_sha)):
        assert key in caplog.text
