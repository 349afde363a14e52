"""worker/pipeline/lean_llama.py: the lean forward gives transformers' logits (fp32, the Llama-shaped twin with
grouped-query attention), prefill and decode, dynamic and static decode, and with int8 and int4 weights (fused or
not); the engine's replies are the same with it, batched or alone; a model it does not implement keeps
transformers' modules."""

import copy

import pytest
import torch

from shared.sampling import SamplingParams
from tests.models import engine_for, lockstep_decode, tiny_llama
from worker.pipeline import cpu_gemm, lean_llama
from worker.pipeline.fused_linear import Concatenated
from worker.pipeline.torch_backend import TorchBackend

GREEDY = SamplingParams(temperature=0)
PROMPTS = {0: list(range(30, 70)), 1: [5, 9, 11], 3: list(range(100, 117))}


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.mark.parametrize("static", [False, True])
def test_lean_logits_equal_transformers_on_prefill_and_every_decode_width(llama, static):
    _, model = llama
    backends = [TorchBackend(copy.deepcopy(model), slots=4, max_len=128, lean=lean, cuda_graphs=static)
                for lean in (False, True)]
    assert backends[0]._lean is None and backends[1]._lean is not None
    for active, (hf, lean) in lockstep_decode(backends, PROMPTS, [4, 4, 2, 4, 1]):
        assert torch.allclose(hf[active], lean[active], atol=1e-4), (hf[active] - lean[active]).abs().max()


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("quantize, hidden", [("int8", 64), ("int4", 128), ("int4", 64)])
def test_lean_logits_equal_transformers_with_quantized_weights(quantize, hidden, kernels, monkeypatch):
    """With the project's kernels: the matmuls, and a decode step's attention as one decode_attention call per
    layer (prompts keep SDPA)."""
    _, model = tiny_llama(hidden)
    backends = [TorchBackend(copy.deepcopy(model), slots=4, max_len=128, lean=lean, quantize=quantize,
                             cpu_gemm=kernels) for lean in (False, True)]
    native = kernels == "auto" and cpu_gemm.available()
    assert backends[1]._lean.native_attention == native
    calls = []
    real = lean_llama.decode_attention
    monkeypatch.setattr(lean_llama, "decode_attention",
                        lambda qkv, *a, **k: calls.append(qkv.shape[0]) or real(qkv, *a, **k))
    # hidden 64: q/k/v are not whole blocks of torch's int4 packing, so only cpu_gemm's tiles fuse them
    fused = quantize == "int8" or hidden == 128 or native
    assert isinstance(backends[1]._lean.qkv[0], Concatenated) != fused
    for active, (hf, lean) in lockstep_decode(backends, PROMPTS, [4, 4, 2, 4, 1]):
        # bf16 activations: one rounding apart where the two orders of operations differ
        torch.testing.assert_close(lean[active], hf[active], rtol=0.02, atol=0.05)
        assert torch.equal(lean[active].argmax(-1), hf[active].argmax(-1))
    widths = [4, 4, 2, 4, 1]
    assert calls == ([w for w in widths for _ in range(model.config.num_hidden_layers)] if native else [])


def test_the_engines_greedy_replies_are_the_same_batched_or_alone(llama):
    tok, model = llama
    prompts = [list(range(40 + i, 60 + 2 * i)) for i in range(6)]
    replies = {}
    for lean in (False, True):
        eng = engine_for(copy.deepcopy(model), tok, slots=4, lean=lean)
        try:
            alone = [list(eng.submit(p, GREEDY, 24))[-1].token_ids for p in prompts]
            handles = [eng.submit(p, GREEDY, 24) for p in prompts]
            together = [list(h)[-1].token_ids for h in handles]
        finally:
            eng.stop()
        assert together == alone
        replies[lean] = alone
    assert replies[True] == replies[False] and all(replies[True])


def test_int4_lean_replies_are_the_same_batched_or_alone():
    """The `cpu` preset's path (lean forward, fused int4 layers): a greedy reply does not depend on its batch."""
    tok, model = tiny_llama(128)
    prompts = [list(range(40 + i, 60 + 2 * i)) for i in range(6)]
    eng = engine_for(model, tok, slots=4, lean=True, quantize="int4")
    try:
        alone = [list(eng.submit(p, GREEDY, 24))[-1].token_ids for p in prompts]
        handles = [eng.submit(p, GREEDY, 24) for p in prompts]
        assert [list(h)[-1].token_ids for h in handles] == alone
        assert len({tuple(a) for a in alone}) > 1
    finally:
        eng.stop()


def test_a_model_it_does_not_implement_keeps_transformers_modules():
    _, model = tiny_llama()
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}  # not implemented
    assert not lean_llama.supports(model)
    backend = TorchBackend(model, slots=2, max_len=64, lean=True)
    assert backend._lean is None


@pytest.mark.skipif(not cpu_gemm.available(), reason="no cpu_gemm here")
def test_the_compiled_one_row_step_runs_the_kernels_and_equals_eager():
    """The `cpu-compiled` preset's path: under torch.compile the kernels (matmuls and decode attention, which writes
    the KV cache) are opaque ops, and the compiled 1-row step gives the eager step's logits and cache."""
    import torch._dynamo

    torch._dynamo.reset()
    _, model = tiny_llama(128)
    eager, compiled = (TorchBackend(copy.deepcopy(model), slots=2, max_len=128, lean=True, quantize="int4",
                                    compile_decode=c) for c in (False, True))
    assert compiled._lean.native_attention
    compiled.warm_up()
    for active, (e, c) in lockstep_decode([eager, compiled], {0: list(range(30, 60))}, [1] * 4):
        assert torch.equal(c[active], e[active])
    assert compiled.compiled
    # slot 0's 30 prompt and 4 decoded positions (warm_up wrote elsewhere in the compiled one's cache)
    assert all(torch.equal(a[0, :, :34], b[0, :, :34])
               for a, b in zip(eager.cache.k + eager.cache.v, compiled.cache.k + compiled.cache.v))
