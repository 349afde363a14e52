"""Worker processes for multi-process tests: `python -m worker` exactly as deployed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from producer.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    def __init__(self, redis_url: str, name: str, log_dir: Path, named: bool = True, **env: str):
        """`named=False`: the worker picks its own default name (`name` only names the log file)."""
        self.name = name
        self.redis_url = redis_url
        self.log_path = log_dir / f"{name}.log"
        full_env = {
            **os.environ,
            "CHAT_MODEL": "tiny-neox",
            "CHAT_DEVICE": "cpu-fp32",
            "CHAT_SLOTS": "4",
            "CHAT_THREADS": "1",
            "CHAT_STREAM_FLUSH_MS": "20",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--redis", redis_url, *(["--hostname", name] if named else [])],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60) -> WorkerProcess:
        """Ready = the pipeline is attached and the consumer runs ('ready' in Celery's log)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if "ready." in self.log():
                return self
            time.sleep(0.1)
        raise TimeoutError(f"worker {self.name} not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def served(r: redis.Redis, turn_hash_key: str) -> str:
    return (r.hget(turn_hash_key, "worker") or b"").decode()


def first_delta(client, turn_id: str, timeout: float = 30) -> str:
    """Wait until the turn is generating; returns the worker serving it."""
    for ev in client.events(turn_id, timeout=timeout):
        if ev.kind == "delta" and ev.text:
            return client.r.hget(client.keys.turn(turn_id), "worker").decode()
        assert ev.kind != "done", "the turn finished before it could be interrupted"
    raise AssertionError("no delta")


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
