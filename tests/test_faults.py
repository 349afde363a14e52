"""Faults and load with real processes: `python -m worker` (tiny-neox, CHAT_THREADS=1), real redis-server.

    SIGKILL mid-turn       the lease expires, the watchdog queues the turn again: it completes once, elsewhere
    lost-turn sequences    a redelivery while the first attempt lives (CLIENT KILL, or a SIGSTOP past the
                           lease), then SIGKILL of the live worker: the turn still completes once
    same-worker duplicate  the same task message pushed again while it runs: skipped; the stream is the reply
    duplicate delivery     the same task sent twice appends one reply
    Redis restart          workers and producer reconnect; nothing committed is lost; every turn once
    load                   3 workers, 50 conversations x 4 turns: 200 replies, once each, in order
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from config.celery import queue_name
from producer.client import ChatClient
from producer.reader import ReplyAssembler
from shared.errors import Busy, Unavailable
from shared.keys import Keys
from shared.messages import Role
from shared.sampling import SamplingParams
from shared.wire import TurnResult, TurnStatus
from tests.conftest import tiny_settings
from tests.procs import RedisServer, WorkerProcess, first_delta, send_retrying

KEYS = Keys("chat")
SEQ = 2048
# Runs to its length (~2-3 s on tiny-neox): a sampled reply could draw <|endoftext|> early, once in a while.
LONG = SamplingParams(temperature=1.0, top_k=2, max_tokens=1800, ignore_eos=True)
LEASE_S = 3  # short leases: a lost worker's turn comes back in seconds (the default is 10)
ENV = {"CHAT_SEQUENCE_LENGTH": str(SEQ), "CHAT_LEASE_S": str(LEASE_S), "CHAT_TURN_TIMEOUT_S": "30"}

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


def displayed(client: ChatClient, turn_id: str) -> str:
    """What a reader following the turn from its start shows at the end (restarts included)."""
    shown = ""
    asm = ReplyAssembler()
    for ev in client.events(turn_id, timeout=5):
        for up in asm.feed(ev):
            kind = type(up).__name__
            if kind == "Append":
                shown += up.text  # type: ignore[union-attr]
            elif kind == "Restart":
                shown = up.text  # type: ignore[union-attr]
            elif kind == "Done":
                shown += up.tail  # type: ignore[union-attr]
    return shown


def committed_stream_text(r: redis.Redis, res: TurnResult) -> str:
    """The deltas the committing attempt wrote to the stream."""
    entries = [f for _, f in r.xrange(KEYS.stream(res.turn_id))]
    return "".join(f[b"t"].decode() for f in entries if b"t" in f and int(f[b"a"]) == res.attempt)


def check_once(client: ChatClient, r: redis.Redis, cid: str, res: TurnResult) -> None:
    assert assistant_turns(client, cid) == [res.turn_id]  # exactly once
    assert committed_stream_text(r, res) == res.text == displayed(client, res.turn_id)
    assert not r.zscore(KEYS.running, res.turn_id) and not r.zscore(KEYS.queued, res.turn_id)
    assert r.llen("chat:dead") == 0


def test_sigkill_mid_turn_comes_back_with_the_lease_and_completes_once_on_the_other_worker(r, redis_url, workers):
    client = ChatClient(tiny_settings(redis_url, sequence_length=SEQ))
    cid = client.create_conversation("tiny-neox")
    task = client.send(cid, "a long answer please", LONG)
    host = first_delta(client, task.turn_id)
    message = r.hget(KEYS.turn(task.turn_id), "message")  # the kept task message, for a duplicate below
    (victim,) = [w for w in workers if host == f"celery@{w.name}"]
    (other,) = [w for w in workers if w is not victim]
    victim.proc.kill()  # SIGKILL: no handler, no ack, no reject
    killed = time.monotonic()
    victim.wait(10)
    assert r.hlen("unacked") == 1  # kombu's unacked entry stays; an hour would pass before kombu redelivers
    res = client.wait(task.turn_id, timeout=LEASE_S * 3 + 30)
    waited = time.monotonic() - killed
    assert res.worker == f"celery@{other.name}" and res.attempt == 2
    assert res.finish_reason.value == "length" and res.completion_tokens == LONG.max_tokens
    check_once(client, r, cid, res)
    assert stream_starts(r, task.turn_id) == [1, 2]  # readers were told the reply restarted
    assert r.hget(KEYS.turn(task.turn_id), "lost") == b"1"
    assert "lost its worker (lease expired): queued again" in other.log()
    print(f"\nSIGKILL -> committed by the other worker after {waited:.1f}s (lease {LEASE_S}s)")

    # The same task message delivered once more (kombu's own late redelivery, or a duplicate publish):
    r.lpush(queue_name(client.settings, "tiny-neox"), message)
    end = time.monotonic() + 20
    while f"turn {task.turn_id}: finished, skipped" not in other.log():
        assert time.monotonic() < end, other.log()
        time.sleep(0.05)
    assert assistant_turns(client, cid) == [task.turn_id]
    assert client.store.turn(task.turn_id).attempt == 2
    client.close()


@pytest.mark.parametrize("trigger", ["client-kill", "sigstop"])
def test_a_redelivery_while_the_first_attempt_lives_never_loses_the_turn(r, redis_url, tmp_path, trigger):
    """The issue's lost-turn sequence. A turn is delivered again while its first attempt is alive: a single
    CLIENT KILL makes every worker's kombu put back what it holds; a SIGSTOP past the lease has the watchdog
    queue the turn again. Then the worker running the live attempt is SIGKILLed. Before the fix the stale
    delivery's ack deleted the live one's claim and the turn stayed `running` forever."""
    server = RedisServer()
    ws = start_workers(server.url, tmp_path, ["q1", "q2"])
    try:
        client = ChatClient(tiny_settings(server.url, sequence_length=SEQ))
        rr = redis.Redis.from_url(server.url)
        cid = client.create_conversation("tiny-neox")
        task = client.send(cid, "a long answer please", LONG)
        first = by_host(ws, first_delta(client, task.turn_id))
        if trigger == "client-kill":
            rr.client_kill_filter(_type="normal")  # every worker's connections drop and reconnect
            end = time.monotonic() + 20
            while not any(f"turn {task.turn_id}: held, skipped" in w.log() for w in ws):
                assert time.monotonic() < end, [w.log()[-2000:] for w in ws]
                time.sleep(0.05)
            live = first  # the redelivery was skipped: the first attempt goes on
        else:
            first.signal(signal.SIGSTOP)
            end = time.monotonic() + LEASE_S * 4 + 10
            while rr.hget(KEYS.turn(task.turn_id), "attempt") != b"2":
                assert time.monotonic() < end
                time.sleep(0.05)
            first.signal(signal.SIGCONT)  # attempt 1 wakes up stale: its next flush tells it to stop
            live = by_host(ws, rr.hget(KEYS.turn(task.turn_id), "worker").decode())
        assert client.store.turn(task.turn_id).status is TurnStatus.running
        live.proc.kill()
        replacement = start_workers(server.url, tmp_path, ["q3"])[0] if live is first else None
        res = client.wait(task.turn_id, timeout=LEASE_S * 4 + 60)
        check_once(client, rr, cid, res)
        assert res.attempt >= 2 and res.finish_reason.value == "length"
        assert not rr.exists(KEYS.running) or rr.zcard(KEYS.running) == 0
        if replacement is not None:
            replacement.stop()
        if trigger == "sigstop":
            assert f"turn {task.turn_id}: attempt 1 was superseded" in first.log()
        client.close()
        rr.close()
    finally:
        for w in ws:
            w.stop()
        server.close()


def test_the_same_task_pushed_again_on_a_one_worker_pool_is_skipped_and_the_stream_is_the_reply(
        r, redis_url, tmp_path):
    (w,) = start_workers(redis_url, tmp_path, ["solo"])
    try:
        client = ChatClient(tiny_settings(redis_url, sequence_length=SEQ))
        cid = client.create_conversation("tiny-neox")
        task = client.send(cid, "a long answer please", LONG)
        first_delta(client, task.turn_id)
        r.lpush(queue_name(client.settings, "tiny-neox"), r.hget(KEYS.turn(task.turn_id), "message"))
        res = client.wait(task.turn_id, timeout=60)
        assert f"turn {task.turn_id}: held, skipped" in w.log()
        assert res.attempt == 1 and stream_starts(r, task.turn_id) == [1]
        check_once(client, r, cid, res)
        client.close()
    finally:
        w.stop()


def by_host(ws: list[WorkerProcess], host: str) -> WorkerProcess:
    (w,) = [w for w in ws if host == f"celery@{w.name}"]
    return w


# -- Redis restart -----------------------------------------------------------------------------------------


def test_redis_restart_loses_nothing_and_every_turn_completes_once(tmp_path):
    server = RedisServer()
    ws: list[WorkerProcess] = []
    try:
        ws = start_workers(server.url, tmp_path, ["rs1", "rs2"])
        client = ChatClient(tiny_settings(server.url, sequence_length=SEQ))
        n_conv, n_turns = 6, 3
        cids = [client.create_conversation("tiny-neox") for _ in range(n_conv)]
        spare = client.create_conversation("tiny-neox")  # gets a send while Redis is down
        sampling = SamplingParams(temperature=1.0, top_k=2, max_tokens=500)
        sent: dict[str, list[str]] = {cid: [] for cid in cids}
        errors: list[str] = []
        unavailable = 0

        def converse(cid: str) -> None:
            nonlocal unavailable
            def refused(e: Exception) -> None:
                nonlocal unavailable
                unavailable += isinstance(e, Unavailable)

            for t in range(n_turns):
                try:  # a send while Redis is down fails cleanly (Unavailable); the caller retries
                    task = send_retrying(client, cid, f"turn {t}", sampling, 90, refused)
                except (Unavailable, Busy) as e:
                    errors.append(f"{cid}: could not send turn {t}: {e}")
                    return
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
        with pytest.raises(Unavailable, match="Redis unavailable"):
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
        sampling = SamplingParams(temperature=1.0, top_k=5, max_tokens=16)
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
