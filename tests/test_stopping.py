"""worker/engine/stopping.py: each stop condition of a sequence, and which one wins."""

from __future__ import annotations

from shared.wire import FinishReason
from worker.engine.detok import Detokenizer
from worker.engine.stopping import StoppingCriteria


def test_by_token_an_end_id_ends_before_length_and_length_at_max_new():
    sc = StoppingCriteria(frozenset({0, 2}), max_new=3)
    assert [sc.on_token(t, n) for t, n in [(5, 1), (6, 2)]] == [None, None]
    assert sc.on_token(2, 3) is FinishReason.end_key  # the end id wins on the last allowed token too
    assert sc.on_token(7, 3) is FinishReason.length
    ignoring = StoppingCriteria(frozenset(), max_new=3)  # ignore_eos: end ids are plain tokens
    assert ignoring.on_token(0, 1) is None and ignoring.on_token(0, 3) is FinishReason.length


def test_by_text_a_completed_stop_string():
    detok = Detokenizer(lambda ids: "".join(chr(ord("a") + i) for i in ids), ["cd"])
    for t in (0, 1, 2):
        detok.push(t)
        assert StoppingCriteria.on_text(detok) is None  # "abc": a stop string may still begin
    detok.push(3)
    assert StoppingCriteria.on_text(detok) is FinishReason.stop


def test_by_clock_cancel_and_deadline():
    sc = StoppingCriteria(frozenset(), max_new=10, deadline=100.0)
    assert sc.on_clock(99.9) is None
    assert sc.on_clock(100.1) is FinishReason.cancelled
    sc = StoppingCriteria(frozenset(), max_new=10)
    assert sc.on_clock(1e12) is None
    sc.cancelled = True
    assert sc.on_clock(0.0) is FinishReason.cancelled
