"""producer/chat.py: the notebook's chat loop as a command, on the embedded default and on a
real deployment (a worker process on real Redis)."""

import os
import subprocess
import sys

import pytest

from tests.procs import ROOT, WorkerProcess


def chat(args: list[str], prompts: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "EXAMPLE_PROMPTS": prompts}
    return subprocess.run([sys.executable, "-m", "producer.chat", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.smollm2
def test_embedded_default_answers_paris_with_smollm2():
    out = chat([], '["What is the capital of France?", ""]')
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "Prompter: AUTO What is the capital of France?"
    assert lines[1].startswith("Assistant: ") and "Paris" in lines[1]
    assert lines[2] == "Prompter: AUTO "
    assert "INFO" not in out.stdout


def test_chat_against_a_deployment(r, redis_url, tmp_path):
    w = WorkerProcess(redis_url, "chat@test", tmp_path)
    try:
        w.wait_ready()
        out = chat(["--redis", redis_url, "--model", "tiny-neox", "--output-length", "8", "--system", "Be brief."],
                   '["first question", "second question", ""]', timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("Assistant: ") == 2
        assert "Prompter: AUTO second question" in out.stdout
        convs = [k for k in r.keys("chat:conv:*") if not k.endswith(b":messages")]
        assert len(convs) == 1 and r.hget(convs[0], "system") == b"Be brief."
        assert r.llen(convs[0] + b":messages") == 4
    finally:
        w.stop()


def test_invalid_option_is_reported():
    out = chat(["--temperature", "-1"], "[]", timeout=60)
    assert out.returncode == 2 and "temperature" in out.stderr
