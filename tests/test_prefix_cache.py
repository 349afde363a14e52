"""worker/engine/prefix_cache.py and its use by the engine: a prompt that starts with tokens a finished
sequence left in the KV cache prefills only the rest, and greedy replies are the same as with the cache
off (fp32, tiny-neox and the Llama-shaped twin) across multi-turn growth, eviction, concurrent
sequences sharing a prefix, a one-token extension and a divergence inside a cached sequence."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.codec import Codec
from shared.prompts import PromptFormat
from shared.sampling import SamplingParams
from tests.models import tiny_llama
from worker.engine.engine import Engine, Finished
from worker.engine.prefix_cache import PrefixCache, common_prefix
from worker.pipeline.backend import Copy
from worker.pipeline.kv_cache import SlotKVCache
from worker.pipeline.torch_backend import TorchBackend

GREEDY = SamplingParams(temperature=0, ignore_eos=True)


# -- bookkeeping ---------------------------------------------------------------------------------------
@given(st.lists(st.integers(0, 3), max_size=40), st.lists(st.integers(0, 3), max_size=40))
def test_common_prefix_is_the_longest_shared_start(a, b):
    n = common_prefix(a, b)
    assert a[:n] == b[:n]
    assert n == min(len(a), len(b)) or a[n] != b[n]


def test_place_reuses_the_longest_entry_and_copies_it_in():
    pc = PrefixCache(slots=2, spare=1)
    pc.store(1, [1, 2, 3, 4, 5])
    pc.store(0, [1, 2, 9])
    p = pc.place([1, 2, 3, 4, 7, 8], slot=0, busy=set())
    assert p.cached == 4
    # row 0's own entry goes to the spare row first, then row 1's prefix is copied over it
    assert p.copies == [Copy(0, 2, 3), Copy(1, 0, 4)]
    assert pc.cached(0) == [1, 2, 3, 4] and pc.cached(2) == [1, 2, 9]


def test_the_last_prompt_token_is_always_prefilled():
    pc = PrefixCache(slots=1, spare=0)
    pc.store(0, [5, 6, 7])
    assert pc.place([5, 6, 7], slot=0, busy=set()) == (2, [])  # its logits start the reply


def test_rows_in_use_are_read_but_never_written():
    pc = PrefixCache(slots=2, spare=0)
    pc.store(1, [1, 2, 3, 4])  # a running sequence's prompt
    pc.store(0, [8, 8, 8])
    p = pc.place([1, 2, 3, 4, 5], slot=0, busy={1})
    assert p == (4, [Copy(1, 0, 4)])  # [8, 8, 8] is not moved into row 1: evicted instead
    assert pc.cached(1) == [1, 2, 3, 4]


def test_least_recently_used_entry_is_evicted():
    pc = PrefixCache(slots=1, spare=1)
    pc.store(0, [1, 1, 1])
    pc.place([2, 2, 2, 2], slot=0, busy=set())  # [1,1,1] moves to the spare row
    pc.store(0, [2, 2, 2, 2, 2])
    pc.place([3, 3], slot=0, busy=set())  # [2,...] is more recent than [1,1,1]: it takes the spare row
    assert pc.cached(1) == [2, 2, 2, 2, 2]
    assert pc.place([1, 1, 1, 9], slot=0, busy=set()).cached == 0  # [1,1,1] is gone


def _simulate(ops: list[tuple[int, int, int]], slots: int, spare: int) -> None:
    """Run placements against a model of the rows' real content and check every reused token is what the
    row holds: nothing is read from an entry whose row was overwritten."""
    rng = random.Random(0)
    rows: list[list[int]] = [[] for _ in range(slots + spare)]  # what each row really holds
    pc = PrefixCache(slots, spare)
    running: dict[int, list[int]] = {}
    histories: list[list[int]] = [[]]
    for slot_pick, hist_pick, extra in ops:
        free = [s for s in range(slots) if s not in running]
        if not free or (running and slot_pick % 3 == 0):  # a running sequence finishes
            slot = sorted(running)[slot_pick % len(running)]
            tokens = running.pop(slot)
            written = rng.randint(0, len(tokens))
            rows[slot] = tokens[:written]
            pc.store(slot, tokens[:written])
            histories.append(tokens)
            continue
        slot = min(free)
        base = histories[hist_pick % len(histories)]
        prompt = base[: rng.randint(0, len(base))] + [rng.randint(0, 3) for _ in range(extra + 1)]
        placement = pc.place(prompt, slot, set(running))
        for c in placement.copies:
            assert c.dst not in running  # a running row is never written
            rows[c.dst] = rows[c.src][: c.length]
        assert rows[slot][: placement.cached] == prompt[: placement.cached]
        assert placement.cached < len(prompt)
        rows[slot] = prompt + [rng.randint(0, 3) for _ in range(3)]  # the prompt and a reply written
        running[slot] = rows[slot]
        if slot_pick % 2:
            pc.store(slot, list(prompt))  # its prefill done: readable while it runs


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(0, 6)), max_size=60),
       st.integers(1, 4), st.integers(0, 3))
def test_reused_tokens_are_always_what_the_row_holds(ops, slots, spare):
    _simulate(ops, slots, spare)


def test_kv_row_copy_moves_a_prefix_and_nothing_else():
    cache = SlotKVCache(2, slots=1, max_len=8, dtype=torch.float32, device=torch.device("cpu"), spare=1)
    cache.allocate(kv_heads=1, head_dim=2)
    for t in (*cache.k, *cache.v):
        t[0].fill_(1.0)
    cache.copy(0, 1, 5)
    for t in (*cache.k, *cache.v):
        assert bool((t[1, :, :5] == 1).all()) and bool((t[1, :, 5:] == 0).all())
    with pytest.raises(ValueError, match="copy"):
        cache.copy(0, 2, 3)


# -- the engine, cache on vs off ------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["neox", "llama"])
def pair(request, tiny):
    """Two engines over the same fp32 weights: prefix reuse off, and on with 2 slots + 1 spare row (few rows:
    the tests below overflow them)."""
    tok, model = (tiny.tokenizer, tiny.model) if request.param == "neox" else tiny_llama()
    engines = []
    for reuse in (False, True):
        codec = Codec(tok, PromptFormat.oasst, ["<|endoftext|>"])
        backend = TorchBackend(model, slots=2, max_len=512, prefix_reuse=reuse, spare_slots=1 if reuse else 0)
        engines.append(Engine(backend, codec).start())
    yield engines
    for e in engines:
        e.stop()


def run(eng: Engine, prompt: list[int], n: int = 12) -> Finished:
    *_, ev = eng.submit(prompt, GREEDY, n)
    assert isinstance(ev, Finished), ev
    return ev


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 250) for _ in range(n)]


def converse(off: Engine, on: Engine, convs: list[list[int]], turns: int, rng: random.Random) -> list[int]:
    """Every conversation's turns, interleaved, on both engines: the replies must be equal. Returns the
    tokens reused at each turn on the cache engine."""
    reused = []
    for _turn in range(turns):
        for i, prompt in enumerate(convs):
            a, b = run(off, prompt), run(on, prompt)
            assert b.token_ids == a.token_ids
            assert a.cached_tokens == 0
            reused.append(b.cached_tokens)
            convs[i] = prompt + b.token_ids + ids(rng, 10)  # the reply and the next user message
    return reused


def test_multi_turn_conversations_reuse_their_history_and_reply_the_same(pair):
    off, on = pair
    rng = random.Random(1)
    # Two conversations fit (one in the decode row turns run in, one in the spare row): from their second
    # turns on, each reuses its whole history but the last reply token.
    reused = converse(off, on, [ids(rng, 30) for _ in range(2)], 4, rng)
    assert all(n >= 30 for n in reused[2:])
    # Four round-robin over room for two: least-recently-used eviction drops each entry before its next
    # turn (nothing reused), and every reply is still the same.
    converse(off, on, [ids(rng, 30) for _ in range(4)], 3, rng)


def test_a_conversation_back_to_back_reuses_everything_written(pair):
    off, on = pair
    rng = random.Random(2)
    prompt = ids(rng, 40)
    first = run(on, prompt)
    assert run(off, prompt).token_ids == first.token_ids
    nxt = prompt + first.token_ids + ids(rng, 5)
    second = run(on, nxt)
    # the reply's last token was sampled but never written (the sequence ended by length)
    assert second.cached_tokens == len(prompt) + len(first.token_ids) - 1
    assert second.token_ids == run(off, nxt).token_ids


def test_extension_by_one_token_and_divergence_inside(pair):
    off, on = pair
    rng = random.Random(3)
    prompt = ids(rng, 50)
    run(on, prompt)
    longer = prompt + [7]
    got = run(on, longer)
    assert got.cached_tokens == len(prompt) and got.token_ids == run(off, longer).token_ids
    diverged = prompt[:20] + ids(random.Random(4), 15)
    assert diverged[20] != prompt[20] or diverged[:21] != prompt[:21]
    got = run(on, diverged)
    assert got.cached_tokens == common_prefix(diverged, prompt + [7]) == 20
    assert got.token_ids == run(off, diverged).token_ids


def test_concurrent_sequences_sharing_a_prefix(pair):
    off, on = pair
    rng = random.Random(5)
    shared = ids(rng, 60)
    run(on, shared + [9])  # leaves the shared prefix in a row
    prompts = [shared + ids(rng, 6) for _ in range(2)]
    handles = [on.submit(p, GREEDY, 12) for p in prompts]  # both at once: one copies, one is already there
    got = [list(h)[-1] for h in handles]
    assert all(isinstance(g, Finished) for g in got)
    assert [g.token_ids for g in got] == [run(off, p).token_ids for p in prompts]
    assert all(g.cached_tokens == len(shared) for g in got)


def test_failed_copy_falls_back_to_a_full_prefill(pair, monkeypatch):
    off, on = pair
    rng = random.Random(6)
    prompt = ids(rng, 30)
    run(on, prompt)  # in row 0 (the lowest free)
    run(on, ids(rng, 30))  # takes row 0: the first prompt's entry moves to the spare row
    copy_kv = on.backend.copy_kv

    def broken(copies):
        raise RuntimeError("copy failed")

    monkeypatch.setattr(on.backend, "copy_kv", broken)
    nxt = prompt + ids(rng, 4)
    got = run(on, nxt)
    assert got.cached_tokens == 0  # the copy failed: prefilled whole
    assert got.token_ids == run(off, nxt).token_ids
    monkeypatch.setattr(on.backend, "copy_kv", copy_kv)
    again = nxt + got.token_ids + ids(rng, 3)
    assert run(on, again).cached_tokens > 0  # the cache works again after it was cleared


def test_static_decode_shapes_with_spare_rows(tiny):
    """The CUDA-graph path's static step (fixed buffers per row bucket, run eagerly on CPU) over a cache with
    spare rows: decode still reads only the first rows, and reuse changes no reply."""
    codec = Codec(tiny.tokenizer, PromptFormat.oasst, ["<|endoftext|>"])
    static = Engine(TorchBackend(tiny.model, slots=2, max_len=512, cuda_graphs=True, spare_slots=2), codec).start()
    off = Engine(TorchBackend(tiny.model, slots=2, max_len=512, prefix_reuse=False), codec).start()
    try:
        assert static.backend.cache.k[0].shape[0] == 4
        reused = converse(off, static, [ids(random.Random(7), 30) for _ in range(3)], 3, random.Random(8))
        assert all(n >= 30 for n in reused[3:])  # three conversations fit in 2 + 2 rows
        assert {k[0] for k in static.backend._graphs} <= {1, 2}  # row buckets of the decode slots only
    finally:
        static.stop()
        off.stop()


def test_the_start_log_says_whether_it_is_on_and_what_it_costs(tiny):
    from worker.runtime import prefix_cache_line

    on = TorchBackend(tiny.model, slots=2, max_len=64, spare_slots=2)
    size = sum(t.numel() * t.element_size() for t in (*on.cache.k, *on.cache.v))
    expected = f"prefix cache on: 2 spare row(s) beside the slots, KV cache {size / 2**20:.0f} MiB in all"
    assert prefix_cache_line(on) == expected
    off = TorchBackend(tiny.model, slots=2, max_len=64, prefix_reuse=False)
    assert prefix_cache_line(off) == "prefix cache off"
    assert sum(t.numel() for t in off.cache.k) * 2 == sum(t.numel() for t in on.cache.k)  # 4 rows, not 2


def test_a_failed_copy_leaves_a_decoding_sequence_alone(pair, monkeypatch):
    """A decodes from a reused row while B's copy fails: only B goes back to a full prefill (a bad-input
    review found A prefilled again mid-reply, its first tokens repeated)."""
    off, on = pair
    rng = random.Random(9)
    prompt = ids(rng, 40)
    run(on, prompt)
    a_prompt, b_prompt = prompt + ids(rng, 5), prompt + ids(rng, 5)
    a = on.submit(a_prompt, GREEDY, 200)
    first = a.get(timeout=30)  # A is decoding (its prefix reused from row 0)
    assert first is not None

    def broken(copies):
        raise RuntimeError("copy failed")

    monkeypatch.setattr(on.backend, "copy_kv", broken)
    b = run(on, b_prompt, 12)  # needs a copy of row 0's prefix into row 1: it fails
    *_, a_end = [first, *a]
    assert isinstance(a_end, Finished) and a_end.cached_tokens == len(prompt)
    assert a_end.token_ids == run(off, a_prompt, 200).token_ids
    assert b.cached_tokens == 0 and b.token_ids == run(off, b_prompt, 12).token_ids


def test_an_entry_copied_whole_into_a_decode_row_frees_its_row():
    pc = PrefixCache(slots=1, spare=1)
    pc.store(1, [1, 2, 3])  # a conversation's last turn, moved to the spare row
    assert pc.place([1, 2, 3, 4, 5], slot=0, busy=set()) == (3, [Copy(1, 0, 3)])
    assert pc.cached(1) == [] and pc.cached(0) == [1, 2, 3]  # the row keeps it even if nothing more is written


def test_as_many_conversations_as_rows_all_keep_their_history():
    """Conversations taking turns through fewer decode rows than there are of them: with a row per
    conversation and one more (a turn swaps its entry into its decode row with the one there, through a
    free row), every turn after the first reuses its whole history (duplicates left behind by copies had
    crowded out other conversations' entries)."""
    slots, spare = 2, 3
    pc = PrefixCache(slots, spare)
    histories = [[100 * c] for c in range(slots + spare - 1)]
    for turn in range(5):
        for c, hist in enumerate(histories):
            slot = c % slots
            prompt = [*hist, 100 * c + 1 + turn]
            placement = pc.place(prompt, slot, busy=set())
            assert placement.cached == (len(hist) if turn else 0), (turn, c)
            hist[:] = [*prompt, 7, 7]  # the reply written
            pc.store(slot, list(hist))
