"""worker/runtime.py: a worker process's pipeline. The model is loaded, built and warmed up on the
engine's own thread (one OpenMP team for all tensor work), and detach ends that thread."""

import threading

from shared.sampling import SamplingParams
from tests.conftest import tiny_settings
from worker import runtime as runtime_module
from worker.engine.engine import Finished
from worker.runtime import Runtime


def test_the_model_is_loaded_on_the_engine_thread_and_detach_ends_it(r, redis_url, monkeypatch):
    loaded_on: list[int] = []
    real_load = runtime_module.load_model

    def load_model(*a, **kw):
        loaded_on.append(threading.get_ident())
        return real_load(*a, **kw)

    monkeypatch.setattr(runtime_module, "load_model", load_model)
    rt = Runtime.open(tiny_settings(redis_url), "runtime-test")
    try:
        thread = rt.engine._thread
        assert thread is not None and thread.is_alive()
        assert loaded_on == [thread.ident] and thread.ident != threading.get_ident()
        events = list(rt.submit(rt.loaded.codec.encode_plain("hi"), SamplingParams(temperature=0), 4, None))
        assert isinstance(events[-1], Finished)
    finally:
        rt.detach()
    thread.join(5)
    assert not thread.is_alive()


def test_more_threads_than_cores_is_warned(caplog):
    import logging
    import os

    from worker.runtime import warn_if_oversubscribed

    cores = len(os.sched_getaffinity(0))
    with caplog.at_level(logging.WARNING):
        assert not warn_if_oversubscribed(cores)
        assert warn_if_oversubscribed(cores + 1)
    assert f"CHAT_THREADS={cores + 1} is more than the {cores} cores" in caplog.text


def test_each_worker_app_holds_its_own_runtime_and_hands_it_to_its_broker_channels(fake_redis_url):
    """No module global: the task's base class, the consumer and the transport's delivery screen all read
    the app's RuntimeHolder, so two worker apps in one process never see each other's pipeline."""
    import pytest

    from config.celery import GENERATE_TASK
    from worker.app import make_worker_app

    settings = tiny_settings(fake_redis_url)
    a, b = make_worker_app(settings), make_worker_app(settings)
    assert a.chat_runtime is not b.chat_runtime
    with pytest.raises(RuntimeError, match="no pipeline is attached"):
        _ = a.tasks[GENERATE_TASK].runtime
    attached = object()
    a.chat_runtime.runtime = attached
    assert a.tasks[GENERATE_TASK].runtime is attached and b.chat_runtime.runtime is None
    with a.connection_for_read() as conn:
        channel = conn.default_channel
        assert channel.chat_runtime is a.chat_runtime and channel.client.chat_runtime is a.chat_runtime
