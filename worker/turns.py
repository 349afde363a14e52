"""One turn, start to finish: validate, claim (begin), fit the context, generate through the
engine while streaming deltas, then commit the reply exactly once (or fail it, or hand it back)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis
from celery.exceptions import Reject
from pydantic import ValidationError

from shared.keys import check_id
from shared.messages import ChatMessage, Role
from shared.wire import MAX_PAYLOAD_BYTES, FinishReason, GenerateTask, Timings, TurnResult
from worker.engine.context import ContextError, fit
from worker.engine.engine import Failed, Finished, Token
from worker.runtime import Abandoned, Runtime
from worker.stream import STALE

log = logging.getLogger(__name__)


def _validation_message(e: ValidationError) -> str:
    err = e.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


def parse_payload(rt: Runtime, payload: Any) -> GenerateTask | None:
    """The task, or None after dead-lettering a payload that cannot be served."""
    size = len(json.dumps(payload, default=str))
    reason = None
    task = None
    if size > MAX_PAYLOAD_BYTES:
        reason = f"payload of {size} bytes exceeds {MAX_PAYLOAD_BYTES}"
    else:
        try:
            task = GenerateTask.model_validate(payload)
        except ValidationError as e:
            reason = f"invalid payload: {_validation_message(e)}"
    if task is not None and task.model != rt.model.name:
        reason = f"model {task.model!r} is not served by this worker ({rt.model.name})"
    if reason is None:
        return task
    log.error("dead-lettering turn: %s", reason)
    rt.turns.dead_letter(payload if size <= MAX_PAYLOAD_BYTES else "<oversized>", reason)
    tid, cid = (payload.get("turn_id"), payload.get("conversation_id")) if isinstance(payload, dict) else (None, None)
    try:
        rt.turns.fail(check_id(tid), check_id(cid), 0, reason)
    except (ValueError, TypeError):
        pass  # ids unusable: nothing in Redis to answer
    return None


def run_turn(rt: Runtime, payload: Any) -> dict[str, Any]:
    """Serve one delivery. Redis errors hand the turn back (redelivered, counted as an attempt);
    any other error fails the turn with the reason, so its caller always gets an answer."""
    try:
        return _serve(rt, payload)
    except Reject:
        raise
    except redis.RedisError:
        rt.counters.add("handed_back")
        log.exception("Redis error during a turn: handing it back")
        raise Reject("Redis error", requeue=True) from None
    except Exception as e:
        log.exception("turn failed")
        if isinstance(payload, dict):
            try:
                rt.turns.fail(
                    check_id(payload.get("turn_id")),
                    check_id(payload.get("conversation_id")),
                    0,
                    f"internal error: {e}",
                )
            except (ValueError, TypeError, redis.RedisError):
                pass
        return {"status": "failed", "error": str(e)}


def _serve(rt: Runtime, payload: Any) -> dict[str, Any]:
    t_pick = time.time()
    task = parse_payload(rt, payload)
    if task is None:
        return {"status": "dead-lettered"}
    if rt.abandoning:  # cold shutdown under way: hand it back before claiming it (no attempt used)
        raise Reject("worker shutting down", requeue=True)
    lease = rt.turns.begin(task.turn_id)
    if lease.status != "ok":
        if lease.status in ("missing", "poison"):
            why = "unknown turn (not created by a producer)" if lease.status == "missing" else "too many attempts"
            rt.turns.dead_letter(payload, why)
        log.info("turn %s: %s, skipped", task.turn_id, lease.status)
        return {"status": lease.status}
    try:
        task.sampling.check_vocab(rt.loaded.codec.vocab_size)
        prompt = fit(rt.loaded.codec, task.messages, rt.engine.max_len, task.sampling.output_length)
    except (ContextError, ValueError) as e:
        rt.turns.fail(task.turn_id, task.conversation_id, lease.attempt, str(e))
        rt.counters.add("finished")
        return {"status": "failed", "error": str(e)}
    deadline = min(task.deadline or float("inf"), time.time() + rt.settings.turn_timeout_s)
    try:
        handle = rt.submit(prompt.ids, task.sampling, prompt.max_new, deadline)
    except Abandoned as e:  # cold shutdown between begin and submit: the next attempt starts over
        rt.counters.add("handed_back")
        raise Reject(str(e), requeue=True) from None
    signals: list[int] = []

    def on_signal(code: int) -> None:
        signals.append(code)
        handle.cancel()

    rt.publisher.register(task.turn_id, lease.attempt, on_signal)
    try:
        for ev in handle:
            if isinstance(ev, Token):
                rt.publisher.append(task.turn_id, ev.text)
    finally:
        tail = rt.publisher.take(task.turn_id)
    if isinstance(ev, Failed):
        if ev.abandoned:  # cold shutdown: not acked, not failed; Redis hands it to another worker
            rt.counters.add("handed_back")
            raise Reject(ev.error, requeue=True)
        rt.turns.fail(task.turn_id, task.conversation_id, lease.attempt, ev.error)
        rt.counters.add("finished")
        return {"status": "failed", "error": ev.error}
    assert isinstance(ev, Finished)
    if STALE in signals:
        log.warning("turn %s: attempt %d was superseded, its reply is dropped", task.turn_id, lease.attempt)
        return {"status": "stale"}
    now = time.time()
    result = TurnResult(
        turn_id=task.turn_id,
        conversation_id=task.conversation_id,
        text=ev.text,
        finish_reason=ev.reason if not signals else FinishReason.cancelled,
        prompt_tokens=ev.prompt_tokens,
        completion_tokens=ev.completion_tokens,
        dropped_messages=prompt.dropped_messages,
        truncated_tokens=prompt.truncated_tokens,
        worker=rt.hostname,
        attempt=lease.attempt,
        timings=Timings(
            queued_s=max(0.0, t_pick - task.enqueued_at) if task.enqueued_at else 0.0,
            prefill_s=ev.prefill_s,
            decode_s=ev.decode_s,
            total_s=now - task.enqueued_at if task.enqueued_at else now - t_pick,
        ),
    )
    message = ChatMessage(role=Role.assistant, text=ev.text, turn_id=task.turn_id)
    code = rt.turns.commit(
        task.turn_id, task.conversation_id, lease.attempt, tail, message.model_dump_json(), result.model_dump_json()
    )
    rt.counters.add("finished")
    status = {1: "done", 0: "duplicate", -1: "stale"}[code]
    log.info(
        "turn %s: %s (%s, %d tokens, attempt %d)",
        task.turn_id,
        status,
        result.finish_reason.value,
        result.completion_tokens,
        lease.attempt,
    )
    return {"status": status, **({"result": result.model_dump(mode="json")} if code == 1 else {})}
