"""worker/pipeline/torch_backend.py (+ backend.py, kv_cache.py): batched prefill over a slot KV
cache. Prompts prefilled together leave exactly what each leaves alone; bad prefills write nothing.
The static decode path (CUDA graphs, torch.compile) equals dynamic decode and never touches the host."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.models import lockstep_decode, tiny_llama
from worker.pipeline.backend import Prefill, chunk_plan, prefill_rounds
from worker.pipeline.torch_backend import TorchBackend, row_buckets

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


def decode_steps(backends: list[TorchBackend], prompts: dict[int, list[int]], widths: list[int]) -> None:
    """lockstep_decode, asserting every backend gives the first one's logits at every step."""
    for k, (active, out) in enumerate(lockstep_decode(backends, prompts, widths)):
        for o in out:
            assert o.shape == out[0].shape == (len(active), out[0].shape[1])
            if k == 0:
                assert torch.equal(o.argmax(-1), out[0].argmax(-1))  # the prefill's first tokens
            else:
                torch.testing.assert_close(o[active], out[0][active], rtol=1e-4, atol=1e-4)


def test_row_buckets_hold_every_batch_width():
    assert row_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert row_buckets(12) == [1, 2, 4, 8, 12] and row_buckets(1) == [1]


def test_static_decode_equals_dynamic(model):
    """The CUDA-graph path's static shapes (a bucket of rows every step, fixed input buffers, one set
    per (rows, kv bucket)), run eagerly on CPU: everything but the capture itself."""
    dynamic = TorchBackend(model, slots=4, max_len=512)
    static = TorchBackend(model, slots=4, max_len=512, cuda_graphs=True)
    # Slot 1 stays idle; slot 3 sits out the width-3 steps, slots 2 and 3 the width-1 steps.
    decode_steps([dynamic, static], {0: prompt(9, 0), 2: prompt(30, 1), 3: prompt(17, 2)}, [4, 3, 1, 4, 3, 1])
    assert sorted(static._graphs) == [(1, 256), (4, 256)]  # one buffer set (a graph on CUDA) per shape
    assert not dynamic._graphs


def test_compiled_static_decode_equals_dynamic_with_two_compiles(tiny):
    """torch.compile (inductor, on CPU here) of the static step: the same logits at every row bucket
    and kv bucket, and the rows and kv length stay symbolic, so rows == 1 and the rest compile once
    each, each one graph (no graph break with this transformers)."""
    import torch._dynamo

    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    dynamic = TorchBackend(tiny.model, slots=8, max_len=512)
    compiled = TorchBackend(tiny.model, slots=8, max_len=512, cuda_graphs=True, compile_decode=True)
    # Slot 0's prompt ends at 252: after four steps it crosses from the 256 into the 512 kv bucket.
    decode_steps([dynamic, compiled], {0: prompt(252, 0), 1: prompt(12, 1), 5: prompt(40, 2)}, [1, 2, 6, 8] * 2)
    assert compiled.compiled
    assert sorted(compiled._graphs) == [(1, 256), (1, 512), (2, 256), (2, 512), (8, 256), (8, 512)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 2


def test_a_failed_compile_falls_back_to_the_uncompiled_step(tiny, caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    be = TorchBackend(tiny.model, slots=2, max_len=64, cuda_graphs=True, compile_decode=True)
    be._step_fn = torch.compile(be._step, backend=broken_backend, dynamic=True)
    ref = TorchBackend(tiny.model, slots=2, max_len=64)
    decode_steps([ref, be], {0: prompt(9, 0), 1: prompt(5, 1)}, [2, 2, 1])
    assert not be.compiled and be._step_fn == be._step
    assert "torch.compile of the decode step failed, decoding uncompiled" in caplog.text


def test_compile_needs_the_static_path_on_cuda(tiny):
    with pytest.raises(ValueError, match="compile_decode .* needs cuda_graphs"):
        TorchBackend(tiny.model, slots=2, max_len=64, compile_decode=True, device="cuda")


def test_on_cpu_compile_takes_the_one_row_step_in_two_compiles_and_equals_eager(tiny):
    """The `cpu-compiled` preset: warm_up compiles the 1-row step (a first KV length, then a symbolic one) before
    serving; its logits equal eager ones at every KV length; wider steps stay eager; no compile after warm_up."""
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    eager = TorchBackend(copy.deepcopy(tiny.model), slots=4, max_len=512, lean=True)
    compiled = TorchBackend(copy.deepcopy(tiny.model), slots=4, max_len=512, lean=True, compile_decode=True)
    compiled.warm_up()
    assert compiled.compiled and counters["unique_graphs"] - before == 2
    # Slot 0's prompt ends at 60: it crosses KV buckets (32-wide) while it decodes alone.
    decode_steps([eager, compiled], {0: prompt(60, 0), 2: prompt(12, 1)}, [1] * 6 + [3, 1])
    assert compiled.compiled and counters["unique_graphs"] - before == 2


class HostTraffic(TorchDispatchMode):
    """Fails any op that reads a device tensor back to the host or takes a host tensor: what CUDA
    graph capture can't hold (a sync, or a pageable copy baked in at capture time)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = tree_leaves((args, kwargs or {}))
        host = [tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim()]
        if host or func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            raise AssertionError(f"host traffic in {func}: host tensors {host}")
        return func(*args, **(kwargs or {}))


def test_the_guard_sees_host_reads_and_host_tensors():
    x = torch.ones(3, device="meta")
    with pytest.raises(AssertionError, match="_local_scalar_dense"), HostTraffic():
        x.sum().item()
    with pytest.raises(AssertionError, match=r"host tensors \[\(2,\)\]"), HostTraffic():
        x[:2] + torch.ones(2)


def test_the_static_step_never_touches_the_host(model):
    """Run on the meta device (no data anywhere), the step reads nothing back and takes no host
    tensor, at every row bucket: so capturing it as a CUDA graph can't fail on a sync."""
    be = TorchBackend(copy.deepcopy(model), slots=4, max_len=512, device="meta", cuda_graphs=True)  # .to() is in place
    for rows in be.row_buckets:
        io = {k: torch.zeros(rows, 1, dtype=torch.long, device="meta") for k in ("ids", "rot", "write")}
        with torch.inference_mode(), HostTraffic():
            logits = be._step(io, 256)
        assert logits.shape == (rows, model.get_output_embeddings().weight.shape[0]) and logits.device.type == "meta"
