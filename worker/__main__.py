"""Start a worker: `python -m worker --redis redis://HOST:6379/0 --model smollm2-135m --device cpu`.

Every option but --hostname and --loglevel also reads from its CHAT_* variable (config/settings.py).
The process loads and attaches its pipeline, then consumes only its model's queues (the
shared one and its own: config/celery.py). SIGTERM/SIGINT stop it warm (turns in
flight finish within CHAT_SHUTDOWN_GRACE_S); SIGQUIT or a second signal stops it cold (turns in
flight go back to the queue). See worker/lifecycle.py and docs/GUARANTEES.md.

Exit codes: 0 after a warm or cold shutdown, 2 bad configuration, 3 the pipeline could not be
loaded or attached (nothing was consumed), 4 a signal during a cold shutdown forced the exit,
1 any other failure (Celery's "Unrecoverable error").
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from config.quiet import no_progress_bars
from config.settings import ConfigError, load_settings


def main(argv: list[str] | None = None) -> int:
    no_progress_bars()  # before anything imports tqdm (config/quiet.py)
    ap = argparse.ArgumentParser(prog="python -m worker", description=__doc__.split("\n")[0])
    ap.add_argument("--redis", dest="redis_url",
                    help="Redis URL, or a sentinel:// list with CHAT_REDIS_MASTER_NAME (CHAT_REDIS_URL)")
    ap.add_argument("--model", help="model preset, hub id or local path")
    ap.add_argument(
        "--device", help="device preset: cpu, cpu-fp32, cuda, ipu (pod4 or pod16 by IPU count), ipu-pod4, ipu-pod16"
    )
    ap.add_argument("--slots", type=int, help="concurrent sequences (overrides the device preset)")
    ap.add_argument("--sequence-length", type=int, help="positions per sequence (overrides the model preset)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: every core; with N workers on one "
                    "host, about cores / N)")
    ap.add_argument("--hostname", help="worker name, unique in the pool (default: MODEL-PID@HOST)")
    ap.add_argument("--loglevel", default="INFO", help="DEBUG, INFO (default), WARNING, ERROR")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in vars(args).items() if k not in ("hostname", "loglevel") and v is not None}
    try:
        settings = load_settings(**overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    import redis

    from config.redis_clients import sync_client

    try:  # before the heavy imports and the model load: an unreachable Redis fails the start in seconds
        sync_client(settings.redis_url, **settings.redis_options(), retries=0).ping()
    except redis.RedisError as e:
        logging.getLogger("worker.lifecycle").error("worker cannot start: %s: %s", type(e).__name__, e)
        return 3
    from worker.app import make_worker_app, worker_options
    from worker.lifecycle import detach_attached

    app = make_worker_app(settings)
    # Unique per process: two workers on one host must not share a liveness report or a name in Flower.
    hostname = args.hostname or f"{settings.model_preset().name.replace('/', '_')}-{os.getpid()}@{socket.gethostname()}"
    w = app.Worker(**worker_options(settings, hostname, args.loglevel.upper()))
    try:
        w.start()
    finally:
        detach_attached(app.chat_runtime)  # every path detaches, even one that never reached the step's stop
    return int(w.exitcode or 0)


if __name__ == "__main__":
    sys.exit(main())
