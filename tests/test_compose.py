"""docker-compose.yml: the services, their profiles, that every command names a real entry point, that
every app reaches Redis through the same settings, and that the `ha` profile's sentinel script makes a
sentinel that watches an authenticated primary (run here against a private redis-server)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
# Commands of services that run a third-party image: the program that image provides.
IMAGE_PROGRAMS = {"redis": "redis-server", "redis-replica": "redis-server", "flower": "celery",
                  "sentinel-1": "sh", "sentinel-2": "sh", "sentinel-3": "sh"}
APPS = ["api", "cpu-worker", "gpu-worker", "ipu-worker"]


def services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def run_help(module: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_services_and_profiles() -> None:
    svc = services()
    assert set(svc) == {"redis", "api", "cpu-worker", "gpu-worker", "ipu-worker", "flower", "redis-replica",
                        "sentinel-1", "sentinel-2", "sentinel-3"}
    profiles = {name: s.get("profiles") for name, s in svc.items()}
    assert profiles == {"redis": None, "api": None, "cpu-worker": None, "gpu-worker": ["gpu"],
                        "ipu-worker": ["ipu"], "flower": ["flower"], "redis-replica": ["ha"],
                        "sentinel-1": ["ha"], "sentinel-2": ["ha"], "sentinel-3": ["ha"]}
    redis_cmd = svc["redis"]["command"]
    assert redis_cmd[:3] == ["redis-server", "--appendonly", "yes"]
    assert redis_cmd[redis_cmd.index("--requirepass") + 1].startswith("${REDIS_PASSWORD")
    assert svc["cpu-worker"]["environment"]["CHAT_MODEL"].endswith("smollm2-135m}")
    assert svc["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


@pytest.mark.parametrize("name", ["cpu-worker", "gpu-worker", "ipu-worker"])
def test_workers_scale(name: str) -> None:
    s = services()[name]
    assert "container_name" not in s and "ports" not in s and "hostname" not in s, f"{name} could not be scaled"


def test_ipu_worker_as_proposed() -> None:
    s = services()["ipu-worker"]
    dockerfile = ROOT / s["build"]["dockerfile"]
    assert dockerfile.name == "ipu-worker.Dockerfile" and "FROM graphcore/pytorch" in dockerfile.read_text()
    assert s["command"] == ["python", "-m", "worker"]
    env = s["environment"]
    assert env["CHAT_REDIS_URL"].startswith("${IPU_REDIS_URL:-redis://127.0.0.1:")
    assert env["CHAT_DEVICE"] == "ipu-pod4" and "oasst-pythia-12b" in env["CHAT_MODEL"]
    assert {"IPUOF_VIPU_API_HOST", "IPUOF_VIPU_API_PARTITION_ID"} <= set(env)
    assert (s["network_mode"], s["ipc"], s["cap_add"]) == ("host", "host", ["IPC_LOCK"])
    assert s["ulimits"]["memlock"] == {"soft": -1, "hard": -1}
    assert s["devices"] == ["/dev/infiniband:/dev/infiniband"]
    assert any(v.split(":")[1].endswith(".cache/poptorch") for v in s["volumes"])
    assert s["stop_grace_period"] == "60s"


@pytest.mark.parametrize("name", sorted(services()))
def test_command_is_a_real_entry_point(name: str) -> None:
    s = services()[name]
    cmd = s["command"]
    assert isinstance(cmd, list) and cmd, f"{name}: command must be an exec-form list"
    if "build" not in s:  # a third-party image: its own program; celery's CLI is checked here too
        assert cmd[0] == IMAGE_PROGRAMS[name]
        if cmd[0] == "celery":
            assert run_help("celery").returncode == 0
        return
    assert (ROOT / s["build"]["context"] / s["build"]["dockerfile"]).is_file()
    assert cmd[:2] == ["python", "-m"], f"{name}: expected `python -m MODULE ...`, got {cmd}"
    module = cmd[2]
    assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
    done = run_help(module)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", APPS)
def test_every_app_reaches_redis_through_the_same_settings(name: str) -> None:
    """The URL, the password (never inside a URL), the master name and the replicas to wait for: one anchor,
    so `CHAT_REDIS_URL=sentinel://...` moves every app to Sentinel at once."""
    env = services()[name]["environment"]
    assert env["CHAT_REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    assert env["CHAT_REDIS_MASTER_NAME"] == "mymaster"
    assert env["CHAT_REDIS_WAIT_REPLICAS"] == "${CHAT_REDIS_WAIT_REPLICAS:-0}"
    if name != "ipu-worker":
        assert env["CHAT_REDIS_URL"] == "${CHAT_REDIS_URL:-redis://redis:6379/0}"
    assert all("redis://" not in part for part in services()[name]["command"])


def test_ha_data_nodes_can_follow_either_role() -> None:
    """Each data node authenticates to a primary (masterauth) and announces its service name, so after a
    failover the demoted primary can sync from the promoted replica and clients resolve both."""
    svc = services()
    for name in ("redis", "redis-replica"):
        cmd = svc[name]["command"]
        assert cmd[cmd.index("--masterauth") + 1] == cmd[cmd.index("--requirepass") + 1]
        assert cmd[cmd.index("--replica-announce-ip") + 1] == name
    replica = svc["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1:][:2] == ["redis", "6379"]


def test_the_sentinel_script_watches_an_authenticated_primary(tmp_path: Path) -> None:
    """The `ha` sentinels' own shell script, run here: `redis` becomes 127.0.0.1, /data a temporary
    directory, the port a free one. The sentinel it starts must see the password-protected primary up."""
    import redis

    from producer.embedded import free_port
    from tests.procs import RedisServer

    primary = RedisServer(password="pw")
    port = free_port()
    script = (services()["sentinel-1"]["command"][2].replace("$$", "$").replace("/data", str(tmp_path))
              .replace("port 26379", f"port {port}")
              .replace("mymaster redis 6379", f"mymaster 127.0.0.1 {primary.port}"))
    proc = subprocess.Popen(["sh", "-c", script], env={**os.environ, "REDIS_PASSWORD": "pw"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        s = redis.Redis(port=port, decode_responses=True)
        end = time.monotonic() + 20
        while True:
            try:
                m = s.sentinel_master("mymaster")
                if m["role-reported"] == "master" and m["last-ok-ping-reply"] < 1000 and not m["is_sdown"]:
                    break
            except (redis.ConnectionError, redis.ResponseError):
                pass
            assert time.monotonic() < end and proc.poll() is None, "the sentinel did not see the primary up"
            time.sleep(0.2)
        assert "sentinel auth-pass mymaster pw" in (tmp_path / "sentinel.conf").read_text()
        s.close()
    finally:
        proc.kill()
        proc.wait(10)
        primary.close()


def test_docker_compose_config_validates() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is needed to validate docker-compose.yml: apt-get install -y docker-compose")
    profiles = ["--profile", "gpu", "--profile", "ipu", "--profile", "flower", "--profile", "ha"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "CHAT_", "COMPOSE_"))}
    ok = subprocess.run([exe, "-f", str(COMPOSE), *profiles, "config", "-q"], cwd=ROOT, capture_output=True,
                        text=True, env={**env, "REDIS_PASSWORD": "test"}, timeout=60)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run([exe, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, capture_output=True, text=True,
                             env=env, timeout=60)
    assert missing.returncode != 0 and "set REDIS_PASSWORD" in missing.stderr
