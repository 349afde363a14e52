"""Cache-aware routing (producer/routing.py, producer/store.py START, worker/own_queue.py): a conversation's
turns go to the own queue of the worker holding its KV cache while it is live and not overloaded, else to the
shared queue; nothing waits on a dead worker's queue; every requeue goes home. Lua-level tests on real Redis
(fake workers: liveness entries), then three real worker processes with a SIGKILL and a SIGTERM."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from config.celery import queue_name, worker_queue
from producer.client import ChatClient, StartedTurn, TurnRequest
from producer.routing import opening, rendezvous
from shared.cards import WorkerReport
from shared.keys import Keys
from shared.messages import ChatMessage, Role
from shared.sampling import SamplingParams
from shared.wire import FinishReason, TurnResult, TurnStatus
from tests.conftest import tiny_settings
from tests.procs import WorkerProcess
from worker.own_queue import Handed, OwnQueues
from worker.presence import Presence
from worker.turn_store import Commit, HandBack, TurnStore

KEYS = Keys("chat")
MODEL = "tiny-neox"
SHARED = "chat.tiny-neox"


def own(name: str) -> str:
    return f"{SHARED}.w.{name}"


@pytest.fixture
def client(r: redis.Redis, redis_url: str):
    c = ChatClient(tiny_settings(redis_url), r=r)
    c.catalog.ttl_s = 0  # the producer sees liveness changes at once (its guess only picks the announcement)
    yield c


def live(r: redis.Redis, *names: str, own_queue: bool = True) -> None:
    """Workers reporting as a real one does (its report and its liveness entry); `own_queue=False`: as a
    worker from before cache-aware routing reports (it consumes the shared queue only)."""
    for n in names:
        rep = WorkerReport(name=n, model=MODEL, sequence_length=256, slots=4, own_queue=own_queue)
        Presence(r, KEYS, rep).heartbeat(0)


def dead(r: redis.Redis, name: str) -> None:
    """What time does to a worker that stopped heartbeating: its entry expired, its report gone."""
    r.zadd(KEYS.live(MODEL), {name: time.time() - 1})
    r.delete(KEYS.worker(name))


def fields(r: redis.Redis, turn: StartedTurn) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(KEYS.turn(turn.turn_id)).items() if k != b"message"}


def message(r: redis.Redis, turn: StartedTurn) -> bytes:
    return r.hget(KEYS.turn(turn.turn_id), "message")


def answer(r: redis.Redis, turn: StartedTurn, worker: str) -> None:
    """`worker` pops the turn from the queue it is on, begins and commits it (as a real worker would)."""
    assert r.lrem(fields(r, turn)["queue"], 1, message(r, turn)) == 1
    ts = TurnStore(r, KEYS, worker=worker)
    lease = ts.begin(turn.turn_id, f"d-{turn.turn_id}")
    msg = ChatMessage(role=Role.assistant, text="ok", turn_id=turn.turn_id)
    res = TurnResult(turn_id=turn.turn_id, conversation_id=turn.conversation_id, text="ok",
                     finish_reason=FinishReason.end_key, prompt_tokens=1, completion_tokens=1, attempt=lease.attempt)
    assert ts.commit(turn.turn_id, lease.attempt, f"d-{turn.turn_id}", [], msg.model_dump_json(),
                     res.model_dump_json()) is Commit.done


def conversation_of(client: ChatClient, worker: str) -> str:
    """A conversation whose last turn `worker` answered."""
    cid = client.create_conversation(MODEL)
    client.r.hset(KEYS.conv(cid), "worker", worker)
    return cid


# -- START: where a turn goes ---------------------------------------------------------------------------------


def test_a_conversations_next_turn_goes_to_the_worker_that_answered_its_last_turn(r, client):
    live(r, "w1", "w2")
    cid = client.create_conversation(MODEL)
    answer(r, client.send(cid, "hello"), "w2")
    assert r.hget(KEYS.conv(cid), "worker") == b"w2"  # COMMIT recorded who holds the KV cache now
    turn = client.send(cid, "and then?")
    assert (turn.queue, turn.position) == (own("w2"), 1)
    assert r.lrange(own("w2"), 0, -1) == [message(r, turn)] and r.llen(SHARED) == 0
    f = fields(r, turn)
    assert (f["queue"], f["home"]) == (own("w2"), SHARED)
    assert b"w2" in r.smembers(KEYS.routed(MODEL))  # the watchdogs know its queue may hold turns
    # The kept message's routing key is the shared queue: kombu's own restore of it goes there.
    assert json.loads(message(r, turn))["properties"]["delivery_info"]["routing_key"] == SHARED


def test_a_worker_whose_own_queue_holds_the_backlog_limit_gets_no_more(r, client):
    live(r, "w1", "w2")
    turns = [client.send(conversation_of(client, "w2"), "hi") for _ in range(6)]
    assert [t.queue for t in turns] == [own("w2")] * 4 + [SHARED] * 2  # CHAT_ROUTE_MAX_BACKLOG = 4
    assert [t.position for t in turns] == [1, 2, 3, 4, 1, 2]  # the position on the queue it went to
    assert r.llen(own("w2")) == 4 and r.llen(SHARED) == 2


def test_a_dead_last_worker_means_the_shared_queue(r, client):
    live(r, "w1", "w2")
    cid = conversation_of(client, "w2")
    dead(r, "w2")  # its liveness entry is still there, expired: START reads Redis' clock
    turn = client.send(cid, "hi")
    assert turn.queue == SHARED and fields(r, turn)["queue"] == SHARED
    assert r.llen(own("w2")) == 0 and not r.exists(KEYS.routed(MODEL))


def test_routing_shared_always_uses_the_shared_queue(r, redis_url):
    client = ChatClient(tiny_settings(redis_url, routing="shared"), r=r)
    live(r, "w1", "w2")
    turns = [client.send(conversation_of(client, "w2"), "hi"),
             client.start_turn(TurnRequest("hi", model=MODEL))]
    assert [t.queue for t in turns] == [SHARED, SHARED] and r.llen(SHARED) == 2
    assert not r.keys(f"{SHARED}.w.*") and not r.exists(KEYS.routed(MODEL))


def test_a_new_conversation_goes_to_the_rendezvous_pick_of_its_opening(r, client):
    names = ["w1", "w2", "w3"]
    live(r, *names)
    picked = set()
    for i in range(12):
        system, text = f"system {i % 2}", f"first message {i}"
        expected = rendezvous(opening(system, [ChatMessage(role=Role.prompter, text=text)]), names)
        picked.add(expected)
        cid = client.create_conversation(MODEL, system=system)
        assert client.send(cid, text).queue == own(expected)
        # A stateless request resending that conversation (/v1) starts with the same opening: the same worker.
        resend = client.start_turn(TurnRequest(
            "the third message", model=MODEL, system=system,
            history=(ChatMessage(role=Role.prompter, text=text), ChatMessage(role=Role.assistant, text="a reply"))))
        assert resend.queue == own(expected)
        r.delete(*(own(n) for n in names))  # keep every own queue under the backlog limit
    assert len(picked) > 1  # openings spread over the workers


# -- handing a dead worker's queue home ------------------------------------------------------------------------


def test_the_sweep_moves_a_dead_workers_queue_once_in_order_and_leaves_a_live_ones(r, client):
    live(r, "w1", "w2")
    waiting = ChatClient(tiny_settings(client.settings.redis_url, routing="shared"), r=r).start_turn(
        TurnRequest("already on the shared queue", model=MODEL))
    on_w2 = [client.send(conversation_of(client, "w2"), f"to w2 {i}") for i in range(3)]
    on_w1 = [client.send(conversation_of(client, "w1"), f"to w1 {i}") for i in range(2)]
    assert {t.queue for t in on_w2} == {own("w2")} and {t.queue for t in on_w1} == {own("w1")}
    w1_before = r.lrange(own("w1"), 0, -1)
    sweeper = OwnQueues(r, client.settings, MODEL)
    assert sweeper.sweep() == {}  # both live: nothing moves
    dead(r, "w2")
    assert sweeper.sweep() == {"w2": Handed(3, whole=True)}
    served = [r.rpop(SHARED) for _ in range(4)]  # the served end: w2's turns first, in the order sent
    assert served == [message(r, t) for t in on_w2] + [message(r, waiting)]
    assert all(fields(r, t)["queue"] == SHARED for t in on_w2)  # positions are read on the right queue
    assert not r.exists(own("w2")) and r.smembers(KEYS.routed(MODEL)) == {b"w1"}
    assert r.lrange(own("w1"), 0, -1) == w1_before and all(fields(r, t)["queue"] == own("w1") for t in on_w1)
    assert sweeper.sweep() == {}  # once


def test_concurrent_hand_homes_move_each_turn_exactly_once(r, client):
    live(r, "w3")
    sent = [client.send(conversation_of(client, "w3"), f"turn {i}") for i in range(4)]
    # More than the backlog limit, as a queue grows while its worker is busy: pushed the way START pushes.
    for t in sent:
        r.lrem(own("w3"), 1, message(r, t))
    for t in sent * 10:
        r.lpush(own("w3"), message(r, t))
    expected = r.lrange(own("w3"), 0, -1)[::-1]  # the order it would have been served in
    dead(r, "w3")
    sweepers = [OwnQueues(redis.Redis.from_url(client.settings.redis_url), client.settings, MODEL) for _ in range(8)]
    barrier = threading.Barrier(len(sweepers))

    def run(s: OwnQueues) -> int:
        barrier.wait()
        return s.hand_home("w3").moved

    with ThreadPoolExecutor(len(sweepers)) as pool:
        moved = list(pool.map(run, sweepers))
    assert sorted(moved) == [0] * 7 + [40]
    assert r.lrange(SHARED, 0, -1)[::-1] == expected and not r.exists(own("w3"))


def test_a_stopping_worker_hands_its_own_queue_home_while_still_live(r, client):
    live(r, "w1")
    turn = client.send(conversation_of(client, "w1"), "hi")
    bindings = [f"_kombu.binding.{own('w1')}", f"_kombu.binding_permanent.{own('w1')}"]  # as kombu declares it
    for key in bindings:
        r.sadd(key, f"{own('w1')}\x06\x16\x06\x16{own('w1')}")
    sweeper = OwnQueues(r, client.settings, MODEL)
    assert sweeper.hand_home("w1") == Handed(0, whole=False) and r.llen(own("w1")) == 1  # live: its own
    assert sweeper.hand_home("w1", force=True) == Handed(1, whole=True)
    assert r.lrange(SHARED, 0, -1) == [message(r, turn)] and fields(r, turn)["queue"] == SHARED
    assert not r.exists(KEYS.routed(MODEL), *bindings)  # nor kombu's leftovers of the queue


def test_turns_waiting_too_long_on_a_live_workers_queue_move_oldest_first(r, client):
    live(r, "w1")
    turns = [client.send(conversation_of(client, "w1"), f"turn {i}") for i in range(4)]
    copy = message(r, turns[1])
    assert client.cancel(turns[1].turn_id) == "cancelled"  # ended meanwhile ...
    r.rpush(own("w1"), copy)  # ... but a copy of it is still at the served end (it is skipped wherever it goes)
    now = time.time()
    r.zadd(KEYS.queued, {turns[0].turn_id: now - 30, turns[2].turn_id: now - 11, turns[3].turn_id: now - 1},
           xx=True)  # queued 30 s, 11 s and 1 s ago; CHAT_ROUTE_MAX_WAIT_S is 10
    assert OwnQueues(r, client.settings, MODEL).sweep() == {"w1": Handed(3, whole=False)}
    # The copy, then turn 0, then turn 2 are served next from the shared queue; turn 3 stays with its worker.
    assert r.lrange(SHARED, 0, -1) == [message(r, turns[2]), message(r, turns[0]), copy]
    assert r.lrange(own("w1"), 0, -1) == [message(r, turns[3])] and b"w1" in r.smembers(KEYS.routed(MODEL))
    assert fields(r, turns[0])["queue"] == fields(r, turns[2])["queue"] == SHARED
    assert fields(r, turns[3])["queue"] == own("w1")


# -- requeues go home --------------------------------------------------------------------------------------------


def test_hand_back_and_an_expired_lease_requeue_onto_the_shared_queue(r, client):
    live(r, "w1")
    ts = TurnStore(r, KEYS, worker="w1")
    handed, expired = (client.send(conversation_of(client, "w1"), t) for t in ("a", "b"))
    for t in (handed, expired):
        assert r.lrem(own("w1"), 1, message(r, t)) == 1  # w1 took both
        ts.begin(t.turn_id, f"d-{t.turn_id}")
    assert ts.hand_back(handed.turn_id, 1) is HandBack.queued  # a cold shutdown
    r.zadd(KEYS.running, {expired.turn_id: 1.0}, xx=True)  # w1 died: its lease ran out
    assert ts.rescue_expired() == [expired.turn_id]
    assert r.lrange(SHARED, 0, -1) == [message(r, handed), message(r, expired)] and not r.exists(own("w1"))
    assert fields(r, handed)["queue"] == fields(r, expired)["queue"] == SHARED


def test_a_turn_stored_before_home_existed_requeues_onto_its_queue(r, client):
    live(r, "w1")
    turn = client.send(conversation_of(client, "w1"), "old")
    r.hdel(KEYS.turn(turn.turn_id), "home")
    r.hset(KEYS.turn(turn.turn_id), "queue", SHARED)
    r.delete(own("w1"))
    ts = TurnStore(r, KEYS, worker="w1")
    ts.begin(turn.turn_id, "d1")
    assert ts.hand_back(turn.turn_id, 1) is HandBack.queued
    assert r.lrange(SHARED, 0, -1) == [message(r, turn)]


def test_a_lost_message_is_queued_again_at_home_and_one_kombu_restored_there_is_not_lost(r, client):
    live(r, "w1")
    lost, restored = (client.send(conversation_of(client, "w1"), t) for t in ("lost", "restored"))
    r.delete(own("w1"))  # w1 popped both and died before kombu recorded them ...
    r.rpush(SHARED, message(r, restored))  # ... except one, which kombu restored by its routing key: home
    r.zadd(KEYS.queued, {lost.turn_id: time.time() - 60, restored.turn_id: time.time() - 60})
    ts = TurnStore(r, KEYS, worker="w2")
    assert ts.requeue_lost("unacked", "unacked_index", min_age_s=30) == [lost.turn_id]
    assert r.lrange(SHARED, 0, -1) == [message(r, restored), message(r, lost)]
    assert fields(r, lost)["queue"] == SHARED and fields(r, restored)["lost"] == "0"


def test_cancel_takes_a_turn_off_the_workers_own_queue(r, client):
    live(r, "w1")
    turn = client.send(conversation_of(client, "w1"), "never mind")
    assert client.cancel(turn.turn_id) == "cancelled"
    assert r.llen(own("w1")) == 0 and client.store.turn(turn.turn_id).status is TurnStatus.done


def test_the_apis_queue_depth_counts_the_shared_queue_and_the_workers_own(r, redis_url, client):
    from producer.api.config import load_api_settings
    from producer.api.metrics import Metrics
    from producer.api.service import ChatService

    live(r, "w1", "w2")
    routed = [client.send(conversation_of(client, w), "hi") for w in ("w1", "w1", "w2")]
    ChatClient(tiny_settings(redis_url, routing="shared"), r=r).start_turn(TurnRequest("hi", model=MODEL))
    assert [t.queue for t in routed] == [own("w1"), own("w1"), own("w2")] and r.llen(SHARED) == 1
    svc = ChatService(load_api_settings(redis_url=redis_url), Metrics())
    assert svc.queue_depth(MODEL) == 4  # /v1/models and /metrics: every turn of the model still waiting
    svc.client.close()


# -- naming and the rendezvous choice -----------------------------------------------------------------------------


def test_a_worker_consumes_the_shared_queue_and_its_own_under_its_celery_name(redis_url):
    from worker.app import worker_options

    settings = tiny_settings(redis_url)
    opts = worker_options(settings, "k1")
    assert opts["hostname"] == "celery@k1"  # as Celery completes it: the name in its liveness report
    assert opts["queues"] == [queue_name(settings, MODEL), worker_queue(settings, MODEL, "celery@k1")]
    assert worker_queue(settings, MODEL, "celery@k1") == own("celery@k1")


def test_rendezvous_is_stable_spreads_and_moves_only_a_removed_workers_keys():
    workers = ["celery@a", "celery@b", "celery@c", "celery@d"]
    keys = [f"system\x00opening {i}" for i in range(2000)]
    picks = {k: rendezvous(k, workers) for k in keys}
    assert picks == {k: rendezvous(k, list(reversed(workers))) for k in keys}  # order of the live list: no matter
    counts = {w: sum(p == w for p in picks.values()) for w in workers}
    assert all(350 < n < 650 for n in counts.values()), counts  # about a quarter each
    without_c = {k: rendezvous(k, [w for w in workers if w != "celery@c"]) for k in keys}
    moved = {k for k in keys if without_c[k] != picks[k]}
    assert moved == {k for k in keys if picks[k] == "celery@c"}  # only the removed worker's keys move
    with_e = {k: rendezvous(k, [*workers, "celery@e"]) for k in keys}
    assert all(with_e[k] in (picks[k], "celery@e") for k in keys)  # a new worker takes keys, nobody else does
    assert rendezvous("x", []) is None
    assert opening("s", [ChatMessage(role=Role.prompter, text="first"), ChatMessage(role=Role.assistant, text="r"),
                         ChatMessage(role=Role.prompter, text="second")]) == "s\x00first"


# -- real workers ----------------------------------------------------------------------------------------------------

QUICK = SamplingParams(temperature=0.0, max_tokens=6)
LONG = SamplingParams(temperature=1.0, top_k=2, max_tokens=600, ignore_eos=True)  # ~1 s on tiny-neox
MEDIUM = SamplingParams(temperature=1.0, top_k=2, max_tokens=400, ignore_eos=True)
# No max wait on a live worker's queue: what leaves a killed worker's queue here leaves it because its liveness
# expired (the max wait is tested above).
ENV = {"CHAT_SEQUENCE_LENGTH": "1024", "CHAT_LEASE_S": "3", "CHAT_LOST_AFTER_S": "5", "CHAT_TURN_TIMEOUT_S": "60",
       "CHAT_SHUTDOWN_GRACE_S": "20", "CHAT_ROUTE_MAX_WAIT_S": "0"}


def wait_until(check, timeout: float, what: str) -> None:  # noqa: ANN001 - a predicate
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, what
        time.sleep(0.05)


def replies(client: ChatClient, cid: str) -> list[str | None]:
    msgs = client.store.messages(cid)
    assert [m.role for m in msgs] == [Role.prompter, Role.assistant] * (len(msgs) // 2), msgs  # no duplicates
    return [m.turn_id for m in msgs if m.role is Role.assistant]


@pytest.mark.slow
def test_three_workers_keep_each_conversation_and_a_killed_workers_turns_finish_once_elsewhere(
        r: redis.Redis, redis_url: str, tmp_path: Path):
    t_start = time.monotonic()
    ws = {n: WorkerProcess(redis_url, n, tmp_path, **ENV) for n in ("r1", "r2", "r3")}
    try:
        for w in ws.values():
            w.wait_ready(90)
        ready_s = time.monotonic() - t_start
        # The backlog limit is raised for this client: 10 conversations a worker wait on 4 slots, and this part
        # is about affinity (the limit's fallback is tested above).
        client = ChatClient(tiny_settings(redis_url, sequence_length=1024, route_max_backlog=50))
        names = {f"celery@{n}" for n in ws}
        wait_until(lambda: {w.name for w in client.catalog.info(MODEL, fresh=True).workers} == names, 30, "live")
        cids = [client.create_conversation(MODEL, system=f"conversation {i}") for i in range(30)]
        sent: dict[str, list[str]] = {c: [] for c in cids}
        served: dict[str, list[str]] = {c: [] for c in cids}

        def converse(cid: str, n: int, sampling: SamplingParams = QUICK) -> None:
            for _ in range(n):
                turn = client.send(cid, f"turn {len(sent[cid])}", sampling)
                sent[cid].append(turn.turn_id)
                served[cid].append(client.wait(turn.turn_id, timeout=120).worker)

        t0 = time.monotonic()
        with ThreadPoolExecutor(len(cids)) as pool:
            list(pool.map(lambda c: converse(c, 5), cids))
        affinity_s = time.monotonic() - t0
        for c in cids:
            assert replies(client, c) == sent[c] and len(set(served[c])) == 1, served[c]  # one worker each
        by_worker = {w: [c for c in cids if served[c][0] == w] for w in names}
        assert all(by_worker.values()), {w: len(cs) for w, cs in by_worker.items()}  # spread over all three

        # SIGKILL the busiest worker while turns run on it and wait on its own queue; new conversations whose
        # opening picks it are routed to its queue after its death, until its liveness expires.
        victim = max(names, key=lambda w: len(by_worker[w]))
        proc = ws[victim.split("@")[1]]
        mine = by_worker[victim]
        threads = [threading.Thread(target=converse, args=(c, 1, LONG)) for c in mine]
        for th in threads:
            th.start()
        wait_until(lambda: r.llen(own(victim)) >= 2 and len(r.hkeys("unacked")) >= 2, 30, "busy victim")
        proc.proc.kill()
        proc.wait(10)
        killed = time.monotonic()
        late: list[StartedTurn] = []
        for i in range(200):
            if len(late) == 3:
                break
            system = f"late {i}"
            if rendezvous(opening(system, [ChatMessage(role=Role.prompter, text="hi")]), names) == victim:
                late.append(client.start_turn(TurnRequest("hi", QUICK, model=MODEL, system=system)))
        assert [t.queue for t in late] == [own(victim)] * 3  # still live as far as Redis knows
        # Whatever the victim had popped but not acked is restored by kombu to the routing key: the shared queue.
        restorable = r.hvals("unacked")
        assert len(restorable) >= 2 and all(json.loads(v)[2] == SHARED for v in restorable)
        for th in threads:
            th.join(90)
        results = [client.wait(t.turn_id, timeout=90) for t in late]
        recovered_s = time.monotonic() - killed
        assert not any(th.is_alive() for th in threads)
        for c in mine:
            assert replies(client, c) == sent[c] and served[c][-1] != victim  # once, elsewhere
        assert all(res.worker != victim for res in results)
        for t in late:
            assert replies(client, t.conversation_id) == [t.turn_id]
        assert not r.exists(own(victim)) and victim.encode() not in r.smembers(KEYS.routed(MODEL))
        assert not r.keys(f"_kombu.binding*{own(victim)}")  # nor kombu's bindings of it
        assert not r.zcard(KEYS.running) and not r.zcard(KEYS.queued) and r.llen("chat:dead") == 0

        # SIGTERM a second worker while its slots are busy and turns wait on its own queue: it hands them home as
        # it stops, without waiting for its liveness to expire; the last worker answers them, while the turns in
        # flight finish where they are (warm shutdown).
        stopping = max((w for w in names if w != victim), key=lambda w: sum(served[c][-1] == w for c in cids))
        third = next(w for w in names if w not in (victim, stopping))
        theirs = [c for c in cids if served[c][-1] == stopping]
        busy, waiting = theirs[:4], theirs[4:]  # 4 slots
        assert len(waiting) >= 2, len(theirs)
        before = {c: len(sent[c]) for c in busy}
        threads = [threading.Thread(target=converse, args=(c, 1, MEDIUM)) for c in busy]
        for th in threads:
            th.start()
        wait_until(lambda: all(len(sent[c]) > before[c] and r.hget(KEYS.turn(sent[c][-1]), "status") == b"running"
                               for c in busy), 30, "the stopping worker's slots busy")
        threads += [threading.Thread(target=converse, args=(c, 1, QUICK)) for c in waiting]
        for th in threads[len(busy):]:
            th.start()
        wait_until(lambda: r.llen(own(stopping)) == len(waiting), 30, "turns waiting on the stopping worker")
        ws[stopping.split("@")[1]].signal(signal.SIGTERM)
        wait_until(lambda: not r.exists(own(stopping)), 5, "handed home at once")
        for th in threads:
            th.join(90)
        assert ws[stopping.split("@")[1]].wait(40) == 0
        for c in theirs:
            assert replies(client, c) == sent[c]
        assert [served[c][-1] for c in busy] == [stopping] * 4 and [served[c][-1] for c in waiting] == [third] * len(
            waiting)
        assert not r.exists(own(stopping)) and r.smembers(KEYS.routed(MODEL)) <= {third.encode()}
        assert not r.keys(f"_kombu.binding*{own(stopping)}") and r.keys(f"_kombu.binding*{own(third)}")
        print(f"\nrouting: workers ready in {ready_s:.1f}s; 150 turns in {affinity_s:.1f}s, each conversation on "
              f"one worker ({', '.join(str(len(v)) for v in by_worker.values())} conversations a worker); SIGKILL "
              f"of {victim}: its {len(mine)} turns and {len(late)} routed after its death done {recovered_s:.1f}s "
              f"later; SIGTERM of {stopping}: its {len(waiting)} waiting turns answered by {third}")
        client.close()
    finally:
        for w in ws.values():
            w.stop()


# -- bad input a bad-input review found: older workers, keys of another type, names that are not names ------


def test_a_worker_from_before_routing_is_never_the_rendezvous_pick(r, client):
    """Producers upgraded before their workers: an older worker consumes the shared queue only, so a turn
    routed to its own queue would wait there for nobody."""
    live(r, "old", own_queue=False)
    turns = [client.start_turn(TurnRequest(f"opening {i}", model=MODEL)) for i in range(8)]
    assert {t.queue for t in turns} == {SHARED} and not r.exists(own("old"))
    live(r, "new")
    assert {client.start_turn(TurnRequest(f"opening {i}", model=MODEL)).queue for i in range(4)} == {own("new")}


@pytest.mark.parametrize("key", ["own queue", "routed set"])
def test_a_key_of_another_type_sends_the_turn_to_the_shared_queue_and_stores_it_whole(r, client, key):
    live(r, "w1")
    cid = conversation_of(client, "w1")
    r.set(own("w1") if key == "own queue" else KEYS.routed(MODEL), "not ours")
    turn = client.send(cid, "hi")
    assert turn.queue == SHARED and r.lrange(SHARED, 0, -1) == [message(r, turn)]
    assert [m.text for m in client.store.messages(cid)] == ["hi"]


def test_the_sweep_repairs_what_it_cannot_read_and_goes_on_with_the_others(r, client, caplog):
    live(r, "w1", "w2")
    turns = [client.send(conversation_of(client, w), "hi") for w in ("w1", "w2")]
    dead(r, "w1")
    dead(r, "w2")
    r.sadd(KEYS.routed(MODEL), b"\xff-not-a-name")
    r.delete(own("w1"))
    r.set(own("w1"), "not a list")  # w1's queue replaced by another type: deleted, w2's still handed home
    moved = OwnQueues(r, tiny_settings(client.settings.redis_url), MODEL).sweep()
    assert moved == {"w2": Handed(1, True)}
    assert r.lrange(SHARED, 0, -1) == [message(r, turns[1])] and not r.exists(own("w1"))
    assert b"\xff-not-a-name" not in r.smembers(KEYS.routed(MODEL))
    assert "not a list: deleted" in caplog.text and "not a worker name: removed" in caplog.text


def test_a_routed_set_of_another_type_is_rebuilt_from_the_own_queues_found(r, client):
    live(r, "w1")
    turn = client.send(conversation_of(client, "w1"), "hi")
    dead(r, "w1")
    r.delete(KEYS.routed(MODEL))
    r.set(KEYS.routed(MODEL), "not a set")
    assert OwnQueues(r, tiny_settings(client.settings.redis_url), MODEL).sweep() == {"w1": Handed(1, True)}
    assert r.lrange(SHARED, 0, -1) == [message(r, turn)]


def test_the_watchdog_survives_a_sweep_that_raises(r, client):
    """It is every worker's only rescuer of lost turns: an error it did not foresee is logged, not fatal."""
    from worker.watchdog import Watchdog

    calls = []

    class Broken(OwnQueues):
        def sweep(self):
            calls.append(time.monotonic())
            raise ValueError("unforeseen")

    dog = Watchdog(TurnStore(r, KEYS, worker="w"), lease_s=2, lost_after_s=30,
                   own_queues=Broken(r, tiny_settings(client.settings.redis_url), MODEL)).start()
    try:
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(calls) >= 3 and dog._thread is not None and dog._thread.is_alive()
    finally:
        dog.stop()
