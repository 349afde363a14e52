"""producer/chat.py: the notebook's chat loop as a command, on the embedded default and on a
real deployment (a worker process on real Redis)."""

import json
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


class Terminal:
    """The CLI in a pseudo-terminal, driven like a person at a keyboard."""

    def __init__(self, args: list[str]):
        import pty

        self.master, slave = pty.openpty()
        env = {k: v for k, v in os.environ.items() if k != "EXAMPLE_PROMPTS"}
        env.update(TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")  # this pty does not answer cursor position queries

        def controlling_terminal() -> None:  # as a login shell does: Ctrl-C at the keyboard is SIGINT here
            import fcntl
            import termios

            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen([sys.executable, "-m", "producer.chat", *args], cwd=ROOT, env=env,
                                     stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_terminal)
        os.close(slave)
        self.out = ""
        self.mark = 0  # expect() looks past what an earlier expect() matched

    def expect(self, text: str, timeout: float = 60) -> str:
        import select
        import time

        end = time.monotonic() + timeout
        while text not in self.text[self.mark:]:
            assert time.monotonic() < end, f"{text!r} not in {self.text[-2000:]!r}"
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.out += os.read(self.master, 4096).decode(errors="replace")
                except OSError:  # the program exited
                    raise AssertionError(f"{text!r} not in {self.text[-3000:]!r}") from None
        self.mark = self.text.index(text, self.mark) + len(text)
        return self.text

    @property
    def text(self) -> str:
        """What was written, without the terminal's control sequences."""
        import re

        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", self.out)

    def send(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(20)
        finally:
            os.close(self.master)


def test_ctrl_c_mid_reply_cancels_the_turn_and_the_chat_goes_on(r, redis_url, tmp_path):
    """Ctrl-C during a reply cancels that turn (the worker stops, the partial reply is kept) and brings the
    prompt back; the arrow keys edit the line and Up recalls the last one; Ctrl-D leaves with exit 0."""
    w = WorkerProcess(redis_url, "tty@test", tmp_path, CHAT_SEQUENCE_LENGTH="2048")
    term = None
    try:
        w.wait_ready()
        term = Terminal(["--redis", redis_url, "--model", "tiny-neox", "--temperature", "1", "--top-k", "2",
                         "--output-length", "1800"])
        term.expect("Prompter:")
        term.send("a long ansXwer\x1b[D\x1b[D\x1b[D\x7f\r")  # Left x3, Backspace: the X goes
        term.expect("Assistant: ")
        import time

        time.sleep(0.3)  # mid-reply
        term.send("\x03")  # Ctrl-C
        out = term.expect("[cancelled]", timeout=30)
        term.expect("Prompter:", timeout=10)
        convs = [k for k in r.keys("chat:conv:*") if not k.endswith(b":messages")]
        (tid,) = [r.hget(convs[0], "turn").decode()]
        result = json.loads(r.hget(f"chat:turn:{tid}", "result"))
        assert result["finish_reason"] == "cancelled" and 0 < result["completion_tokens"] < 1800
        assert json.loads(r.lindex(convs[0] + b":messages", 0))["text"] == "a long answer"
        term.send("\x1b[A\r")  # Up: the last line again
        term.expect("Assistant: ", timeout=30)
        term.expect("[stopped at the output length]", timeout=60)
        term.expect("Prompter:", timeout=10)
        term.send("\x04")  # Ctrl-D at the prompt
        assert term.close() == 0
        assert "Traceback" not in term.out and "KeyboardInterrupt" not in out
        assert r.llen(convs[0] + b":messages") == 4
    finally:
        if term is not None and term.proc.poll() is None:
            term.proc.kill()
        w.stop()
