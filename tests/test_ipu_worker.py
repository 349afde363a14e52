"""A real `python -m worker` process on the `ipu` backend, over the poptorch double (tests/fake_poptorch.py,
imported as `poptorch` through tests/fake_ipu_site/ on the subprocess's PYTHONPATH). The double writes
every device event (compile with its options, attach, detach) to a JSON-lines file, so the test sees
the device's side of the worker's life: compiled and attached before the worker says ready, and on
SIGTERM (mid-turn or idle) detached before the process exits, with exit code 0.

What this cannot prove: anything about real IPUs (see docs/IPU.md)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from config.celery import queue_name
from producer.client import ChatClient
from shared.keys import Keys
from shared.sampling import SamplingParams
from tests.conftest import tiny_settings
from tests.procs import ROOT, WorkerProcess, first_delta

pytestmark = pytest.mark.slow

KEYS = Keys("chat")
SEQ = 256  # tiny-neox's preset length: a fake step costs ~20 ms in fp16 on one CPU thread
LONG = SamplingParams(temperature=1.0, top_k=2, max_tokens=150, ignore_eos=True)  # runs to its length
SITE = ROOT / "tests" / "fake_ipu_site"
DETACH = re.compile(r"detached pipeline: turns finished=(\d+), turns handed back=(\d+), detach took [\d.]+s")


def ipu_env(events: Path, ipus: int, device: str, micro_batch: int, **env: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH", "")) if p)
    return {
        "PYTHONPATH": path,
        "FAKE_POPTORCH_LOG": str(events),
        "FAKE_POPTORCH_IPUS": str(ipus),
        "CHAT_DEVICE": device,
        "CHAT_SLOTS": str(micro_batch),
        "CHAT_SEQUENCE_LENGTH": str(SEQ),
        "CHAT_VISIBILITY_TIMEOUT_S": "3600",
        "CHAT_TURN_TIMEOUT_S": "25",
        **env,
    }


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def options(compile_event: dict[str, Any]) -> dict[str, Any]:
    """The last value each option was set to, as the double recorded it."""
    return {name: args[0] if args else True for name, args in compile_event["options"]}


@pytest.fixture
def start(r: redis.Redis, redis_url: str, tmp_path: Path):
    started: list[WorkerProcess] = []

    def start(name: str, **kw: Any) -> tuple[WorkerProcess, Path]:
        log = tmp_path / f"{name}.events.jsonl"
        w = WorkerProcess(redis_url, name, tmp_path, **ipu_env(log, **kw))
        started.append(w)
        w.wait_ready(60)
        return w, log

    yield start
    for w in started:
        w.stop()


@pytest.fixture
def client(r: redis.Redis, redis_url: str):
    c = ChatClient(tiny_settings(redis_url, sequence_length=SEQ))
    yield c
    c.close()


def wait_for(w: WorkerProcess, text: str, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while text not in w.log():
        assert time.monotonic() < end and w.proc.poll() is None, w.log()
        time.sleep(0.02)


def attached_at_ready(log: Path, ipus: int) -> dict[str, Any]:
    """Right after 'ready.': compiled once, then attached to the preset's IPUs, and nothing else yet."""
    evs = events(log)
    assert [e["event"] for e in evs] == ["compile", "attach"], evs
    compiled, attach = evs
    assert compiled["ipus"] == attach["ipus"] == attach["in_use"] == ipus and attach["of"] == ipus
    return compiled


def detached_at_exit(w: WorkerProcess, log: Path, pid: int) -> dict[str, Any]:
    """After the exit: one detach, the device's last event, by the worker's own process, every IPU free."""
    evs = events(log)
    assert [e["event"] for e in evs] == ["compile", "attach", "detach"], evs
    assert {e["pid"] for e in evs} == {pid}
    detach = evs[-1]
    assert detach["in_use"] == 0
    text = w.log()
    assert text.index("detached from the IPUs") < text.index("detached pipeline")
    assert "Unrecoverable error" not in text  # (a handed-back turn logs Celery's Reject with its traceback)
    return detach


