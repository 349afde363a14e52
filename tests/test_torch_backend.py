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
