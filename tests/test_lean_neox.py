"""worker/pipeline/lean_neox.py: the lean GPT-NeoX forward gives transformers' logits (fp32 tiny-neox: partial rotary,
parallel residual; and a sequential-residual, full-rotary variant), prefill and decode, dynamic and static decode,
and with int8 and int4 weights; the engine's replies are the same with it, batched or alone."""

import copy

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from shared.sampling import SamplingParams
from tests.models import engine_for, lockstep_decode
from worker.pipeline import lean_neox
from worker.pipeline.torch_backend import TorchBackend

GREEDY = SamplingParams(temperature=0)
PROMPTS = {0: list(range(30, 70)), 1: [5, 9, 11], 3: list(range(100, 117))}


def sequential_full_rotary() -> GPTNeoXForCausalLM:
    cfg = GPTNeoXConfig(vocab_size=272, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, rotary_pct=1.0, use_parallel_residual=False, hidden_act="gelu_new")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        return GPTNeoXForCausalLM(cfg).eval()


@pytest.mark.parametrize("which", ["tiny-neox", "sequential"])
@pytest.mark.parametrize("static", [False, True])
def test_lean_logits_equal_transformers_on_prefill_and_every_decode_width(tiny, which, static):
    model = tiny.model if which == "tiny-neox" else sequential_full_rotary()
    backends = [TorchBackend(copy.deepcopy(model), slots=4, max_len=128, lean=lean, cuda_graphs=static)
                for lean in (False, True)]
    assert backends[0]._lean is None and isinstance(backends[1]._lean, lean_neox.LeanNeoX)
    for active, (hf, lean) in lockstep_decode(backends, PROMPTS, [4, 4, 2, 4, 1]):
        assert torch.allclose(hf[active], lean[active], atol=1e-4), (hf[active] - lean[active]).abs().max()


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_lean_logits_equal_transformers_with_quantized_weights(tiny, quantize, kernels):
    backends = [TorchBackend(copy.deepcopy(tiny.model), slots=4, max_len=128, lean=lean, quantize=quantize,
                             cpu_gemm=kernels) for lean in (False, True)]
    for active, (hf, lean) in lockstep_decode(backends, PROMPTS, [4, 4, 2, 4, 1]):
        torch.testing.assert_close(lean[active], hf[active], rtol=0.02, atol=0.05)  # bf16 activations
        assert torch.equal(lean[active].argmax(-1), hf[active].argmax(-1))


def test_the_engines_greedy_int4_replies_are_the_same_batched_or_alone_and_as_transformers(tiny):
    prompts = [list(range(40 + i, 60 + 2 * i)) for i in range(6)]
    replies = {}
    for lean in (False, True):
        eng = engine_for(copy.deepcopy(tiny.model), tiny.tokenizer, slots=4, lean=lean, quantize="int4")
        try:
            alone = [list(eng.submit(p, GREEDY, 24))[-1].token_ids for p in prompts]
            handles = [eng.submit(p, GREEDY, 24) for p in prompts]
            assert [list(h)[-1].token_ids for h in handles] == alone
        finally:
            eng.stop()
        replies[lean] = alone
    assert replies[True] == replies[False] and len({tuple(r) for r in replies[True]}) > 1
