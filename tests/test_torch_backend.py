"""worker/pipeline/torch_backend.py (+ backend.py, kv_cache.py): batched prefill over a slot KV
cache. Prompts prefilled together leave exactly what each leaves alone; bad prefills write nothing."""

import pytest
import torch

from tests.models import tiny_llama
from worker.pipeline.backend import Prefill, chunk_plan, prefill_rounds
from worker.pipeline.torch_backend import TorchBackend

LENGTHS = [5, 20, 40, 300]  # chunk plans 16 / 32 / 48 / 256+48: several rounds and padded sizes


@pytest.fixture(scope="module", params=["neox", "llama"])
def model(request, tiny):
    return tiny.model if request.param == "neox" else tiny_llama()[1]


def prompt(n: int, salt: int) -> list[int]:
    return [(7 * i + 13 * salt) % 250 + 1 for i in range(n)]


def cached(be: TorchBackend, slot: int, n: int) -> list[torch.Tensor]:
    return [t[slot, :, :n] for t in be.cache.k + be.cache.v]


def test_prefill_rounds_keep_each_prompts_chunks_in_order():
    rounds = prefill_rounds([Prefill(0, [1] * 300, 0), Prefill(1, [1] * 5, 0)], (16, 32, 64, 128, 256))
    assert rounds == [[(0, 0, 256, 256), (1, 0, 5, 16)], [(0, 256, 44, 64)]]
    assert chunk_plan(300) == [(256, 256), (44, 48)]


def test_prompts_prefilled_together_equal_each_alone(model):
    together = TorchBackend(model, slots=4, max_len=512)
    alone = TorchBackend(model, slots=4, max_len=512)
    prompts = [prompt(n, i) for i, n in enumerate(LENGTHS)]
    slots = [2, 0, 3, 1]  # not in order, not a prefix: rows are gathered
    batched = together.prefill([Prefill(s, p, 0) for s, p in zip(slots, prompts)])
    assert batched.shape == (4, model.get_output_embeddings().weight.shape[0]) and batched.dtype == torch.float32
    for row, (s, p) in enumerate(zip(slots, prompts)):
        solo = alone.prefill([Prefill(s, p, 0)])[0]
        torch.testing.assert_close(batched[row], solo, rtol=1e-4, atol=1e-4)
        for a, b in zip(cached(together, s, len(p)), cached(alone, s, len(p))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_prompt_continued_from_an_offset_equals_it_in_one_piece(model):
    whole = TorchBackend(model, slots=2, max_len=512)
    pieces = TorchBackend(model, slots=2, max_len=512)
    p, q = prompt(70, 1), prompt(30, 2)
    ref = whole.prefill([Prefill(1, p, 0)])[0]
    pieces.prefill([Prefill(1, p[:50], 0), Prefill(0, q, 0)])
    got = pieces.prefill([Prefill(1, p[50:], 50)])[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("prefills", "error"),
    [
        ([], "nothing to prefill"),
        ([Prefill(0, [1, 2], 0), Prefill(0, [3], 0)], "slot 0 given twice"),
        ([Prefill(0, [1, 2], 0), Prefill(4, [3], 0)], r"slot 4 outside 0\.\.3"),
        ([Prefill(0, [1, 2], 0), Prefill(1, [], 0)], "no tokens for slot 1"),
        ([Prefill(0, [1, 2], 0), Prefill(1, [3] * 10, 60)], "70 tokens exceeds the sequence length 64"),
    ],
)
def test_a_bad_prefill_is_refused_before_anything_is_written(tiny, prefills, error):
    be = TorchBackend(tiny.model, slots=4, max_len=64)
    before = [t.clone() for t in be.cache.k + be.cache.v]
    with pytest.raises(ValueError, match=error):
        be.prefill(prefills)
    assert all(torch.equal(a, b) for a, b in zip(before, be.cache.k + be.cache.v))


def test_static_decode_equals_dynamic(model):
    """The CUDA-graph path's static shapes (all slots every step, fixed input buffers, one set per kv
    bucket), run eagerly on CPU: everything but the capture itself."""
    static = TorchBackend(model, slots=4, max_len=512, cuda_graphs=True)
    dynamic = TorchBackend(model, slots=4, max_len=512)
    prompts = {0: prompt(9, 0), 2: prompt(30, 1), 3: prompt(17, 2)}  # slot 1 stays idle
    first = {}
    for be in (static, dynamic):
        logits = be.prefill([Prefill(s, p, 0) for s, p in prompts.items()])
        first[be] = logits.argmax(-1)
    assert torch.equal(first[static], first[dynamic])
    ids = {s: int(t) for s, t in zip(prompts, first[static])}
    pos = {s: len(p) for s, p in prompts.items()}
    for step in range(6):
        n = 3 if step % 2 else 4  # slot 3 sits out every other step (rows past n are not passed at all)
        active = torch.tensor([s in prompts and s < n for s in range(n)])
        args = (
            torch.tensor([ids.get(s, 0) for s in range(n)]),
            torch.tensor([pos.get(s, 0) for s in range(n)]),
            active,
        )
        a, b = static.decode(*args), dynamic.decode(*args)
        assert a.shape == b.shape == (n, b.shape[1])
        torch.testing.assert_close(a[active], b[active], rtol=1e-4, atol=1e-4)
        for s in range(n):
            if active[s]:
                ids[s], pos[s] = int(b[s].argmax()), pos[s] + 1
    assert list(static._graphs) == [256]  # one buffer set (one graph on CUDA), reused by every step
    assert not dynamic._graphs