def test_sigterm_mid_turn_on_ipu_pod4_finishes_the_turn_and_detaches_before_exit(start, client):
    w, log = start("pod4", ipus=4, device="ipu-pod4", micro_batch=1)
    compiled = attached_at_ready(log, 4)
    opts = options(compiled)
    # tiny-neox has 2 layers: 2 pipeline stages x 2 replicas over the 4 IPUs, 4 rows of 16 tokens per call.
    assert (opts["deviceIterations"], opts["replicationFactor"], opts["broadcastBuffers"]) == (2, 2, False)
    assert compiled["stage_ipus"] == [0, 1] and compiled["inputs"][0] == [4, 16]
    assert "concurrency: 4 (thread)" in w.log()  # one task thread per engine slot, not the micro-batch of 1

    cid = client.create_conversation("tiny-neox")
    task = client.send(cid, "a long answer please", LONG)
    assert first_delta(client, task.turn_id) == "celery@pod4"
    w.signal(signal.SIGTERM)
    wait_for(w, "warm shutdown")
    assert client.store.turn(task.turn_id).status == "running"  # the signal came mid-turn
    assert w.wait(30) == 0, w.log()

    res = client.wait(task.turn_id, timeout=5)
    assert (res.worker, res.attempt, res.finish_reason.value) == ("celery@pod4", 1, "length")
    assert res.completion_tokens == LONG.max_tokens
    assert DETACH.findall(w.log()) == [("1", "0")]
    detach = detached_at_exit(w, log, w.proc.pid)
    assert detach["runs"] > LONG.max_tokens  # every token was a step on the (fake) device
    text = w.log()
    assert text.index("warm shutdown") < text.index(f"turn {task.turn_id}: done") < text.index("detached from")
    assert "Traceback" not in text


def test_sigterm_past_the_grace_hands_the_turn_back_and_detaches_before_exit(r, start, client):
    w, log = start("pod4cold", ipus=4, device="ipu-pod4", micro_batch=1, CHAT_SHUTDOWN_GRACE_S="0")
    attached_at_ready(log, 4)
    cid = client.create_conversation("tiny-neox")
    task = client.send(cid, "a long answer please", LONG)
    first_delta(client, task.turn_id)
    w.signal(signal.SIGTERM)  # no grace: the turn in flight goes back to the queue
    assert w.wait(30) == 0, w.log()
    assert DETACH.findall(w.log()) == [("0", "1")]
    assert "cold shutdown (shutdown grace of 0s ran out): abandoned 1 turn(s)" in w.log()
    detached_at_exit(w, log, w.proc.pid)
    st = client.store.turn(task.turn_id)
    assert st.status != "done" and st.error is None  # not answered, not failed: handed back
    assert r.llen(queue_name(client.settings, "tiny-neox")) == 1 and not r.hlen("unacked")


def test_auto_preset_picks_ipu_pod16_on_16_ipus_and_an_idle_sigterm_detaches(start):
    w, log = start("auto16", ipus=16, device="ipu", micro_batch=4)
    assert "device 'ipu': this host reports 16 IPU(s): using preset 'ipu-pod16' (16 IPUs, micro-batch 4)" in w.log()
    compiled = attached_at_ready(log, 16)
    opts = options(compiled)
    # 2 layers over 16 IPUs: 2 stages x 8 replicas, 2 micro-batches of 4 rows per replica: 64 engine slots.
    assert (opts["deviceIterations"], opts["replicationFactor"]) == (2, 8)
    assert compiled["inputs"][0] == [64, 16]
    assert "concurrency: 64 (thread)" in w.log()
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0, w.log()
    assert DETACH.findall(w.log()) == [("0", "0")]
    assert detached_at_exit(w, log, w.proc.pid)["runs"] == 1  # the warm-up step only
    assert "Traceback" not in w.log()
