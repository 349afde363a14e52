"""One delivery of a turn, start to finish, in named steps: claim it (BEGIN), fit the context (`_fit`),
relay the generation to its stream (`Relay`), then commit the reply exactly once (`_commit`), or fail
it, or hand it back.

The delivery was screened before Celery saw it (worker/deliveries.py), so its payload is a valid
GenerateTask for this worker's model; it is validated again here because a task can also be called
by other means (tests, a future Celery path), and such a payload is answered the same way.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable
from enum import Enum
from typing import Any

import redis
from celery.exceptions import Reject
from pydantic import ValidationError

from shared.codec import Codec
from shared.context import ContextError, FittedPrompt, fit_raw, fit_turn
from shared.messages import ChatMessage, Role
from shared.sampling import SamplingParams
from shared.wire import FinishReason, GenerateTask, Timings, TokenLogprob, TurnResult
from worker.celery_workarounds import refuse
from worker.deliveries import Refused, item_text, turn_id_or_none, validation_message
from worker.engine.engine import Failed, Finished, Handle
from worker.runtime import Abandoned, Counters, Runtime
from worker.stream import Signal, StreamPublisher
from worker.turn_store import Claim, Commit, HandBack, TurnStore

log = logging.getLogger(__name__)

COMMIT_RETRY_S = 60.0  # how long a finished reply waits for Redis to come back before it is given up


class Outcome(str, Enum):
    """What one delivery did (the task's return value, and its log line)."""

    done = "done"  # this delivery's reply was committed
    duplicate = "duplicate"  # another attempt committed first
    stale = "stale"  # another attempt took the turn over while this one ran
    failed = "failed"  # answered with an error (bad request for this model, generation failed)
    held = "held"  # another live delivery is generating this turn: nothing done
    finished = "finished"  # the turn had ended already: nothing done
    refused = "refused"  # not a valid turn: dead-lettered
    handed_back = "handed_back"  # cold shutdown: queued again for another worker


def run_turn(rt: Runtime, payload: Any) -> dict[str, Any]:
    """Serve one delivery; never raises except Reject (hand the delivery back untouched)."""
    try:
        outcome = _serve(rt, payload)
    except Reject:
        raise
    except redis.RedisError:
        # Redis is unreachable even after the client's retries. Whatever happened, the turn is safe: if it
        # began, its lease expires and the watchdog queues it again; if not, its delivery stays unacked.
        log.exception("Redis error during a turn: leaving it to the lease and the watchdog")
        rt.counters.turn_handed_back()
        return {"status": Outcome.handed_back.value}
    except Exception as e:  # a bug: answer the turn rather than leave it waiting
        log.exception("turn failed")
        tid = turn_id_or_none(payload.get("turn_id")) if isinstance(payload, dict) else None
        if tid is not None:
            try:
                rt.turns.fail(tid, 0, f"internal error: {type(e).__name__}")
            except redis.RedisError:
                pass
        return {"status": Outcome.failed.value}
    return {"status": outcome.value}


def _serve(rt: Runtime, payload: Any) -> Outcome:
    """The turn's steps: validate -> claim (BEGIN) -> fit -> relay (generate while streaming) -> commit."""
    t_pick = time.time()
    task = _validate(rt.turns, rt.model.name, payload)
    if task is None:
        return Outcome.refused
    if rt.abandoning:  # cold shutdown under way: hand the delivery back before claiming the turn
        raise Reject("worker shutting down", requeue=True)
    delivery = uuid.uuid4().hex  # this delivery's id: a retried BEGIN or COMMIT is recognised as its own
    with rt.engine.arriving(task.turn_id):  # until submit, a prefill about to start may wait for this prompt
        lease = rt.turns.begin(task.turn_id, delivery)
        if lease.status is not Claim.ok:
            return _not_claimed(rt.turns, task, lease.status)
        try:
            prompt = _fit(task, rt.loaded.codec, rt.engine.max_len)
        except (ContextError, ValueError) as e:
            rt.turns.fail(task.turn_id, lease.attempt, str(e))
            rt.counters.turn_finished()
            return Outcome.failed
        relay = Relay(rt.publisher, task.turn_id, lease.attempt)
        deadline = min(task.deadline or float("inf"), time.time() + rt.settings.turn_timeout_s)
        try:
            relay.start(rt.submit, prompt, task.sampling, deadline)
        except Abandoned:  # cold shutdown between begin and submit: the next attempt starts over
            relay.close()
            return _hand_back(rt.turns, rt.counters, task, lease.attempt)
        except ValueError as e:  # what only the engine can check (a grammar this tokenizer cannot build)
            relay.close()
            rt.turns.fail(task.turn_id, lease.attempt, str(e))
            rt.counters.turn_finished()
            return Outcome.failed
    ev, tail = relay.finish()
    if isinstance(ev, Failed):
        if ev.abandoned:  # cold shutdown: queued again, not failed
            return _hand_back(rt.turns, rt.counters, task, lease.attempt)
        rt.turns.fail(task.turn_id, lease.attempt, ev.error)
        rt.counters.turn_finished()
        return Outcome.failed
    if relay.stale:
        log.warning("turn %s: attempt %d was superseded, its reply is dropped", task.turn_id, lease.attempt)
        return Outcome.stale
    result = _result(task, lease.attempt, prompt, ev, relay.cancelled, rt.hostname, t_pick, rt.loaded.codec)
    message = ChatMessage(role=Role.assistant, text=ev.text, turn_id=task.turn_id)
    code = _commit(rt.turns, lambda: rt.abandoning, task, lease.attempt, delivery, tail, message.model_dump_json(),
                   result.model_dump_json())
    rt.counters.turn_finished()
    log.info("turn %s: %s (%s, %d tokens, attempt %d)", task.turn_id, code.name, result.finish_reason.value,
             result.completion_tokens, lease.attempt)
    return {Commit.done: Outcome.done, Commit.duplicate: Outcome.duplicate, Commit.stale: Outcome.stale}[code]


def _fit(task: GenerateTask, codec: Codec, max_len: int) -> FittedPrompt:
    """The turn's messages as the model's prompt within `max_len` positions, room left for its output
    length (shared/context.py). Raises ContextError or ValueError (top_k beyond the vocabulary) naming
    the field: the turn is failed with it."""
    task.sampling.check_vocab(codec.vocab_size)
    if task.raw:
        return fit_raw(codec, task.messages[-1].text, max_len, task.sampling.max_tokens)
    return fit_turn(codec, task.messages, max_len, task.sampling.max_tokens, truncate=task.truncate)


class Relay:
    """One attempt's generation, relayed to its stream: the engine thread hands each piece of text straight
    to the publisher (Engine.submit's on_text); the publisher's flushes say whether to stop (Signal)."""

    def __init__(self, publisher: StreamPublisher, turn_id: str, attempt: int):
        self.publisher = publisher
        self.signals: list[Signal] = []  # what flushes said: cancelled (finish with what there is), stale
        self._handle: Handle | None = None
        self._stream = publisher.register(turn_id, attempt, self._on_signal)

    def _on_signal(self, sig: Signal) -> None:  # the flusher's thread: stop generating at the next step
        self.signals.append(sig)
        if self._handle is not None:
            self._handle.cancel()

    def start(self, submit: Callable[..., Handle], prompt: FittedPrompt, sampling: SamplingParams,
              deadline: float) -> None:
        """Submit the prompt (Runtime.submit: raises Abandoned during a cold shutdown)."""
        self._handle = submit(prompt.ids, sampling, prompt.max_new, deadline,
                              functools.partial(self.publisher.append, self._stream))
        if self.signals:  # told to stop before the handle existed
            self._handle.cancel()

    def finish(self) -> tuple[Finished | Failed, list[tuple[int, str]]]:
        """Wait for the generation's last event; returns it with the stream's unflushed tail (for COMMIT)."""
        assert self._handle is not None
        try:
            *_, ev = self._handle  # Finished or Failed (the text went to the publisher)
        finally:
            tail = self.close()
        assert isinstance(ev, (Finished, Failed))
        return ev, tail

    def close(self) -> list[tuple[int, str]]:
        """Unregister from the publisher; returns what it has not surely flushed."""
        return self.publisher.take(self._stream)

    @property
    def stale(self) -> bool:
        return Signal.stale in self.signals

    @property
    def cancelled(self) -> bool:
        return bool(self.signals)


def _result(task: GenerateTask, attempt: int, prompt: FittedPrompt, ev: Finished, cancelled: bool, worker: str,
            t_pick: float, codec: Codec) -> TurnResult:
    """The committed result of a finished generation (times in seconds, Unix clock; log probabilities with each
    token's text, decoded alone)."""
    now = time.time()
    logprobs = None
    if ev.logprobs is not None:
        logprobs = [TokenLogprob(token=codec.decode([t]), logprob=lp.logprob,
                                 top=[(codec.decode([i]), v) for i, v in lp.top])
                    for t, lp in zip(ev.token_ids, ev.logprobs)]
    return TurnResult(
        turn_id=task.turn_id,
        conversation_id=task.conversation_id,
        text=ev.text,
        finish_reason=ev.reason if not cancelled else FinishReason.cancelled,
        prompt_tokens=ev.prompt_tokens,
        completion_tokens=ev.completion_tokens,
        cached_tokens=ev.cached_tokens,
        dropped_messages=task.dropped_messages + prompt.dropped_messages,
        truncated_tokens=prompt.truncated_tokens,
        worker=worker,
        attempt=attempt,
        timings=Timings(
            queued_s=max(0.0, t_pick - task.enqueued_at) if task.enqueued_at else 0.0,
            prefill_s=ev.prefill_s,
            decode_s=ev.decode_s,
            total_s=now - task.enqueued_at if task.enqueued_at else now - t_pick,
        ),
        logprobs=logprobs,
    )


def _validate(turns: TurnStore, model: str, payload: Any) -> GenerateTask | None:
    """The payload as a GenerateTask for this worker's `model`, or None after refusing it."""
    try:
        task = GenerateTask.model_validate(payload)
    except ValidationError as e:
        tid = turn_id_or_none(payload.get("turn_id")) if isinstance(payload, dict) else None
        refuse(turns, Refused(f"invalid payload: {validation_message(e)}", (tid,) if tid else (),
                           item_text(str(payload).encode())))
        return None
    if task.model != model:
        refuse(turns, Refused(f"model {task.model!r} is not served by this worker ({model})",
                           (task.turn_id,), item_text(task.model_dump_json().encode())))
        return None
    return task


def _not_claimed(turns: TurnStore, task: GenerateTask, status: Claim) -> Outcome:
    """What a delivery BEGIN did not give the turn to does."""
    if status is Claim.missing:
        refuse(turns, Refused("unknown turn (not created by a producer)", (),
                           item_text(task.model_dump_json().encode())))
        return Outcome.refused
    if status is Claim.poison:
        turns.dead_letter(task.model_dump(mode="json"), "too many attempts")
        return Outcome.failed
    log.info("turn %s: %s, skipped", task.turn_id, status.value)
    return Outcome.held if status is Claim.held else Outcome.finished


def _commit(turns: TurnStore, abandoning: Callable[[], bool], task: GenerateTask, attempt: int, delivery: str,
            tail: list[tuple[int, str]], message_json: str, result_json: str) -> Commit:
    """COMMIT, retried while Redis is away (up to COMMIT_RETRY_S, or until `abandoning()` says a cold shutdown
    began): the reply is in memory, and committing it late beats generating it again. The script is safe to
    run twice (see turn_store.py)."""
    end, wait = time.monotonic() + COMMIT_RETRY_S, 0.25
    while True:
        try:
            return turns.commit(task.turn_id, attempt, delivery, tail, message_json, result_json)
        except redis.RedisError as e:
            if time.monotonic() + wait > end or abandoning():
                raise
            log.warning("turn %s: commit failed (%s), retrying in %.1fs", task.turn_id, e, wait)
            time.sleep(wait)
            wait = min(5.0, wait * 2)


def _hand_back(turns: TurnStore, counters: Counters, task: GenerateTask, attempt: int) -> Outcome:
    """Cold shutdown: queue the turn again from its kept message (not an attempt lost: no poison count)."""
    code = turns.hand_back(task.turn_id, attempt)
    if code is HandBack.no_message:  # a turn stored before messages were kept: let kombu put this delivery back
        counters.turn_handed_back()
        raise Reject("worker shutting down", requeue=True)
    if code is HandBack.queued:
        counters.turn_handed_back()
        log.info("turn %s: handed back (attempt %d)", task.turn_id, attempt)
        return Outcome.handed_back
    return Outcome.stale
