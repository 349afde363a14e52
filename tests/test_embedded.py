"""producer/embedded.py: the in-process worker stops the way a signal stops a worker process: its own
thread ends the event loop, lets the turn in flight finish, detaches, and nothing is logged as an error.
Another embedded worker can then start in the same process."""

from __future__ import annotations

import logging

from producer.client import ChatClient
from producer.embedded import InProcessWorker
from producer.reader import EventKind
from shared.sampling import SamplingParams
from shared.wire import FinishReason
from tests.conftest import tiny_settings


def test_stop_drains_the_turn_in_flight_detaches_and_a_second_worker_serves(fake_redis_url, caplog):
    settings = tiny_settings(fake_redis_url, sequence_length=1024)
    with caplog.at_level(logging.WARNING):
        for i in range(2):  # the second start checks that the first stop left nothing process-wide behind
            worker = InProcessWorker(settings).start()
            client = ChatClient(settings)
            cid = client.create_conversation("tiny-neox")
            task = client.send(cid, f"question {i}", SamplingParams(temperature=0, max_tokens=300, ignore_eos=True))
            # in flight when the stop comes: its first text was streamed
            assert next(e for e in client.events(task.turn_id, timeout=30) if e.kind is EventKind.delta).text
            worker.stop()
            assert not worker.thread.is_alive() and worker.app.chat_runtime.runtime is None
            result = client.wait(task.turn_id, timeout=5)  # finished before the worker detached
            assert (result.finish_reason, result.completion_tokens) == (FinishReason.length, 300)
            client.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]
