"""worker/engine/engine.py: continuous batching. Batched greedy output equals solo output; joins
and leaves at step boundaries disturb no one; each row keeps its own sampling; slots come back;
prompts arriving together are prefilled together."""

import time

import pytest

from shared.codec import Codec
from shared.context import fit
from shared.messages import ChatMessage, Role
from shared.sampling import SamplingParams
from shared.wire import FinishReason
from tests.models import engine_for, tiny_llama
from worker.engine.detok import Detokenizer
from worker.engine.engine import PREFILL_BUDGET, Engine, Failed, Finished, Token
from worker.pipeline.torch_backend import TorchBackend

GREEDY = SamplingParams(temperature=0)
TEXTS = ["hi", "Hello there, how are you?", "x" * 50, "abc def", "A much longer prompt " * 6, "q", "12345", "zz top"]


@pytest.fixture(scope="module", params=["neox", "llama"])
def model(request, tiny):
    return (tiny.tokenizer, tiny.model) if request.param == "neox" else tiny_llama()


def prompts(codec):
    return [fit(codec, [ChatMessage(role=Role.prompter, text=t)], 256, None).ids for t in TEXTS]


def final(handle) -> Finished:
    events = list(handle)
    assert isinstance(events[-1], Finished), events[-1]
    return events[-1]


def test_batched_greedy_equals_each_alone(model):
    tok, m = model
    eng = engine_for(m, tok, slots=8)
    try:
        ps = prompts(eng.codec)
        alone = [final(eng.submit(p, GREEDY, 30)).token_ids for p in ps]
        handles = [eng.submit(p, GREEDY, 30) for p in ps]
        together = [final(h).token_ids for h in handles]
        assert together == alone
        assert all(len(a) > 0 for a in alone)
    finally:
        eng.stop()


def test_joining_mid_decode_changes_nobody(model):
    tok, m = model
    eng = engine_for(m, tok, slots=4)
    try:
        ps = prompts(eng.codec)
        ref = [final(eng.submit(p, GREEDY, 60)).token_ids for p in ps[:3]]
        first = eng.submit(ps[0], GREEDY, 60)
        second = eng.submit(ps[1], GREEDY, 60)
        while eng.tokens_generated < 10:  # let them decode a while, then admit a third
            time.sleep(0.001)
        third = eng.submit(ps[2], GREEDY, 60)
        assert [final(h).token_ids for h in (first, second, third)] == ref
    finally:
        eng.stop()


def test_slots_are_freed_after_finish_cancel_and_error(tiny):
    eng = engine_for(tiny.model, tiny.tokenizer, slots=2, max_len=2048)
    eng.codec.end_ids = set()  # this engine's turns run until cut, so the cancel lands mid-decode
    try:
        p = prompts(eng.codec)[1]
        final(eng.submit(p, GREEDY, 5))
        assert eng.busy == 0
        h = eng.submit(p, SamplingParams(temperature=1, top_k=0, seed=1), 10_000)
        assert isinstance(h.get(timeout=5), Token)
        h.cancel()
        assert final(h).reason is FinishReason.cancelled
        assert eng.busy == 0
        boom = eng.backend.decode

        def failing(*a, **k):
            raise RuntimeError("device fell over")

        eng.backend.decode = failing
        events = list(eng.submit(p, SamplingParams(temperature=1, top_k=0, seed=1), 50))
        assert isinstance(events[-1], Failed) and "device fell over" in events[-1].error
        eng.backend.decode = boom
        assert eng.busy == 0
        assert final(eng.submit(p, GREEDY, 5)).completion_tokens > 0  # the engine goes on serving
    finally:
        eng.stop()


def test_deadline_frees_the_slot(tiny):
    eng = engine_for(tiny.model, tiny.tokenizer, slots=1)
    try:
        p = prompts(eng.codec)[0]
        r = final(eng.submit(p, SamplingParams(temperature=1, top_k=0, seed=2), 200, deadline=time.time() - 1))
        assert r.reason is FinishReason.cancelled and eng.busy == 0
    finally:
        eng.stop()


