"""Client-side Redis accounting: every redis-py connection in this process counts its round trips
(one socket write of one command or of a whole pipeline, then its replies) and the commands in them.

Installed by the bench in its own process, and in a worker subprocess through `_site/sitecustomize.py`
(which dumps the counters to a file that the bench reads). Counts are kept per *role*, a label the
calling thread sets (producer, reader, ...); threads without one count under the process default.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

SITE_DIR = Path(__file__).resolve().parent / "_site"
ENV_FILE = "BENCH_REDIS_COUNT_FILE"

_lock = threading.Lock()
_local = threading.local()
_default_role = "process"
round_trips: Counter[str] = Counter()
commands: Counter[str] = Counter()
by_name: Counter[str] = Counter()  # command name -> count (all roles)
_installed = False


def set_role(role: str | None) -> None:
    """Label this thread's Redis traffic (None: back to the process default)."""
    _local.role = role


def _role() -> str:
    return getattr(_local, "role", None) or _default_role


def _name(args: tuple) -> str:
    a = args[0] if args else b"?"
    return (a.decode() if isinstance(a, bytes) else str(a)).split(" ")[0].upper()


def install(default_role: str = "process") -> None:
    """Patch redis-py's connection class (idempotent)."""
    global _installed, _default_role
    _default_role = default_role
    if _installed:
        return
    from redis.connection import AbstractConnection

    send_packed, send_command, pack_commands = (
        AbstractConnection.send_packed_command,
        AbstractConnection.send_command,
        AbstractConnection.pack_commands,
    )

    def counted_send_packed(self, command, check_health=True):
        with _lock:
            round_trips[_role()] += 1
        return send_packed(self, command, check_health)

    def counted_send_command(self, *args, **kwargs):
        with _lock:
            commands[_role()] += 1
            by_name[_name(args)] += 1
        return send_command(self, *args, **kwargs)

    def counted_pack_commands(self, cmds):
        cmds = list(cmds)
        with _lock:
            commands[_role()] += len(cmds)
            for c in cmds:
                by_name[_name(tuple(c))] += 1
        return pack_commands(self, cmds)

    AbstractConnection.send_packed_command = counted_send_packed
    AbstractConnection.send_command = counted_send_command
    AbstractConnection.pack_commands = counted_pack_commands
    _installed = True


def snapshot() -> dict[str, dict[str, int]]:
    with _lock:
        return {
            "round_trips": dict(round_trips),
            "commands": dict(commands),
            "by_name": dict(by_name),
        }


def diff(after: dict[str, dict[str, int]], before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for kind, vals in after.items():
        prev = before.get(kind, {})
        d = {k: v - prev.get(k, 0) for k, v in vals.items()}
        out[kind] = {k: v for k, v in d.items() if v}
    return out


def read_file(path: Path) -> dict[str, dict[str, int]]:
    """The latest dump of a subprocess's counters (empty if it has not written one yet)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def dump_forever(path: Path, every_s: float = 0.05) -> None:
    """In a daemon thread: write the counters to `path` (atomically) every `every_s`."""

    def loop() -> None:
        tmp = path.with_suffix(".tmp")
        while True:
            tmp.write_text(json.dumps(snapshot()))
            os.replace(tmp, path)
            time.sleep(every_s)

    threading.Thread(target=loop, name="bench-redis-count", daemon=True).start()


def install_from_env() -> None:
    """Called by _site/sitecustomize.py at interpreter start when ENV_FILE is set."""
    path = os.environ.get(ENV_FILE)
    if not path:
        return
    install(default_role="worker")
    dump_forever(Path(path))
