"""Workers as deployed (`python -m worker` processes) on real Redis: a turn is routed by its
conversation's model; two workers of one model share the load; another model's worker takes none."""

import pytest

from producer.client import ChatClient
from shared.sampling import SamplingParams
from tests.conftest import tiny_settings
from tests.procs import WorkerProcess


@pytest.mark.slow
def test_two_workers_share_one_model_and_routing_is_by_model(r, redis_url, tmp_path):
    # A worker of another model on the same Redis must never take tiny-neox turns.
    other = WorkerProcess(redis_url, "other@test", tmp_path, CHAT_MODEL="tiny-llama-path-free",
                          CHAT_SEQUENCE_LENGTH="128")
    a = WorkerProcess(redis_url, "a@test", tmp_path, CHAT_SLOTS="1")
    b = WorkerProcess(redis_url, "b@test", tmp_path, CHAT_SLOTS="1")
    try:
        a.wait_ready()
        b.wait_ready()
        assert other.wait() != 0  # an unknown model fails at start, before consuming anything
        assert "CHAT_MODEL" in other.log()
        client = ChatClient(tiny_settings(redis_url))
        cids = [client.create_conversation("tiny-neox") for _ in range(8)]
        tasks = [client.send(c, "hello", SamplingParams(temperature=1.0, top_k=0, seed=1, output_length=150))
                 for c in cids]
        results = [client.wait(t.turn_id, timeout=120) for t in tasks]
        workers = {res.worker for res in results}
        assert workers == {"a@test", "b@test"}
        assert all(len(client.store.messages(c)) == 2 for c in cids)
        client.close()
    finally:
        for w in (a, b, other):
            w.stop()


@pytest.mark.slow
def test_worker_of_another_model_leaves_the_turn_queued(r, redis_url, tmp_path):
    w = WorkerProcess(redis_url, "neox@test", tmp_path, CHAT_SEQUENCE_LENGTH="128")
    try:
        w.wait_ready()
        client = ChatClient(tiny_settings(redis_url, queue_without_workers=True))
        cid = client.create_conversation("smollm2-135m")  # no smollm2 worker runs: queued for one to come
        task = client.send(cid, "hello")
        with pytest.raises(TimeoutError):
            client.wait(task.turn_id, timeout=3)
        assert client.store.turn(task.turn_id).status == "queued"
        assert r.llen("chat.smollm2-135m") == 1
        client.close()
    finally:
        w.stop()
