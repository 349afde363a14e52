"""Put on PYTHONPATH (with the repository root) of a worker subprocess by the bench: counts that
process's Redis round trips and commands (tests/bench/redis_count.py). Does nothing otherwise."""

import os

if os.environ.get("BENCH_REDIS_COUNT_FILE"):
    from tests.bench.redis_count import install_from_env

    install_from_env()
