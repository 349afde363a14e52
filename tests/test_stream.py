"""worker/stream.py: coalesced deltas, first text at once, fencing by attempt, cancel signals, leases."""

import time

from shared.keys import Keys
from worker.stream import Signal, StreamPublisher


def running_turn(r, keys, tid, attempt=1):
    r.hset(keys.turn(tid), mapping={"status": "running", "attempt": attempt})
    r.zadd(keys.running, {tid: time.time() + 5})


def texts(r, keys, tid):
    return [e[1][b"t"].decode() for e in r.xrange(keys.stream(tid))]


def test_deltas_are_coalesced_per_interval(r):
    keys = Keys("t")
    running_turn(r, keys, "a")
    pub = StreamPublisher(r, keys, flush_ms=200).start()
    try:
        a = pub.register("a", 1, lambda code: None)
        pub.append(a, "first")  # the first text goes out at once
        time.sleep(0.05)
        assert texts(r, keys, "a") == ["first"]
        for ch in "abcdefghij":
            pub.append(a, ch)
        time.sleep(0.4)
        assert texts(r, keys, "a") == ["first", "abcdefghij"]  # ten tokens, one entry
        pub.append(a, "tail")
        assert [text for _, text in pub.take(a)] == ["tail"]  # the unflushed rest goes with the commit
    finally:
        pub.stop()


def test_one_round_trip_carries_every_turn(r):
    keys = Keys("t")
    pub = StreamPublisher(r, keys, flush_ms=10_000)
    attempts = []
    for i in range(5):
        running_turn(r, keys, f"t{i}")
        attempts.append(pub.register(f"t{i}", 1, lambda code: None))
        pub.append(attempts[-1], f"text {i}")
    pub.flush()
    assert pub.flushes == 1
    assert [texts(r, keys, f"t{i}") for i in range(5)] == [[f"text {i}"] for i in range(5)]


def test_stale_attempt_is_refused_and_cancel_is_reported(r):
    keys = Keys("t")
    running_turn(r, keys, "old", attempt=2)  # a newer attempt owns it
    running_turn(r, keys, "cut")
    r.hset(keys.turn("cut"), "cancel", 1)
    signals = {}
    pub = StreamPublisher(r, keys, flush_ms=10_000)
    old = pub.register("old", 1, lambda code: signals.setdefault("old", code))
    cut = pub.register("cut", 1, lambda code: signals.setdefault("cut", code))
    pub.append(old, "late text")
    pub.append(cut, "x")
    pub.flush()
    assert signals == {"old": Signal.stale, "cut": Signal.cancelled}
    assert texts(r, keys, "old") == []


def test_each_flush_renews_the_lease_of_the_attempt_it_carries(r):
    keys = Keys("t")
    running_turn(r, keys, "a")
    r.zadd(keys.running, {"a": 1.0})  # about to be taken for lost
    pub = StreamPublisher(r, keys, flush_ms=10_000, check_every_s=0, lease_s=7)
    pub.register("a", 1, lambda code: None)
    pub.flush()  # an idle attempt is still visited (every check_every_s) and its lease renewed
    assert r.zscore(keys.running, "a") > time.time() + 6
    running_turn(r, keys, "b", attempt=2)
    r.zadd(keys.running, {"b": 1.0})
    pub.register("b", 1, lambda code: None)  # a stale attempt renews nothing
    pub.flush()
    assert r.zscore(keys.running, "b") == 1.0


def test_the_flush_interval_grows_with_the_streams_a_worker_carries(r):
    keys = Keys("t")
    pub = StreamPublisher(r, keys, flush_ms=50)
    intervals = []
    for i in range(10):
        intervals.append(pub.interval())
        pub.register(f"t{i}", 1, lambda code: None)
    assert intervals[:3] == [0.05] * 3 and intervals[4] == 0.1 and intervals[8:] == [0.2, 0.2]
