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
        tasks = [client.send(c, "hello", SamplingParams(temperature=1.0, top_k=0, seed=1, max_tokens=150))
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


@pytest.mark.slow
def test_two_workers_on_one_host_are_two_and_log_no_user_or_reply_text(r, redis_url, tmp_path):
    """Started the README's way (no --hostname), each worker names itself MODEL-PID@HOST: two workers are two
    liveness reports (two rows in /metrics, two in Flower). What people write and what the model replies
    never reaches the workers' logs (a turn is logged by its id and counts). The second worker, left on
    torch's default of every core (CHAT_THREADS blank, as compose passes it unset), warns that it shares them."""
    import re
    import socket

    ws = [WorkerProcess(redis_url, "default0", tmp_path, named=False)]
    try:
        ws[0].wait_ready()
        ws.append(WorkerProcess(redis_url, "default1", tmp_path, named=False, CHAT_THREADS="").wait_ready())
        (warning,) = [ln for ln in ws[1].log().splitlines() if "other worker(s) run on this host" in ln]
        assert f"tiny-neox-{ws[0].proc.pid}@" in warning and "set CHAT_THREADS" in warning
        assert "other worker(s)" not in ws[0].log()  # it set its threads (and was alone when it started)
        client = ChatClient(tiny_settings(redis_url))
        info = client.catalog.info("tiny-neox", fresh=True)
        names = sorted(rep.name for rep in info.workers)
        pids = sorted(w.proc.pid for w in ws)
        assert names == sorted(f"tiny-neox-{pid}@{socket.gethostname()}" for pid in pids)
        assert info.slots == 8
        secret = "my secret question about zebras"
        results = []
        for i in range(4):
            cid = client.create_conversation("tiny-neox", system="a private system prompt")
            results.append(client.ask(cid, f"{secret} {i}", SamplingParams(temperature=1.0, top_k=0, seed=i,
                                                                            max_tokens=40), timeout=60))
        import time

        end = time.monotonic() + 10  # each worker logs its turn just after the commit the client saw
        while not all(f"turn {res.turn_id}: done" in (logs := "".join(w.log() for w in ws)) for res in results):
            assert time.monotonic() < end, logs[-2000:]
            time.sleep(0.05)
        assert "zebras" not in logs and "private system prompt" not in logs
        for res in results:
            words = [w for w in re.findall(r"\w{4,}", res.text)]
            assert not any(f" {w} " in logs for w in words[:5]), res.text  # none of the reply's words
        client.close()
    finally:
        for w in ws:
            w.stop()
