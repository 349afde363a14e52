"""What a valid delivery is, decided on the raw queue item before Celery sees it.

Anything can sit on a model's queue list: a producer of another version, a person with redis-cli, a
bug. Celery and kombu each handle some malformed messages (log and drop: the turn then waits forever)
and die on others (kombu's `loads` of a non-JSON item, Celery's `dump_body(None)`: the worker exits and
the item is put back, killing every worker of the model in turn). So every item a worker pops is
screened here first (worker/celery_workarounds.py calls `screen` on the BRPOP reply): a valid one
goes on to Celery with a fresh delivery tag; anything else is dead-lettered with the reason, and when
a turn id can be recovered from it, that turn (if still queued) is failed with the reason so its
conversation is free and its client is answered.

Valid = kombu's virtual-transport envelope holding Celery task protocol 2 for the `generate` task:
JSON content, base64 body `[[payload], {}, embed]`, no eta / countdown / expires (a turn runs as soon
as a worker is free; its deadline travels in the payload), a task id that is a turn id, and a payload
that validates as a GenerateTask (shared/wire.py).

What goes on to Celery is not the item as it came but the canonical message for its validated payload
(shared/task_message.py), with a delivery tag of its own: no header, property or embedded option
(shadow names, callbacks, chains, chords, priorities, routing) that a producer of this project never
sets can reach Celery, whatever its type. Celery acted on those: a dict as `shadow` left the task
received but never run, its slot taken for good; an embedded chain published new messages.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from shared.errors import first_error
from shared.keys import check_id
from shared.task_message import GENERATE_TASK, MAX_ITEM_BYTES, generate_message
from shared.wire import GenerateTask

MAX_DEAD_ITEM_CHARS = 10_000  # how much of a refused item the dead letter keeps
_CORRELATION = re.compile(rb'"(?:correlation_id|id)"\s*:\s*"([A-Za-z0-9_-]{1,64})"')


@dataclass(frozen=True)
class Accepted:
    item: bytes  # the envelope, re-encoded with a delivery tag of its own
    task: GenerateTask


@dataclass(frozen=True)
class Refused:
    reason: str
    turn_ids: tuple[str, ...]  # the turns it names (task id, payload), when they can be recovered
    item: str  # the raw item as text, truncated to MAX_DEAD_ITEM_CHARS


class _Bad(Exception):
    pass


def validation_message(e: ValidationError) -> str:
    """The first error of a pydantic ValidationError as `field.path: message`."""
    err = first_error(e)
    return f"{err.dotted}: {err.msg}"


def turn_id_or_none(value: object) -> str | None:
    try:
        return check_id(value)  # type: ignore[arg-type]
    except ValueError:
        return None


def item_text(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return text if len(text) <= MAX_DEAD_ITEM_CHARS else text[:MAX_DEAD_ITEM_CHARS] + "...<truncated>"


def screen(raw: bytes | str, model: str | None = None, queue: str | None = None) -> Accepted | Refused:
    """Check one queue item (never raises). `model`: the model this worker serves (a turn for another is
    refused); `queue`: where a redelivery of it must go (the model's shared queue, whichever of the worker's
    queues it was popped from), its routing key from here on; None keeps the item's own."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_ITEM_BYTES:
        ends = raw[:65536] + b" " + raw[-65536:]  # the envelope's metadata sits before or after the body
        ids = tuple(dict.fromkeys(m.group(1).decode() for m in _CORRELATION.finditer(ends)))
        return Refused(f"payload: the task message of {len(raw)} bytes exceeds {MAX_ITEM_BYTES}", ids, item_text(raw))
    recovered: list[str] = []
    try:
        return _screen(raw, model, queue, recovered)
    except _Bad as e:
        reason = str(e)
    except Exception as e:  # noqa: BLE001 - whatever the item does to a parser, the worker lives
        reason = f"malformed task message: cannot be read ({type(e).__name__})"
    return Refused(reason, tuple(dict.fromkeys(t for t in recovered if t)), item_text(raw))


