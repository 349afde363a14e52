"""One chat turn for real: producer -> Redis -> Celery worker -> engine -> stream -> commit.
Run once on fakeredis's TCP server (the embedded path) and once on real Redis."""

from __future__ import annotations

import pytest
import redis

from producer.client import ChatClient
from producer.embedded import InProcessWorker
from shared.messages import Role
from shared.sampling import SamplingParams
from tests.conftest import tiny_settings

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module", params=["fakeredis", "redis"])
def stack(request, fake_redis_url, redis_url):
    url = fake_redis_url if request.param == "fakeredis" else redis_url
    r = redis.Redis.from_url(url)
    r.flushdb()
    settings = tiny_settings(url, sequence_length=1024)
    worker = InProcessWorker(settings).start()
    client = ChatClient(settings)
    prompts: list[list[int]] = []
    engine = worker.app.chat_runtime.current().engine
    submit = engine.submit

    def spy(ids, *a, **k):  # record what the worker really sent to the model
        prompts.append(list(ids))
        return submit(ids, *a, **k)

    engine.submit = spy
    yield client, prompts, worker.app.chat_runtime.current()
    client.close()
    worker.stop()
    r.flushdb()


def test_three_turns_leave_six_messages_in_order(stack):
    client, prompts, rt = stack
    cid = client.create_conversation("tiny-neox")
    replies = [client.ask(cid, f"turn {i} question", GREEDY, timeout=60) for i in (1, 2, 3)]
    msgs = client.store.messages(cid)
    assert [m.role for m in msgs] == [Role.prompter, Role.assistant] * 3
    assert [m.text for m in msgs[0::2]] == ["turn 1 question", "turn 2 question", "turn 3 question"]
    assert [m.text for m in msgs[1::2]] == [r.text for r in replies]
    assert [m.turn_id for m in msgs[1::2]] == [r.turn_id for r in replies]
    third = rt.loaded.tokenizer.decode(prompts[-1])
    assert third == (
        f"<|prompter|>turn 1 question<|endoftext|><|assistant|>{msgs[1].text}<|endoftext|>"
        f"<|prompter|>turn 2 question<|endoftext|><|assistant|>{msgs[3].text}<|endoftext|>"
        "<|prompter|>turn 3 question<|endoftext|><|assistant|>"
    )
    assert all(r.completion_tokens <= 12 and r.worker for r in replies)


def test_system_prompt_leads_the_prompt(stack):
    client, prompts, rt = stack
    cid = client.create_conversation("tiny-neox", system="You are terse.")
    client.ask(cid, "hello", GREEDY, timeout=60)
    assert rt.loaded.tokenizer.decode(prompts[-1]).startswith("<|system|>You are terse.<|endoftext|><|prompter|>hello")
    assert [m.role for m in client.store.messages(cid)] == [Role.prompter, Role.assistant]


def test_stream_read_late_yields_exactly_the_committed_reply(stack):
    client, _, _ = stack
    cid = client.create_conversation("tiny-neox")
    task = client.send(cid, "stream me", SamplingParams(temperature=1.0, top_k=0, seed=5, max_tokens=60))
    result = client.wait(task.turn_id, timeout=60)
    events = list(client.events(task.turn_id))  # read after the fact, from the start
    assert events[0].kind == "start" and events[-1].kind == "done"
    assert "".join(e.text for e in events if e.kind == "delta") == result.text
    assert client.store.messages(cid)[-1].text == result.text
    # resuming from the middle gives the rest
    mid = events[len(events) // 2]
    rest = list(client.events(task.turn_id, after=mid.id))
    assert rest == events[len(events) // 2 + 1 :]


def test_worker_reports_its_liveness_slots_and_model_card(stack):
    import time

    client, _, rt = stack
    info = client.catalog.info("tiny-neox", fresh=True)
    (report,) = info.workers
    assert report.name == rt.hostname and report.model == "tiny-neox" and report.slots == 4
    assert 0 <= report.busy <= 4 and time.time() - report.at < 10
    assert 0 < client.r.ttl(client.keys.worker(rt.hostname)) <= 15  # gone by itself if the worker dies
    assert info.card is not None and info.card.sequence_length == 1024 == info.sequence_length
    assert info.card.vocab_size == rt.loaded.codec.vocab_size
    codec = client.catalog.codec(info.card)  # the producer tokenizes exactly as the worker does
    text = "héllo <|assistant|> wörld 🙂"
    assert codec.encode_plain(text) == rt.loaded.codec.encode_plain(text)


def test_cancel_stops_the_turn_at_the_next_step_and_frees_its_slot(stack):
    from shared.wire import FinishReason

    client, _, rt = stack
    rt.loaded.codec.end_ids, ends = set(), rt.loaded.codec.end_ids  # this turn can only end by the cut
    try:
        cid = client.create_conversation("tiny-neox")
        task = client.send(cid, "go on forever", SamplingParams(temperature=1.0, top_k=0, seed=3))
        events = client.events(task.turn_id, timeout=60)
        assert next(e for e in events if e.kind == "delta")  # it is generating
        client.store.cancel(task.turn_id)
        done = next(e for e in events if e.kind == "done")
        assert done.result.finish_reason is FinishReason.cancelled
        assert done.result.completion_tokens < 1024 - done.result.prompt_tokens  # cut before the context filled
        assert client.store.messages(cid)[-1].text == done.result.text  # the partial reply is committed
        assert rt.engine.busy == 0
    finally:
        rt.loaded.codec.end_ids = ends
