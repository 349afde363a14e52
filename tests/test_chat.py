"""producer/chat.py: the notebook's chat loop as a command, on the embedded default and on a
real deployment (a worker process on real Redis)."""

import json
import os
import subprocess
import sys

import pytest
import redis

from tests.procs import ROOT, WorkerProcess


def chat(args: list[str], prompts: str, timeout: float = 300, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EXAMPLE_PROMPTS": prompts, **env_vars}
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
    assert "Loading smollm2-135m on cpu (embedded" in out.stderr  # which preset runs, before it loads


@pytest.mark.smollm2
def test_without_a_compiler_the_default_chat_still_answers_paris(tmp_path):
    """A host where the project's kernels cannot be built (no C compiler here: CC=false, an empty kernel dir) runs
    torch's kernels, says so, and still answers: its bf16 logits used to make the first token's near-tie an exact
    tie that "L'Étoile, la Marseillaise, ..." won (the head now refines each row's top in fp32)."""
    out = chat(["--max-tokens", "24"], '["What is the capital of France?", ""]', CC="false",
               CHAT_KERNEL_DIR=str(tmp_path / "kernels"))
    assert out.returncode == 0, out.stderr
    assert "torch's int4/int8 kernels instead" in out.stderr
    assert "Paris" in out.stdout.splitlines()[1]


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
        # The default output length fits a model shorter than it (tiny-neox: 256 positions, default 512).
        out = chat(["--redis", redis_url, "--model", "tiny-neox"], '["hello", ""]', timeout=120)
        assert out.returncode == 0 and "[error]" not in out.stdout, out.stdout
        assert "Assistant: " in out.stdout
    finally:
        w.stop()


def test_invalid_option_is_reported():
    out = chat(["--temperature", "-1"], "[]", timeout=60)
    assert out.returncode == 2 and "temperature" in out.stderr


def test_an_unknown_device_is_named_before_anything_loads():
    out = chat(["--device", "cpu-int3"], "[]", timeout=60)
    assert out.returncode == 2 and "--device" in out.stderr and "'cpu-int3'" in out.stderr
    assert "cpu-compiled" in out.stderr and "Loading" not in out.stderr  # the presets there are, nothing started


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


def mid_reply(r: redis.Redis, tid: str, timeout: float = 30) -> None:
    """Wait until the worker has streamed some of the turn's reply and is still generating (a fixed sleep
    raced a loaded machine: the reply could end before the Ctrl-C, which then only stops the display)."""
    import time

    end = time.monotonic() + timeout
    while not (r.hget(f"chat:turn:{tid}", "status") == b"running" and r.xlen(f"chat:turn:{tid}:stream") > 1):
        assert time.monotonic() < end, r.hgetall(f"chat:turn:{tid}")
        time.sleep(0.01)


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
        convs = [k for k in r.keys("chat:conv:*") if not k.endswith(b":messages")]
        (tid,) = [r.hget(convs[0], "turn").decode()]
        mid_reply(r, tid)
        term.send("\x03")  # Ctrl-C
        out = term.expect("[cancelled]", timeout=30)
        term.expect("Prompter:", timeout=10)
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


def test_ctrl_c_after_the_reply_ended_stops_the_display_and_keeps_the_reply(r, redis_url, tmp_path, capsys):
    """The display can lag the worker: a Ctrl-C that lands after the turn ended stops the printing at once
    (what a terminal user means) and says the conversation keeps the whole reply; nothing is cancelled."""
    from producer.chat import turn
    from producer.client import ChatClient
    from shared.sampling import SamplingParams
    from shared.wire import TurnStatus
    from tests.conftest import tiny_settings

    class LaggingDisplay(ChatClient):  # the person presses Ctrl-C once the first event is on screen
        pressed = False

        def events(self, turn_id, after="0-0", timeout=None):
            if self.pressed:  # read again after the Ctrl-C: as it is
                yield from super().events(turn_id, after, timeout)
                return
            for _ in super().events(turn_id, after, timeout=60):  # the worker ends before the screen shows it
                pass
            self.pressed = True
            raise KeyboardInterrupt

    w = WorkerProcess(redis_url, "lag@test", tmp_path)
    client = LaggingDisplay(tiny_settings(redis_url))
    try:
        w.wait_ready()
        cid = client.create_conversation("tiny-neox")
        turn(client, cid, "hello", SamplingParams(max_tokens=20))
        out = capsys.readouterr().out
        assert out.startswith("Assistant: ") and "[interrupted" in out and "cancelled" not in out
        (tid,) = [r.hget(k, "turn").decode() for k in r.keys("chat:conv:*") if not k.endswith(b":messages")]
        state = client.store.turn(tid)
        assert state.status is TurnStatus.done and state.result.completion_tokens > 0
    finally:
        client.close()
        w.stop()


def test_a_worker_that_cannot_start_ends_the_chat_instead_of_hanging(monkeypatch):
    """The embedded stack's fake Redis server is closed when its worker fails to start (it kept the process alive)."""
    monkeypatch.setenv("CHAT_MODEL", "/nonexistent/model")
    out = chat([], '["hi", ""]', timeout=120)  # a hang raises TimeoutExpired
    assert out.returncode != 0 and "failed to start" in out.stderr
