"""worker/engine/own_thread.py: the pipeline is built on the thread that then runs the engine loop
(one thread, so one OpenMP team, does all tensor work); setup errors reach the caller."""

import threading
import time

import pytest

from shared.sampling import SamplingParams
from tests.models import engine_for
from tests.test_engine import final, prompts
from worker.engine.engine import Engine
from worker.engine.own_thread import start_on_own_thread


def test_setup_and_loop_share_one_thread_that_is_not_the_callers(tiny):
    seen: dict[str, int] = {}

    def setup():
        seen["setup"] = threading.get_ident()
        eng = engine_for(tiny.model, tiny.tokenizer, slots=2)  # engine_for starts a thread: stop it
        eng.stop()
        return Engine(eng.backend, eng.codec), "extra"

    engine, extra = start_on_own_thread(setup, name="engine-test")
    try:
        assert extra == "extra"
        assert seen["setup"] != threading.get_ident()
        assert engine._thread is not None and engine._thread.ident == seen["setup"]
        assert engine._thread.name == "engine-test"
        done = final(engine.submit(prompts(engine.codec)[0], SamplingParams(temperature=0), 5))
        assert done.completion_tokens >= 1
    finally:
        engine.stop()
    assert not engine._thread.is_alive()  # stop() from another thread ends the loop and its thread


def test_a_failing_setup_raises_in_the_caller_and_leaves_no_thread():
    before = {t.name for t in threading.enumerate()}

    def setup():
        raise RuntimeError("no such model")

    with pytest.raises(RuntimeError, match="no such model"):
        start_on_own_thread(setup, name="engine-doomed")
    end = time.monotonic() + 5
    while "engine-doomed" in {t.name for t in threading.enumerate()} - before:  # it returns right after
        assert time.monotonic() < end, "the setup thread outlived its failure"
        time.sleep(0.01)