def _json(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise _Bad(f"malformed task message: {what} is nested too deeply") from None


def _screen(raw: bytes, model: str | None, queue: str | None, recovered: list[str]) -> Accepted:
    try:
        env = _json(raw.decode("utf-8"), "the item")
    except UnicodeDecodeError:
        raise _Bad("malformed task message: not UTF-8 text") from None
    except ValueError as e:
        raise _Bad(f"malformed task message: not JSON ({e})") from None
    if not isinstance(env, dict):
        raise _Bad(f"malformed task message: a JSON {type(env).__name__}, not an envelope object")
    headers, props = env.get("headers"), env.get("properties")
    if isinstance(props, dict):
        recovered.append(turn_id_or_none(props.get("correlation_id")) or "")
    if not isinstance(headers, dict):
        raise _Bad("malformed task message: headers missing or not an object")
    recovered.append(turn_id_or_none(headers.get("id")) or "")
    if not isinstance(props, dict) or not isinstance(props.get("delivery_info"), dict):
        raise _Bad("malformed task message: properties.delivery_info missing or not an object")
    info = props["delivery_info"]
    if not isinstance(info.get("exchange", ""), str) or not isinstance(info.get("routing_key"), str):
        raise _Bad("malformed task message: delivery_info needs a routing_key string")
    task = headers.get("task")
    if task != GENERATE_TASK:
        what = "headers without a task name" if task is None else f"unknown task {str(task)[:80]!r}"
        raise _Bad(f"malformed task message: {what} (this queue only runs {GENERATE_TASK!r})")
    if turn_id_or_none(headers.get("id")) is None:
        raise _Bad(f"malformed task message: task id {str(headers.get('id'))[:80]!r} is not a turn id")
    for field in ("eta", "countdown", "expires"):
        if headers.get(field) is not None:
            raise _Bad(f"malformed task message: {field} is not supported (a turn runs as soon as a worker is "
                       "free; its deadline travels in the payload)")
    ctype, cenc = env.get("content-type"), env.get("content-encoding")
    if ctype != "application/json":
        raise _Bad(f"malformed task message: content type {str(ctype)[:60]!r} is not accepted (only "
                   "application/json; nothing else is ever deserialized)")
    if str(cenc).lower() not in ("utf-8", "utf8"):
        raise _Bad(f"malformed task message: content encoding {str(cenc)[:60]!r} (only utf-8)")
    body = env.get("body")
    if not isinstance(body, str):
        raise _Bad("malformed task message: the body is missing or not a string")
    encoding = props.get("body_encoding")
    if encoding == "base64":
        try:
            body = base64.b64decode(body, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise _Bad("malformed task message: the body is not base64-encoded UTF-8") from None
    elif encoding is not None:
        raise _Bad(f"malformed task message: body encoding {str(encoding)[:60]!r} (only base64)")
    try:
        decoded: Any = _json(body, "the body")
    except ValueError:
        raise _Bad("malformed task message: the body is not JSON") from None
    if not (isinstance(decoded, list) and len(decoded) == 3 and isinstance(decoded[0], list)
            and isinstance(decoded[1], dict) and isinstance(decoded[2], dict | None)):
        raise _Bad("malformed task message: the body is not [args, kwargs, embed]")
    args, kwargs = decoded[0], decoded[1]
    if len(args) != 1 or kwargs:
        raise _Bad(f"malformed task message: {GENERATE_TASK} takes exactly one payload argument, got "
                   f"{len(args)} positional and {len(kwargs)} keyword argument(s)")
    payload = args[0]
    if isinstance(payload, dict):
        recovered.append(turn_id_or_none(payload.get("turn_id")) or "")
    try:
        gen = GenerateTask.model_validate(payload)
    except ValidationError as e:
        raise _Bad(f"invalid payload: {validation_message(e)}") from None
    if gen.turn_id != headers["id"]:
        raise _Bad(f"invalid payload: turn_id {gen.turn_id!r} differs from the task id {headers['id']!r}")
    if model is not None and gen.model != model:
        raise _Bad(f"model {gen.model!r} is not served by this worker ({model})")
    # The canonical message, with a fresh delivery tag (each delivery its own: see celery_workarounds.py).
    return Accepted(generate_message(gen.turn_id, queue or info["routing_key"], gen.model_dump(mode="json"))
                    .encode("utf-8"), gen)
