"""docker-compose.yml: the services, their profiles, and that every command names a real entry point."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
# Commands of services that run a third-party image: the program that image provides.
IMAGE_PROGRAMS = {"redis": "redis-server", "flower": "celery"}


def services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def run_help(module: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_services_and_profiles() -> None:
    svc = services()
    assert set(svc) == {"redis", "api", "cpu-worker", "gpu-worker", "ipu-worker", "flower"}
    profiles = {name: s.get("profiles") for name, s in svc.items()}
    assert profiles == {"redis": None, "api": None, "cpu-worker": None, "gpu-worker": ["gpu"],
                        "ipu-worker": ["ipu"], "flower": ["flower"]}
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
    assert s["command"][:4] == ["python", "-m", "worker", "--redis"] and "${REDIS_HOST" in s["command"][4]
    env = s["environment"]
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
    assert done.returncode == 0 and "--redis" in done.stdout, done.stderr
    redis_url = cmd[cmd.index("--redis") + 1]
    host = "${REDIS_HOST" if s.get("network_mode") == "host" else "@redis:6379/"
    assert redis_url.startswith("redis://:${REDIS_PASSWORD") and host in redis_url


def test_docker_compose_config_validates() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is needed to validate docker-compose.yml: apt-get install -y docker-compose")
    profiles = ["--profile", "gpu", "--profile", "ipu", "--profile", "flower"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "CHAT_", "COMPOSE_"))}
    ok = subprocess.run([exe, "-f", str(COMPOSE), *profiles, "config", "-q"], cwd=ROOT, capture_output=True,
                        text=True, env={**env, "REDIS_PASSWORD": "test"}, timeout=60)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run([exe, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, capture_output=True, text=True,
                             env=env, timeout=60)
    assert missing.returncode != 0 and "set REDIS_PASSWORD" in missing.stderr
