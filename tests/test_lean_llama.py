"""worker/pipeline/lean_llama.py: the lean forward gives transformers' logits (fp32, the Llama-shaped twin with
grouped-query attention), prefill and decode, dynamic and static decode, and with int8 and int4 weights (fused or
not); the engine's replies are the same with it, batched or alone; a model it does not implement keeps
transformers' modules."""

import copy
import logging

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
    """With the project's kernels: the matmuls, and each decode step as one kernel call per layer (decode_layers;
    prompts keep SDPA)."""
    _, model = tiny_llama(hidden)
    backends = [TorchBackend(copy.deepcopy(model), slots=4, max_len=128, lean=lean, quantize=quantize,
                             cpu_gemm=kernels) for lean in (False, True)]
    native = kernels == "auto" and cpu_gemm.available()
    assert (backends[1]._lean.layer_kernels is not None) == native
    calls = []
    real = lean_llama.decode_layers
    monkeypatch.setattr(lean_llama, "decode_layers", lambda h, *a, **k: calls.append(h.shape[0]) or real(h, *a, **k))
    # hidden 64: q/k/v are not whole blocks of torch's int4 packing, so only cpu_gemm's tiles fuse them
    fused = quantize == "int8" or hidden == 128 or native
    assert isinstance(backends[1]._lean.qkv[0], Concatenated) != fused
    for active, (hf, lean) in lockstep_decode(backends, PROMPTS, [4, 4, 2, 4, 1]):
        # bf16 activations: one rounding apart where the two orders of operations differ
        torch.testing.assert_close(lean[active], hf[active], rtol=0.02, atol=0.05)
        assert torch.equal(lean[active].argmax(-1), hf[active].argmax(-1))
    widths = [4, 4, 2, 4, 1]
    assert calls == (widths if native else [])  # one call a decode step, for every layer


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
def test_compile_decode_leaves_the_kernels_step_eager_and_compiles_torchs(caplog):
    """`cpu-compiled` on the project's kernels: the 1-row step is not compiled (custom-op calls made it ~2x slower
    than eager), and says so; on torch's kernels it still is. Under torch.compile the kernels themselves are opaque
    ops (tests/test_cpu_gemm.py, tests/test_cpu_attention.py)."""
    _, model = tiny_llama(128)
    with caplog.at_level(logging.INFO, logger="worker.pipeline.torch_backend"):
        ours = TorchBackend(copy.deepcopy(model), slots=2, max_len=128, lean=True, quantize="int4",
                            compile_decode=True)
    assert ours._lean.layer_kernels is not None and not ours.compiled and ours._one_row is None
    assert "not compiling the 1-row step, it runs the project's CPU kernels" in caplog.text
    torchs = TorchBackend(copy.deepcopy(model), slots=2, max_len=128, lean=True, quantize="int4",
                          compile_decode=True, cpu_gemm="torch")
    assert torchs.compiled and torchs._one_row is not None