def test_per_sequence_sampling_inside_one_batch(tiny):
    eng = engine_for(tiny.model, tiny.tokenizer, slots=4)
    try:
        p = prompts(eng.codec)[1]
        greedy_alone = final(eng.submit(p, GREEDY, 40)).token_ids
        hot = SamplingParams(temperature=3.0, top_k=0, seed=9)
        hot_alone = final(eng.submit(p, hot, 40)).token_ids
        hs = [eng.submit(p, hot, 40), eng.submit(p, GREEDY, 40), eng.submit(p, SamplingParams(temperature=3.0,
                                                                                                top_k=0), 40)]
        got = [final(h).token_ids for h in hs]
        assert got[1] == greedy_alone  # greedy stays deterministic beside sampled rows
        assert got[0] == hot_alone  # a seeded row gets its own stream of randomness
        assert got[0] != got[1]
    finally:
        eng.stop()


def test_abandon_all_hands_everything_back(tiny):
    eng = engine_for(tiny.model, tiny.tokenizer, slots=2)
    try:
        p = prompts(eng.codec)[0]
        hs = [eng.submit(p, SamplingParams(temperature=1, top_k=0, seed=i), 10_000) for i in range(3)]
        time.sleep(0.05)
        assert eng.abandon_all() == 3
        for h in hs:
            ev = [e for e in h][-1]
            assert isinstance(ev, Failed) and ev.abandoned
        assert eng.busy == 0
    finally:
        eng.stop()


def test_rejects_prompts_that_leave_no_room(tiny):
    eng = engine_for(tiny.model, tiny.tokenizer, slots=1, max_len=32)
    try:
        with pytest.raises(ValueError, match="prompt"):
            eng.submit(list(range(32)), GREEDY, 1)
        with pytest.raises(ValueError, match="top_k"):
            eng.submit([1, 2], SamplingParams(top_k=10_000), 1)
    finally:
        eng.stop()


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(tiny):
    eng = engine_for(tiny.model, tiny.tokenizer, slots=2, max_len=2048)
    eng.codec.end_ids = set()  # both run their full length
    try:
        short = prompts(eng.codec)[1]
        long = fit(eng.codec, [ChatMessage(role=Role.prompter, text="long prompt " * 100)], 2048, None).ids
        assert len(long) > 4 * 256
        ref_short = final(eng.submit(short, GREEDY, 300)).token_ids
        ref_long = final(eng.submit(long, GREEDY, 20)).token_ids
        calls: list[str] = []
        prefill, decode = eng.backend.prefill, eng.backend.decode
        eng.backend.prefill = lambda *a: calls.append("prefill") or prefill(*a)
        eng.backend.decode = lambda *a: calls.append("decode") or decode(*a)
        base = eng.tokens_generated
        first = eng.submit(short, GREEDY, 300)
        while eng.tokens_generated < base + 3:  # the short one is decoding
            time.sleep(0.001)
        second = eng.submit(long, GREEDY, 20)
        assert final(first).token_ids == ref_short and final(second).token_ids == ref_long
        chunks = [i for i, c in enumerate(calls) if c == "prefill"][1:]  # the long prompt's chunks
        assert len(chunks) >= 5
        assert all("decode" in calls[a:b] for a, b in zip(chunks, chunks[1:]))  # the short one kept decoding
    finally:
        eng.stop()


def test_prompts_arriving_together_share_one_prefill_and_short_ones_are_never_split(tiny):
    codec = Codec(tiny.tokenizer, tiny.preset.prompt_format, tiny.preset.end_keys)
    eng = Engine(TorchBackend(tiny.model, slots=4, max_len=512), codec)  # not started: all four wait together
    calls: list[list[tuple[int, int]]] = []
    prefill = eng.backend.prefill
    eng.backend.prefill = lambda ps: calls.append([(p.slot, len(p.ids)) for p in ps]) or prefill(ps)
    size = PREFILL_BUDGET // 2 - 10  # two fit in one iteration's budget, a third does not
    ps = [[(7 * i + j) % 200 + 1 for i in range(size)] for j in range(3)] + [[5, 6, 7]]
    handles = [eng.submit(p, GREEDY, 2) for p in ps]
    eng.start()
    try:
        assert all(isinstance(final(h), Finished) for h in handles)
        assert calls[0] == [(0, size), (1, size), (3, 3)]  # the third waits whole; the short fourth fits
        assert calls[1] == [(2, size)]
        assert len(calls) == 2
    finally:
        eng.stop()


