"""Worker lifecycle with real `python -m worker` processes, real Redis and tiny-neox: start only once the
pipeline is attached (or fail clearly), warm shutdown finishes turns, cold shutdown hands them back,
detach runs once on every path."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import torch

from config.celery import queue_name
from producer.client import ChatClient
from shared.errors import Unavailable
from shared.keys import Keys
from shared.messages import Role
from shared.sampling import SamplingParams
from tests.conftest import tiny_settings
from tests.procs import ROOT, WorkerProcess, first_delta

KEYS = Keys("chat")
SEQ = 2048
# The reply runs to max_tokens (about 1.5 ms a token): top_k=2 keeps tiny-neox's end key out of reach
# nearly always, ignore_eos always.
LONG = SamplingParams(temperature=1.0, top_k=2, max_tokens=1800, ignore_eos=True)
# The default visibility timeout (an hour): a turn handed back by a cold shutdown must come back through
# the reject (at once), not through kombu's sweep for lost deliveries.
ENV = {"CHAT_SEQUENCE_LENGTH": str(SEQ), "CHAT_VISIBILITY_TIMEOUT_S": "3600", "CHAT_TURN_TIMEOUT_S": "25"}
DETACH = re.compile(r"detached pipeline: turns finished=(\d+), turns handed back=(\d+), detach took [\d.]+s")

pytestmark = pytest.mark.slow


@pytest.fixture
def workers(r: redis.Redis, redis_url: str, tmp_path: Path):
    """Start workers by name (all at once, then wait for each); every one is killed at the end."""
    started: list[WorkerProcess] = []

    def start(*names: str, **env: str) -> list[WorkerProcess]:
        ws = [WorkerProcess(redis_url, n, tmp_path, **{**ENV, **env}) for n in names]
        started.extend(ws)
        for w in ws:
            w.wait_ready(90)
        return ws

    yield start
    for w in started:
        w.stop()


@pytest.fixture
def client(r: redis.Redis, redis_url: str):
    # Queues turns whether or not a worker is live: these tests send some before or between workers.
    c = ChatClient(tiny_settings(redis_url, sequence_length=SEQ, queue_without_workers=True))
    yield c
    c.close()


def by_host(ws: list[WorkerProcess], host: str) -> WorkerProcess:
    (w,) = [w for w in ws if host == f"celery@{w.name}"]
    return w


def replies(client: ChatClient, cid: str) -> list[str]:
    return [m.turn_id for m in client.store.messages(cid) if m.role is Role.assistant]


def detach_lines(w: WorkerProcess) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in DETACH.findall(w.log())]


def starts(r: redis.Redis, turn_id: str) -> list[int]:
    return [int(f[b"a"]) for _, f in r.xrange(KEYS.stream(turn_id)) if f.get(b"ev") == b"start"]


# -- start -------------------------------------------------------------------------------------------


def test_worker_that_cannot_load_fails_at_start_with_a_clear_error(r, redis_url, tmp_path):
    down = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    cases = {
        "missing-model": (redis_url, {"CHAT_MODEL": "/nonexistent/path"}, "LoadError: model '/nonexistent/path'"),
        "ipu-without-poptorch": (redis_url, {"CHAT_DEVICE": "ipu-pod4"}, "needs poptorch"),
        "redis-down": (down, {}, "ConnectionError: Error 111 connecting to 127.0.0.1:1"),
    }
    if not torch.cuda.is_available():  # CI's case: no GPU
        cases["cuda-without-gpu"] = (redis_url, {"CHAT_DEVICE": "cuda"}, "device 'cuda': no CUDA GPU is visible")
    procs = {name: WorkerProcess(url, name, tmp_path, **env) for name, (url, env, _) in cases.items()}
    t0 = time.monotonic()
    try:
        codes = {"redis-down": procs["redis-down"].wait(30)}
        down_s = time.monotonic() - t0
        codes.update({name: w.wait(90) for name, w in procs.items()})
    finally:
        for w in procs.values():
            w.stop()
    for name, (_, _, expect) in cases.items():
        log = procs[name].log()
        assert codes[name] == 3, log
        (line,) = [ln for ln in log.splitlines() if "ERROR worker.lifecycle: worker cannot start:" in ln]
        assert expect in line, line
        assert "ready." not in log and "Unrecoverable error" not in log and "Traceback" not in log
    # Redis is checked before the model is loaded: the worker fails in seconds, having loaded nothing.
    assert down_s < 5 and "loading model" not in procs["redis-down"].log()
    # A missing device is found before any weights are read (24 GB for the 12B model).
    for name in cases.keys() - {"missing-model", "redis-down"}:
        assert "loaded model" not in procs[name].log(), name
    assert r.llen("chat:dead") == 0 and not r.exists("chat:models")  # it never got to serve anything


def test_bad_configuration_exits_2_before_loading(redis_url):
    p = subprocess.run(
        [sys.executable, "-m", "worker", "--redis", redis_url, "--slots", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "CHAT_SLOTS" in p.stderr


def test_signal_while_loading_stops_before_consuming_anything(r, redis_url, tmp_path, client):
    cid = client.create_conversation("tiny-neox")
    task = client.send(cid, "queued before any worker", SamplingParams(max_tokens=4))
    w = WorkerProcess(redis_url, "loading", tmp_path, **ENV)
    try:
        end = time.monotonic() + 60
        while "loading model" not in w.log():
            assert time.monotonic() < end and w.proc.poll() is None, w.log()
            time.sleep(0.02)
        w.signal(signal.SIGTERM)
        assert w.wait(30) == 0, w.log()
    finally:
        w.stop()
    assert "ready." not in w.log() and "while loading the pipeline" in w.log()
    st = client.store.turn(task.turn_id)
    assert (st.status, st.attempt) == ("queued", 0)  # untouched: still waiting for a worker
    assert r.llen(queue_name(client.settings, "tiny-neox")) == 1


# -- warm ---------------------------------------------------------------------------------------------


def test_sigterm_mid_turn_finishes_it_detaches_and_exits_0(r, workers, client):
    (w,) = workers("warm")
    cid = client.create_conversation("tiny-neox")
    task = client.send(cid, "a long answer please", LONG)
    assert first_delta(client, task.turn_id) == "celery@warm"
    w.signal(signal.SIGTERM)
    end = time.monotonic() + 10
    while "warm shutdown" not in w.log():
        assert time.monotonic() < end, w.log()
        time.sleep(0.02)
    assert client.store.turn(task.turn_id).status == "running"  # the signal came mid-turn
    strict = ChatClient(tiny_settings(client.settings.redis_url, sequence_length=SEQ), r=client.r)
    # It withdraws its liveness as its consumer stops, a moment after that log line (on a busy machine
    # more than a moment): producers stop counting on it while its turn is still running.
    end = time.monotonic() + 5
    while strict.catalog.info("tiny-neox", fresh=True).served:
        assert time.monotonic() < end, w.log()
        time.sleep(0.02)
    assert client.store.turn(task.turn_id).status == "running"
    with pytest.raises(Unavailable, match="no live worker"):
        strict.send(client.create_conversation("tiny-neox"), "sent during the shutdown", LONG)
    later = client.send(client.create_conversation("tiny-neox"), "sent during the shutdown", LONG)
    assert w.wait(60) == 0, w.log()
    res = client.wait(task.turn_id, timeout=5)
    assert (res.worker, res.attempt, res.finish_reason.value) == ("celery@warm", 1, "length")
    assert res.completion_tokens == LONG.max_tokens
    assert replies(client, cid) == [task.turn_id]
    assert detach_lines(w) == [(1, 0)]
    log = w.log()
    assert log.index("warm shutdown") < log.index(f"turn {task.turn_id}: done") < log.index("detached pipeline")
    # It stopped taking turns: the one sent during the shutdown is still queued for the next worker.
    st = client.store.turn(later.turn_id)
    assert (st.status, st.attempt) == ("queued", 0)


# -- cold ---------------------------------------------------------------------------------------------


def cold_case(r, workers, client, signals: list[signal.Signals], **env: str) -> tuple[WorkerProcess, list[str]]:
    """Two workers; the one serving a long turn gets `signals`; the other must finish the turn, once."""
    ws = workers("c1", "c2", **env)
    cid = client.create_conversation("tiny-neox")
    task = client.send(cid, "a long answer please", LONG)
    victim = by_host(ws, first_delta(client, task.turn_id))
    for s in signals:
        victim.signal(s)
        time.sleep(0.2)
    assert victim.wait(60) == 0, victim.log()
    res = client.wait(task.turn_id, timeout=60)  # far below the hour a lost delivery would take
    end = time.monotonic() + 10
    while r.hlen("unacked"):  # nothing left behind unacked (the survivor acks just after its commit)
        assert time.monotonic() < end, r.hkeys("unacked")
        time.sleep(0.05)
    (other,) = [w for w in ws if w is not victim]
    assert res.worker == f"celery@{other.name}" and res.attempt == 2
    assert replies(client, cid) == [task.turn_id]  # exactly once
    assert starts(r, task.turn_id) == [1, 2]  # readers saw attempt 2 start over
    st = client.store.turn(task.turn_id)
    assert st.status == "done" and st.error is None  # never marked failed on the way
    assert r.llen("chat:dead") == 0
    assert detach_lines(victim) == [(0, 1)]
    other.signal(signal.SIGINT)  # the survivor, idle now: a plain warm stop
    assert other.wait(30) == 0, other.log()
    assert detach_lines(other) == [(1, 0)]
    return victim, victim.log().splitlines()


def test_sigquit_mid_turn_hands_it_back_and_it_completes_once_elsewhere(r, workers, client):
    victim, log = cold_case(r, workers, client, [signal.SIGQUIT])
    assert any("cold shutdown (SIGQUIT): abandoned 1 turn(s)" in ln for ln in log)
    assert not any("Unrecoverable error" in ln for ln in log)


def test_second_sigterm_is_a_cold_shutdown(r, workers, client):
    victim, log = cold_case(r, workers, client, [signal.SIGTERM, signal.SIGTERM])
    assert any("cold shutdown (second stop signal (SIGTERM))" in ln for ln in log)


def test_grace_period_running_out_is_a_cold_shutdown(r, workers, client):
    victim, log = cold_case(r, workers, client, [signal.SIGTERM], CHAT_SHUTDOWN_GRACE_S="0.3")
    assert any("cold shutdown (shutdown grace of 0.3s ran out)" in ln for ln in log)
