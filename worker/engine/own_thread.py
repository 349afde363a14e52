"""Give the engine one thread for all of the process's tensor work, loading included.

GNU OpenMP (torch's CPU thread pool) keeps a team of worker threads for every thread that ever ran
a parallel region. Load the model on the main thread and decode on the engine thread, and there are
two teams: more OpenMP threads than CPUs, so OpenMP stops spinning between parallel regions and each
one pays a futex wake-up. On this project's 2-core VM one int8 matmul took 92 us on the engine
thread against 31 us on the loading thread; a SmolLM2 int8 decode step took ~50 ms, 23 ms once fixed.
Building the pipeline on the thread that then runs the engine loop leaves a single team.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from worker.engine.engine import Engine

T = TypeVar("T")


def start_on_own_thread(setup: Callable[[], tuple[Engine, T]], name: str = "engine") -> tuple[Engine, T]:
    """Run `setup` (load, build, warm up; it returns the engine and anything else) on a new thread,
    which then runs the engine's loop. Returns what setup returned, or raises what it raised."""
    ready: Future[tuple[Engine, T]] = Future()

    def main() -> None:
        try:
            out = setup()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            ready.set_exception(e)
            return
        out[0].bind_thread()  # before the caller sees the engine: its stop() joins this thread
        ready.set_result(out)
        out[0].run()

    threading.Thread(target=main, name=name, daemon=True).start()
    return ready.result()