def replay(codec, ids: list[int], stop: list[str]) -> tuple[str, int]:
    """What the reply should be: `ids` through a fresh Detokenizer, up to the token that completes a
    stop string. Returns (text, tokens used)."""
    d = Detokenizer(codec.decode, stop)
    for n, t in enumerate(ids, 1):
        d.push(t)
        if d.stopped:
            return d.text, n
    d.flush()
    return d.text, len(ids)


def test_streamed_text_is_the_final_text_whatever_ends_the_turn(tiny):
    """A token's text is emitted one step late (while the next step runs): the deltas still add up to
    the committed text when the turn ends by length, by a stop string (found in a late-emitted token),
    or by a cancel that lands with a token's text still to emit."""
    eng = engine_for(tiny.model, tiny.tokenizer, slots=2, max_len=512)
    eng.codec.end_ids = set()
    try:
        p = prompts(eng.codec)[4]
        ref = final(eng.submit(p, GREEDY, 60))
        assert ref.reason is FinishReason.length and len(ref.token_ids) == 60
        stop = ref.text[len(ref.text) // 2 :][:3]  # from the middle of the reply: reached mid-decode
        ends = {
            "length": eng.submit(p, GREEDY, 60),
            "stop": eng.submit(p, SamplingParams(temperature=0, stop=[stop]), 60),
        }
        for how, h in ends.items():
            events = list(h)
            fin = events[-1]
            assert "".join(e.text for e in events[:-1]) == fin.text, how
            text, used = replay(eng.codec, ref.token_ids, [stop] if how == "stop" else [])
            assert (fin.text, fin.completion_tokens, fin.token_ids) == (text, used, ref.token_ids[:used]), how
        assert fin.reason is FinishReason.stop and fin.completion_tokens < 60
        h = eng.submit(p, GREEDY, 400)
        deltas = [h.get(timeout=10) for _ in range(5)]
        h.cancel()
        events = deltas + list(h)
        fin = events[-1]
        assert fin.reason is FinishReason.cancelled and 5 <= fin.completion_tokens < 400
        assert "".join(e.text for e in events[:-1]) == fin.text == replay(eng.codec, fin.token_ids, [])[0]
        assert eng.busy == 0
    finally:
        eng.stop()


def test_a_tokens_text_goes_out_while_the_next_step_runs(tiny):
    """The engine emits step k's text after launching step k + 1 (on CUDA the host work then overlaps
    the device's): at each decode call, the newest sampled token's text is not out yet."""

    class OneCharCodec:  # every id is one character: one Token event per token
        vocab_size = tiny.codec.vocab_size
        end_ids: set[int] = set()

        @staticmethod
        def decode(ids: list[int]) -> str:
            return "".join(chr(65 + i % 26) for i in ids)

    eng = Engine(TorchBackend(tiny.model, slots=1, max_len=256), OneCharCodec())  # started below
    seen: list[int] = []
    decode = eng.backend.decode
    h = eng.submit(prompts(tiny.codec)[1], GREEDY, 12)
    eng.backend.decode = lambda *a: seen.append(h._seq.events.qsize()) or decode(*a)
    eng.start()
    try:
        while eng.finished == 0:  # read nothing until the end: the queue's size counts what was emitted
            time.sleep(0.001)
        events = list(h)
        assert [type(e) for e in events] == [Token] * 12 + [Finished]
        # The prefill's token goes out at once; then each decode call finds the last token pending.
        assert seen == [1, *range(1, 11)]
    finally:
        eng.stop()


def test_ignore_eos_generates_past_the_end_key_to_the_max_tokens(model):
    """vLLM's ignore_eos, for benchmarks that need exactly N tokens: the end key is just another token."""
    tok, m = model
    eng = engine_for(m, tok, slots=2)
    try:
        p = prompts(eng.codec)[1]
        first = final(eng.submit(p, GREEDY, 20)).token_ids[0]
        eng.codec.end_ids = {first}  # the model's first reply token now ends the reply at once ...
        assert final(eng.submit(p, GREEDY, 20)).reason is FinishReason.end_key
        out = final(eng.submit(p, SamplingParams(temperature=0, ignore_eos=True), 20))
        assert (out.reason, out.completion_tokens) == (FinishReason.length, 20)  # ... unless ignored
    finally:
        eng.stop()


def counting_prefills(tiny) -> tuple[Engine, list[int]]:
    """A started 4-slot engine whose backend records the rows of each prefill call."""
    codec = Codec(tiny.tokenizer, tiny.preset.prompt_format, tiny.preset.end_keys)
    eng = Engine(TorchBackend(tiny.model, slots=4, max_len=256), codec).start()
    calls: list[int] = []
    prefill = eng.backend.prefill
    eng.backend.prefill = lambda ps: calls.append(len(ps)) or prefill(ps)
    return eng, calls


def test_prompts_announced_as_arriving_join_the_prefill_and_none_waits_when_none_are_coming(tiny):
    """Turns reaching a worker together are submitted a few ms apart; a prefill about to start waits (up to
    ARRIVAL_WINDOW_S) for prompts announced with Engine.arriving(), so they share it."""
    import threading

    eng, calls = counting_prefills(tiny)
    try:
        ps = prompts(eng.codec)[:3]
        go = threading.Barrier(3)

        def arrive(i: int, out: list) -> None:
            with eng.arriving():
                go.wait()
                time.sleep(0.004 * i)  # claimed and fitted a few ms apart
                out.append(eng.submit(ps[i], GREEDY, 2))

        out: list = []
        threads = [threading.Thread(target=arrive, args=(i, out)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(isinstance(final(h), Finished) for h in out)
        assert calls == [3]  # one prefill for the three
        calls.clear()
        assert eng._arriving == 0  # every announcement ended with its submit (or its failure)
        final(eng.submit(ps[0], GREEDY, 1))  # nothing announced: nothing to wait for
        assert calls == [1]
    finally:
        eng.stop()


def test_deliveries_queued_behind_the_first_join_its_prefill_and_stop_counting_once_received(tiny):
    """The worker tells an idle engine how many deliveries are queued behind the one it received
    (Engine.expect(behind=)): the first prefill waits for them, each received one takes one off, and
    once they are in nothing waits any more."""
    eng, calls = counting_prefills(tiny)
    try:
        ps = prompts(eng.codec)[:3]
        assert eng.idle
        out: list = []
        eng.expect("t0", behind=2)  # two more on the queue
        with eng.arriving("t0"):
            out.append(eng.submit(ps[0], GREEDY, 2))
        for i in (1, 2):  # the consumer pops them one by one, a few ms apart
            time.sleep(0.004)
            eng.expect(f"t{i}")
            with eng.arriving(f"t{i}"):
                out.append(eng.submit(ps[i], GREEDY, 2))
        assert all(isinstance(final(h), Finished) for h in out)
        assert calls == [3]  # one prefill for the three
        with eng._cv:
            assert not eng._coming()  # the backlog was taken off as they came
        calls.clear()
        final(eng.submit(ps[0], GREEDY, 1))
        assert calls == [1]
    finally:
        eng.stop()


def test_log_probabilities_come_per_generated_token_only_for_the_sequences_that_ask(tiny):
    eng = engine_for(tiny.model, tiny.tokenizer, slots=4)
    try:
        p = prompts(eng.codec)[1]
        asks = SamplingParams(temperature=0, logprobs=2)
        h = [eng.submit(p, asks, 12), eng.submit(p, GREEDY, 12), eng.submit(p, SamplingParams(temperature=0.8,
                                                                                             logprobs=0, seed=3), 12)]
        greedy, plain, hot = (final(x) for x in h)
        assert plain.logprobs is None
        assert len(greedy.logprobs) == len(greedy.token_ids) and len(hot.logprobs) == len(hot.token_ids)
        for token, lp in zip(greedy.token_ids, greedy.logprobs):
            assert lp.top[0] == (token, lp.logprob) and len(lp.top) == 2  # greedy: its token is the likeliest
        assert all(lp.top == [] and lp.logprob <= 0 for lp in hot.logprobs)
        assert greedy.token_ids == plain.token_ids  # asking changes nothing of the reply
    finally:
        eng.stop()
