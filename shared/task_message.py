"""The generate task's message, byte for byte as Celery's Redis transport keeps it on a queue list.

Producers push this string onto the model's queue inside the same Lua script that stores the turn, so
a turn is stored and queued in one atomic step: there is no window in which a turn exists that no
message will ever deliver, and no separate publish round trip. The same string is kept on the turn
until it ends, so a turn whose worker vanished (or handed it back) is queued again exactly as it was.

Format: Celery's task message protocol 2 (docs.celeryq.dev, "Message Protocol": headers carry the
task name and id; the body is `[args, kwargs, embed]` as JSON) inside kombu's virtual-transport
envelope (kombu/transport/virtual/base.py: `prepare_message` + `_inplace_augment_message`, body
base64-encoded). tests/test_task_message.py holds it against what `send_task` itself pushes.
"""

from __future__ import annotations

import base64
import socket
import uuid
from typing import Any

from kombu.utils.json import dumps

from shared.wire import MAX_PAYLOAD_BYTES

GENERATE_TASK = "generate"
# The largest queue item a worker accepts: the envelope base64-encodes the payload's JSON (4/3) around a
# little metadata.
MAX_ITEM_BYTES = MAX_PAYLOAD_BYTES * 4 // 3 + 16_384
_ORIGIN = f"producer@{socket.gethostname()}"
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def generate_message(turn_id: str, queue: str, payload: Any) -> str:
    """The queue item (JSON text) that makes a worker run `generate(payload)` as task `turn_id`.

    The task id is the turn id, so every delivery of the turn names it in its headers. `argsrepr` is
    the turn id only: Celery logs and events show it, and they must not carry what people wrote.
    """
    headers = {
        "lang": "py",
        "task": GENERATE_TASK,
        "id": turn_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": turn_id,
        "parent_id": None,
        "argsrepr": f"(turn {turn_id})",
        "kwargsrepr": "{}",
        "origin": _ORIGIN,
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    body = dumps([[payload], {}, _EMBED])
    envelope = {
        "body": base64.b64encode(body.encode("utf-8")).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": turn_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": uuid.uuid4().hex,
        },
    }
    return str(dumps(envelope))
