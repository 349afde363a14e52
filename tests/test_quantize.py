"""worker/pipeline/quantize.py: weight-only int8 (the `cpu` preset). Close to fp32; decode rows
never depend on their batch mates; prompt chunks take the dequantized GEMM, which agrees."""

import copy

import pytest
import torch
from torch import nn

from shared.codec import Codec
from shared.sampling import SamplingParams
from tests.test_engine import final, prompts
from worker.engine.engine import Engine
from worker.pipeline.quantize import Int8WeightOnlyLinear
from worker.pipeline.torch_backend import TorchBackend


@pytest.fixture()
def linear() -> nn.Linear:
    torch.manual_seed(3)
    return nn.Linear(96, 160)


def counting_int8pack(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = torch._weight_int8pack_mm

    def spy(x, w, s):
        calls.append(x.shape[0])
        return real(x, w, s)

    monkeypatch.setattr(torch, "_weight_int8pack_mm", spy)
    return calls


def test_int8_is_close_to_fp32(linear):
    x = torch.randn(4, 96)
    q = Int8WeightOnlyLinear(linear, torch.bfloat16, gemv_rows=8)
    err = (q(x).float() - linear(x)).norm() / linear(x).norm()
    assert err < 0.02  # int8 weights + bf16 activations; a wrong scale or transpose is off by ~1


def test_decode_rows_do_not_depend_on_their_batch(linear, monkeypatch):
    calls = counting_int8pack(monkeypatch)
    q = Int8WeightOnlyLinear(linear, torch.bfloat16, gemv_rows=8)
    x = torch.randn(8, 96)
    alone = q(x[3:4])[0]
    for rows in (4, 6, 8):
        assert torch.equal(q(x[:rows])[3], alone)
    assert calls and max(calls) <= 8  # every call up to gemv_rows took the per-row kernel


def test_prompt_chunks_take_the_dequantized_gemm_and_agree(linear, monkeypatch):
    q = Int8WeightOnlyLinear(linear, torch.bfloat16, gemv_rows=8)
    x = torch.randn(64, 96)
    per_row = torch.cat([q(x[i : i + 8]) for i in range(0, 64, 8)])  # 8 rows at a time: int8pack
    calls = counting_int8pack(monkeypatch)
    gemm = q(x)
    assert calls == []  # 64 rows > gemv_rows: no int8pack call
    torch.testing.assert_close(gemm.float(), per_row.float(), rtol=0.02, atol=0.02)


def test_int8_engine_batched_replies_equal_each_alone(tiny):
    """The `cpu` preset's promise: a greedy reply does not depend on what shares its batch."""
    model = copy.deepcopy(tiny.model)
    codec = Codec(tiny.tokenizer, tiny.preset.prompt_format, tiny.preset.end_keys)
    codec.end_ids = set()
    eng = Engine(TorchBackend(model, slots=8, max_len=256, quantize="int8"), codec).start()
    greedy = SamplingParams(temperature=0)
    try:
        ps = prompts(codec)
        alone = [final(eng.submit(p, greedy, 24)).token_ids for p in ps]
        handles = [eng.submit(p, greedy, 24) for p in ps]
        assert [final(h).token_ids for h in handles] == alone
        assert len({tuple(a) for a in alone}) > 1  # different prompts, different replies: the test can fail
    finally:
        eng.stop()
