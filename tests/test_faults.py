"""Faults and load with real processes: `python -m worker` (tiny-neox, CHAT_THREADS=1), real redis-server.

    SIGKILL mid-turn       the turn is redelivered after the visibility timeout and completes once
    duplicate delivery     the same task sent twice appends one reply
    Redis restart          workers and producer reconnect; nothing committed is lost; every turn once
    load                   3 workers, 50 conversations x 4 turns: 200 replies, once each, in order
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from config.celery import GENERATE_TASK, queue_name, restore_interval_s
from producer.client import ChatClient
from shared.errors import Busy, Unavailable
from shared.keys import Keys
from shared.messages import Role
from shared.sampling import SamplingParams
from tests.conftest import tiny_settings
from tests.procs import WorkerProcess

KEYS = Keys("chat")
SEQ = 2048
LONG = SamplingParams(temperature=1.0, top_k=2, output_length=1800)  # runs to its length: ~2-3 s on tiny-neox
VISIBILITY_S = 10
TURN_TIMEOUT_S = 8  # below the visibility timeout, as config requires for a single delivery per live turn
ENV = {"CHAT_SEQUENCE_LENGTH": str(SEQ), "CHAT_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
       "CHAT_TURN_TIMEOUT_S": str(TURN_TIMEOUT_S)}

pytestmark = pytest.mark.slow


def start_workers(url: str, log_dir: Path, names: list[str], **env: str) -> list[WorkerProcess]:
    ws = [WorkerProcess(url, n, log_dir, **{**ENV, **env}) for n in names]
    try:
        for w in ws:
            w.wait_ready(90)
    except BaseException:
        for w in ws:
            w.stop()
        raise
    return ws


@pytest.fixture
def workers(r: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    ws = start_workers(redis_url, tmp_path, ["k1", "k2"])
    yield ws
    for w in ws:
        w.stop()


def assistant_turns(client: ChatClient, cid: str) -> list[str | None]:
    return [m.turn_id for m in client.store.messages(cid) if m.role is Role.assistant]


def stream_starts(r: redis.Redis, turn_id: str) -> list[int]:
    return [int(f[b"a"]) for _, f in r.xrange(KEYS.stream(turn_id)) if f.get(b"ev") == b"start"]


def test_sigkill_mid_turn_is_redelivered_and_completes_once_on_the_other_worker(r, redis_url, workers):
    client = ChatClient(tiny_settings(redis_url, sequence_length=SEQ))
    cid = client.create_conversation("tiny-neox")
    task = client.send(cid, "a long answer please", LONG)
    for ev in client.events(task.turn_id, timeout=30):
        if ev.kind == "delta" and ev.text:
            break
    host = r.hget(KEYS.turn(task.turn_id), "worker").decode()
    (victim,) = [w for w in workers if host == f"celery@{w.name}"]
    (other,) = [w for w in workers if w is not victim]
    victim.proc.kill()  # SIGKILL: no handler, no ack, no reject
    killed = time.monotonic()
    victim.wait(10)
    assert r.hlen("unacked") == 1  # the message waits in kombu's unacked hash, not in the queue
    assert r.llen(queue_name(client.settings, "tiny-neox")) == 0
    # kombu hands it out again once it is VISIBILITY_S old, at the next sweep of a live worker (every
    # restore_interval_s); then it runs again from scratch (LONG takes a few seconds).
    res = client.wait(task.turn_id, timeout=VISIBILITY_S + 2 * restore_interval_s(client.settings) + 45)
    waited = time.monotonic() - killed
    assert res.worker == f"celery@{other.name}" and res.attempt == 2
    assert res.finish_reason.value == "length" and res.completion_tokens == LONG.output_length
    assert assistant_turns(client, cid) == [task.turn_id]  # exactly once
    assert stream_starts(r, task.turn_id) == [1, 2]  # readers were told to restart their display
    end = time.monotonic() + 10
    while r.hlen("unacked"):  # the redelivered message is acked just after its commit
        assert time.monotonic() < end
        time.sleep(0.05)
    assert r.llen("chat:dead") == 0
    print(f"\nSIGKILL -> committed by the other worker after {waited:.1f}s (visibility timeout {VISIBILITY_S}s)")

    # The same task delivered once more (a duplicate publish): the turn is done, nothing is appended.
    payload = task.model_dump(mode="json")
    client.celery.send_task(GENERATE_TASK, args=[payload], queue=queue_name(client.settings, "tiny-neox"))
    end = time.monotonic() + 20
    while f"turn {task.turn_id}: finished, skipped" not in other.log():
        assert time.monotonic() < end, other.log()
        time.sleep(0.05)
    assert assistant_turns(client, cid) == [task.turn_id]
    assert client.store.turn(task.turn_id).attempt == 2
    client.close()


# -- Redis restart -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server with appendonly on, restartable on the same port and data directory."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="redis-aof-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "yes",
             "--save", "", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = redis.Redis(port=self.port)
        end = time.monotonic() + 20
        while True:
            try:
                if r.ping():
                    break
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        r.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis-server writes and fsyncs its AOF, then exits
            self.proc.wait(20)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_redis_restart_loses_nothing_and_every_turn_completes_once(tmp_path):
    server = RedisServer()
    ws: list[WorkerProcess] = []
    try:
        ws = start_workers(server.url, tmp_path, ["rs1", "rs2"])
        client = ChatClient(tiny_settings(server.url, sequence_length=SEQ))
        n_conv, n_turns = 6, 3
        cids = [client.create_conversation("tiny-neox") for _ in range(n_conv)]
        spare = client.create_conversation("tiny-neox")  # gets a send while Redis is down
        sampling = SamplingParams(temperature=1.0, top_k=2, output_length=500)
        sent: dict[str, list[str]] = {cid: [] for cid in cids}
        errors: list[str] = []
        unavailable = 0

        def converse(cid: str) -> None:
            nonlocal unavailable
            for t in range(n_turns):
                end = time.monotonic() + 90
                while True:  # a send while Redis is down fails cleanly (Unavailable); the caller retries
                    try:
                        task = client.send(cid, f"turn {t}", sampling)
                        break
                    except (Unavailable, Busy) as e:
                        unavailable += isinstance(e, Unavailable)
                        if time.monotonic() > end:
                            errors.append(f"{cid}: could not send turn {t}: {e}")
                            return
                        time.sleep(0.3)
                sent[cid].append(task.turn_id)
                try:
                    client.wait(task.turn_id, timeout=120)
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(f"{cid}: turn {t}: {e!r}")
                    return

        threads = [threading.Thread(target=converse, args=(cid,)) for cid in cids]
        for t in threads:
            t.start()
        r = redis.Redis.from_url(server.url)
        end = time.monotonic() + 60
        while sum(len(assistant_turns(client, c)) for c in cids) < n_conv:  # some replies committed ...
            assert time.monotonic() < end
            time.sleep(0.05)
        before = {c: r.lrange(KEYS.messages(c), 0, -1) for c in cids}
        running = [t for c in cids for t in sent[c] if r.hget(KEYS.turn(t), "status") in (b"running", b"queued")]
        r.close()
        assert running  # ... and some in flight
        server.stop()
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="Redis unreachable"):
            client.send(spare, "while Redis is down", sampling)
        assert time.monotonic() - t0 < 5
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
        server.start()
        restarted = time.monotonic()
        for t in threads:
            t.join(150)
        assert not any(t.is_alive() for t in threads) and not errors, errors
        took = time.monotonic() - restarted
        r = redis.Redis.from_url(server.url)
        for c in cids:
            after = r.lrange(KEYS.messages(c), 0, -1)
            assert after[: len(before[c])] == before[c]  # everything committed before the restart survived
            assert assistant_turns(client, c) == sent[c] and len(sent[c]) == n_turns  # every turn once, in order
            roles = [m.role for m in client.store.messages(c)]
            assert roles == [Role.prompter, Role.assistant] * n_turns
        assert client.store.messages(spare) == [] and client.store.get(spare).busy is None  # nothing half-way
        assert client.ask(spare, "after the restart", sampling, timeout=60).completion_tokens > 0
        assert r.llen("chat:dead") == 0
        print(f"\nRedis restart: {len(running)} turn(s) in flight, {unavailable + 1} send(s) refused while down, "
              f"all {n_conv * n_turns} turns done {took:.1f}s after the restart")
        for w in ws:
            assert w.proc.poll() is None, w.log()  # the workers rode it out
        client.close()
        r.close()
    finally:
        for w in ws:
            w.stop()
        server.close()


# -- load ----------------------------------------------------------------------------------------------


def test_three_workers_200_turns_each_reply_once_in_order(r, redis_url, tmp_path):
    ws = start_workers(redis_url, tmp_path, ["l1", "l2", "l3"])
    try:
        client = ChatClient(tiny_settings(redis_url, sequence_length=SEQ))
        n_conv, n_turns = 50, 4
        sampling = SamplingParams(temperature=1.0, top_k=5, output_length=16)
        cids = [client.create_conversation("tiny-neox") for _ in range(n_conv)]
        latencies: list[float] = []
        sent: dict[str, list[str]] = {c: [] for c in cids}

        def converse(cid: str) -> None:
            for t in range(n_turns):
                t0 = time.monotonic()
                task = client.send(cid, f"conversation {cid[:6]} turn {t}", sampling)
                sent[cid].append(task.turn_id)
                client.wait(task.turn_id, timeout=120)
                latencies.append(time.monotonic() - t0)

        t0 = time.monotonic()
        with ThreadPoolExecutor(n_conv) as pool:
            list(pool.map(converse, cids))
        took = time.monotonic() - t0
        total = 0
        for c in cids:
            msgs = client.store.messages(c)
            assert [m.role for m in msgs] == [Role.prompter, Role.assistant] * n_turns
            assert [m.turn_id for m in msgs if m.role is Role.assistant] == sent[c]  # once each, in order
            total += n_turns
        assert total == 200 and len(latencies) == 200
        served = {w.name: w.log().count(": done (") for w in ws}
        assert sum(served.values()) == 200 and all(served.values()), served
        assert r.llen("chat:dead") == 0
        p95 = sorted(latencies)[int(0.95 * len(latencies)) - 1]
        print(f"\nload: 200 turns in {took:.1f}s = {200 / took:.1f} turns/s, p95 latency {p95 * 1000:.0f} ms, "
              f"per worker {served}")
        client.close()
    finally:
        for w in ws:
            w.stop()
