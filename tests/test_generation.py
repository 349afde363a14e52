"""Generation semantics on tiny-neox, the original pipeline's contract."""

import pytest

from shared.context import fit
from shared.messages import ChatMessage, Role
from shared.sampling import SamplingParams
from shared.wire import FinishReason
from tests.models import engine_for
from worker.engine.engine import Finished, Token


@pytest.fixture(scope="module")
def eng(tiny):
    e = engine_for(tiny.model, tiny.tokenizer, slots=4, max_len=256)
    yield e
    e.stop()


def prompt(tiny, text="Hello there"):
    return fit(tiny.codec, [ChatMessage(role=Role.prompter, text=text)], 256, None).ids


def run(eng, ids, params, max_new=40):
    events = list(eng.submit(ids, params, max_new))
    assert isinstance(events[-1], Finished)
    return events


def test_temperature_zero_is_deterministic(eng, tiny):
    a = run(eng, prompt(tiny), SamplingParams(temperature=0))[-1]
    b = run(eng, prompt(tiny), SamplingParams(temperature=0))[-1]
    assert a.text == b.text and a.completion_tokens == b.completion_tokens > 0


def test_top_k_1_equals_greedy(eng, tiny):
    greedy = run(eng, prompt(tiny, "abc"), SamplingParams(temperature=0))[-1]
    k1 = run(eng, prompt(tiny, "abc"), SamplingParams(temperature=1.5, top_k=1))[-1]
    assert k1.text == greedy.text


def test_max_tokens_caps_new_tokens(eng, tiny):
    for n in (1, 7, 23):
        r = run(eng, prompt(tiny), SamplingParams(temperature=1.0, top_k=0, seed=3), max_new=n)[-1]
        assert r.completion_tokens <= n
        if r.reason is FinishReason.length:
            assert r.completion_tokens == n


def test_stops_at_the_end_key_and_excludes_it(tiny):
    eos = tiny.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    e = engine_for(tiny.model, tiny.tokenizer, slots=2, max_len=256)
    try:
        seen = set()
        for seed in range(40):  # sample until some turn ends on the end key
            events = run(e, prompt(tiny, f"q{seed}"), SamplingParams(temperature=2.0, top_k=0, seed=seed), 200)
            r = events[-1]
            seen.add(r.reason)
            if r.reason is FinishReason.end_key:
                assert "<|endoftext|>" not in r.text
                assert all(t.token_id != eos for t in events if isinstance(t, Token))
                assert r.completion_tokens < 200
                break
        assert FinishReason.end_key in seen
    finally:
        e.stop()


def test_never_emits_a_token_id_outside_the_tokenizer(eng, tiny):
    vocab = len(tiny.tokenizer)
    assert tiny.model.config.vocab_size > vocab  # the padded embedding of the OASST checkpoint
    ids = []
    for seed in range(6):
        events = run(eng, prompt(tiny, "x" * seed), SamplingParams(temperature=5.0, top_k=0, seed=seed), 150)
        ids += events[-1].token_ids
    assert len(ids) > 100
    assert max(ids) < vocab


def test_seeded_sampling_repeats(eng, tiny):
    p = SamplingParams(temperature=1.0, top_k=0, seed=42)
    assert run(eng, prompt(tiny), p)[-1].text == run(eng, prompt(tiny), p)[-1].text
