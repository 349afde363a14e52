"""Worker processes for multi-process tests: `python -m worker` exactly as deployed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis

from producer.embedded import free_port
from shared.errors import Busy, Unavailable

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

    def ready(self) -> bool:
        """Whether it has said 'ready.' (pipeline attached, consumer running)."""
        return "ready." in self.log()

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


class ApiProcess:
    """`python -m producer.api` on a free port, auth off, logging to `log_dir`; ready once /healthz answers."""

    def __init__(self, redis_url: str, log_dir: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"api-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "producer.api", "--redis", redis_url, "--port", str(self.port)],
            cwd=ROOT, env={**os.environ, "CHAT_API_KEYS": "", "PYTHONUNBUFFERED": "1", **env},
            stdout=self._log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None and time.monotonic() < end, self.log()
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

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


def wait_answering(port: int, password: str | None = None, timeout: float = 20) -> None:
    """Until the redis-server on `port` answers PING (it may still be loading its data)."""
    r = redis.Redis(port=port, password=password)
    end = time.monotonic() + timeout
    try:
        while True:
            try:
                r.ping()
                return
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
    finally:
        r.close()


def send_retrying(client: Any, cid: str, text: str, sampling: Any, within_s: float,
                  on_refused: Callable[[Exception], None] | None = None) -> Any:
    """`client.send`, sent again while Redis is away or the conversation still busy (as a caller would),
    for at most `within_s`; raises the last refusal after that."""
    end = time.monotonic() + within_s
    while True:
        try:
            return client.send(cid, text, sampling)
        except (Unavailable, Busy) as e:
            if on_refused is not None:
                on_refused(e)
            if time.monotonic() > end:
                raise
            time.sleep(0.3)


class RedisServer:
    """A private redis-server with appendonly on, restartable on the same port and data directory;
    `password`: its requirepass (not in `url`)."""

    def __init__(self, password: str | None = None) -> None:
        self.password = password
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="redis-aof-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "yes",
             "--save", "", "--dir", self.dir, *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_answering(self.port, self.password)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis-server writes and fsyncs its AOF, then exits
            self.proc.wait(20)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelCluster:
    """A primary, a replica and three sentinels (`redis-server --sentinel`), each its own process on a free
    port, monitoring the primary as `master_name` with short timeouts (down after 1 s), so a SIGKILLed
    primary is replaced in a few seconds. `url` is the sentinel:// list clients are given."""

    def __init__(self, master_name: str = "mymaster", down_after_ms: int = 1000) -> None:
        self.master_name = master_name
        self.dir = tempfile.mkdtemp(prefix="redis-sentinel-")
        self.data: dict[int, subprocess.Popen] = {}
        self.sentinels: list[tuple[int, subprocess.Popen]] = []
        try:
            primary, replica = free_port(), free_port()
            self.data[primary] = self._data_node(primary)
            self.data[replica] = self._data_node(replica, f"127.0.0.1 {primary}")
            for _ in range(3):
                port = free_port()
                conf = Path(self.dir) / f"sentinel-{port}.conf"
                conf.write_text(
                    f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                    f"sentinel monitor {master_name} 127.0.0.1 {primary} 2\n"
                    f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
                    f"sentinel failover-timeout {master_name} 10000\n"
                    f"sentinel parallel-syncs {master_name} 1\n")
                self.sentinels.append((port, subprocess.Popen(
                    ["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            self.url = ";".join(f"sentinel://127.0.0.1:{p}" + ("/0" if i == 0 else "")
                                for i, (p, _) in enumerate(self.sentinels))
            self.wait_settled(primary, 30)
        except BaseException:
            self.close()
            raise

    def _data_node(self, port: int, replicaof: str | None = None) -> subprocess.Popen:
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.dir, "--dbfilename", f"dump-{port}.rdb", "--repl-diskless-sync-delay", "0"]
        proc = subprocess.Popen(args + (["--replicaof", *replicaof.split()] if replicaof else []),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_answering(port)
        return proc

    def sentinel(self, i: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinels[i][0], decode_responses=True)

    def primary_port(self) -> int:
        """The primary's port as the first sentinel sees it now."""
        s = self.sentinel()
        try:
            return int(s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)[1])
        finally:
            s.close()

    def wait_settled(self, primary: int, timeout: float) -> None:
        """Until every replica's link to `primary` is up and every sentinel names `primary`, sees a replica
        and the two other sentinels: only then is a failover both possible and lossless."""
        end = time.monotonic() + timeout
        while True:
            ok = True
            for port, proc in self.data.items():
                if port != primary and proc.poll() is None:
                    try:
                        ok &= redis.Redis(port=port).info("replication").get("master_link_status") == "up"
                    except redis.ConnectionError:
                        ok = False
            for i in range(len(self.sentinels)):
                s = self.sentinel(i)
                try:
                    m = s.sentinel_master(self.master_name)
                    replicas = [x for x in s.sentinel_slaves(self.master_name)
                                if not (x["is_sdown"] or x["is_disconnected"])]
                    ok &= (int(m["port"]) == primary and int(m["num-other-sentinels"]) == 2
                           and not m["is_sdown"] and len(replicas) >= 1)
                except (redis.ConnectionError, redis.ResponseError):
                    ok = False
                finally:
                    s.close()
            if ok:
                return
            if time.monotonic() > end:
                raise TimeoutError(f"sentinels did not settle on primary {primary} in {timeout}s")
            time.sleep(0.2)

    def kill_primary(self) -> int:
        """SIGKILL the primary; returns its port."""
        port = self.primary_port()
        self.data[port].kill()
        self.data[port].wait(10)
        return port

    def wait_promoted(self, old: int, timeout: float = 30) -> int:
        """Until the sentinels name a new primary (not `old`) and it answers as master; returns its port."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                port = self.primary_port()
                if port != old and redis.Redis(port=port).info("replication")["role"] == "master":
                    return port
            except (redis.ConnectionError, redis.ResponseError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"no replica was promoted in {timeout}s")

    def restart_as_replica(self, port: int, primary: int) -> None:
        """Start the node on `port` again (its data gone) as a replica of `primary`."""
        if self.data[port].poll() is None:
            self.data[port].kill()
            self.data[port].wait(10)
        self.data[port] = self._data_node(port, f"127.0.0.1 {primary}")

    def close(self) -> None:
        for proc in [*self.data.values(), *(p for _, p in self.sentinels)]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
