"""worker/pipeline/quantize.py: weight-only int8 and int4 (the `cpu` preset), on torch's kernels and on cpu_gemm's
(`native`). Close to fp32; int4 gives a Q4_1 model's weights back as the file has them; decode rows never depend on
their batch mates; prompt chunks take a GEMM where one is kept, which agrees; layers the int4 kernel does not take,
and the output head, stay int8."""

import copy

import pytest
import torch
from torch import nn

from shared.codec import Codec
from shared.sampling import SamplingParams
from tests.test_engine import final, prompts
from worker.engine.engine import Engine
from worker.pipeline import cpu_gemm
from worker.pipeline.quantize import GROUP, REFINE_TOP, Int4WeightOnlyLinear, Int8WeightOnlyLinear, quantize_weights
from worker.pipeline.torch_backend import TorchBackend

KERNELS = [False, pytest.param(True, marks=pytest.mark.skipif(not cpu_gemm.available(), reason="no cpu_gemm here"))]


@pytest.fixture(params=KERNELS, ids=["torch", "cpu_gemm"])
def native(request) -> bool:
    return request.param


def spy(monkeypatch, owner, name: str) -> list[int]:
    """Record the row count of every call to owner.name."""
    calls: list[int] = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(next(a for a in args if isinstance(a, torch.Tensor)).shape[0])  # x: the first tensor
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.fixture()
def linear() -> nn.Linear:
    torch.manual_seed(3)
    return nn.Linear(96, 160)


def test_int8_is_close_to_fp32(linear, native):
    x = torch.randn(4, 96)
    q = Int8WeightOnlyLinear(linear, torch.bfloat16, gemv_rows=8, native=native)
    assert q.native == native
    err = (q(x).float() - linear(x)).norm() / linear(x).norm()
    assert err < 0.02  # int8 weights + bf16 activations; a wrong scale or transpose is off by ~1


def test_decode_rows_do_not_depend_on_their_batch(linear, native, monkeypatch):
    calls = spy(monkeypatch, cpu_gemm, "layer_mm") if native else spy(monkeypatch, torch, "_weight_int8pack_mm")
    q = Int8WeightOnlyLinear(linear, torch.bfloat16, gemv_rows=8, native=native)
    x = torch.randn(8, 96)
    alone = q(x[3:4])[0]
    for rows in (4, 6, 8):
        assert torch.equal(q(x[:rows])[3], alone)
    assert calls and max(calls) <= 8  # every call up to gemv_rows took the per-row kernel


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_prompt_chunks_take_the_dequantized_gemm_where_it_pays_and_agree(linear, native, fast_bf16, monkeypatch):
    monkeypatch.setattr(cpu_gemm, "fast_bf16_gemm", lambda: fast_bf16)
    q = Int8WeightOnlyLinear(linear, torch.bfloat16, gemv_rows=8, native=native)
    x = torch.randn(64, 96)
    per_row = torch.cat([q(x[i : i + 8]) for i in range(0, 64, 8)])  # 8 rows at a time: the per-row kernel
    calls = spy(monkeypatch, cpu_gemm, "layer_mm") if native else spy(monkeypatch, torch, "_weight_int8pack_mm")
    gemm = q(x)
    if native and not fast_bf16:  # no fast bf16 GEMM on this CPU: cpu_gemm serves the chunk too, row by row
        assert calls == [64] and torch.equal(gemm, per_row)
    else:
        assert calls == []  # 64 rows > gemv_rows: no per-row kernel
        torch.testing.assert_close(gemm.float(), per_row.float(), rtol=0.02, atol=0.02)


def q4_1_weights(out_f: int, in_f: int) -> torch.Tensor:
    """Weights as a Q4_1 GGUF dequantizes to: per block of 32, w = q * d + m with fp16 d and m, and the block's
    min and max present (q = 0 and q = 15), as ggml's quantize_row_q4_1 leaves every block."""
    torch.manual_seed(21)
    blocks = out_f * in_f // GROUP
    q = torch.randint(0, 16, (blocks, GROUP)).float()
    q[:, 0], q[:, 1] = 0, 15
    d = (torch.rand(blocks, 1) * 0.02 + 1e-3).half().float()
    m = (torch.randn(blocks, 1) * 0.05).half().float()
    return (q * d + m).reshape(out_f, in_f)


def test_int4_gives_a_q4_1_models_weights_back_closer_than_int8():
    w = q4_1_weights(128, 256)
    lin = nn.Linear(256, 128, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    err4 = ((Int4WeightOnlyLinear(lin, torch.bfloat16).weight.float() - w).norm() / w.norm()).item()
    int8 = Int8WeightOnlyLinear(lin, torch.bfloat16)
    err8 = ((int8.int8_weight().float() * int8.scales.float()[:, None] - w).norm() / w.norm()).item()
    assert err4 < 3e-3 < err8  # bf16 rounding of the scale and minimum only; per-channel int8 rounds every weight
    torch.manual_seed(2)
    off_grid = torch.randn(128, 256) * 0.05
    with torch.no_grad():
        lin.weight.copy_(off_grid)
    err_off = ((Int4WeightOnlyLinear(lin, torch.bfloat16).weight.float() - off_grid).norm() / off_grid.norm()).item()
    assert err_off > 10 * err4  # weights off a 4-bit grid do lose precision: the first check can fail


@pytest.fixture()
def linear4() -> nn.Linear:
    torch.manual_seed(3)
    return nn.Linear(96, 160)  # with a bias: GPT-NeoX's layers have one


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_int4_is_close_to_its_dequantized_weight_and_to_fp32(linear4, native, fast_bf16, monkeypatch):
    monkeypatch.setattr(cpu_gemm, "fast_bf16_gemm", lambda: fast_bf16)
    q = Int4WeightOnlyLinear(linear4, torch.bfloat16, gemv_rows=8, native=native)
    assert (q.dense is None) == (native and not fast_bf16)  # the dense copy only where it serves prompts
    x = torch.randn(5, 96)
    ref = linear4(x).detach()
    y = q(x.to(torch.bfloat16)).float()
    dense = (x.to(torch.bfloat16) @ q.weight.t() + q.bias).float()
    torch.testing.assert_close(y, dense, rtol=0.03, atol=0.03)  # the kernel and the prompt path read one weight
    assert ((y - ref).norm() / ref.norm()).item() < 0.15  # 4 bits of random weights; a wrong layout is off by ~1


def test_int4_tiles_dequantize_to_the_same_weight_as_torchs_layout(linear4):
    if not cpu_gemm.available():
        pytest.skip("no cpu_gemm here")
    ours = Int4WeightOnlyLinear(linear4, torch.bfloat16, native=True)
    torchs = Int4WeightOnlyLinear(linear4, torch.bfloat16, native=False)
    assert torch.equal(ours.dequantized(), torchs.dense)


def test_int4_decode_rows_do_not_depend_on_their_batch_and_prompts_take_the_dense_gemm(linear4, native, monkeypatch):
    monkeypatch.setattr(cpu_gemm, "fast_bf16_gemm", lambda: True)
    q = Int4WeightOnlyLinear(linear4, torch.bfloat16, gemv_rows=8, native=native)
    calls = spy(monkeypatch, cpu_gemm, "layer_mm") if native else spy(monkeypatch, torch, "_weight_int4pack_mm_for_cpu")
    x = torch.randn(64, 96, dtype=torch.bfloat16)
    alone = q(x[3:4])[0]
    for rows in (4, 5, 8):
        assert torch.equal(q(x[:rows])[3], alone)
    assert calls and max(calls) <= 8
    calls.clear()
    chunk = q(x)  # 64 rows > gemv_rows: the dense GEMM
    assert calls == []
    torch.testing.assert_close(chunk[:8].float(), q(x[:8]).float(), rtol=0.03, atol=0.03)


def test_int4_keeps_int8_for_the_head_and_for_layers_its_kernel_does_not_take(tiny):
    model = quantize_weights(copy.deepcopy(tiny.model), 4, gemv_rows=8)
    assert isinstance(model.get_output_embeddings(), Int8WeightOnlyLinear)
    assert any(isinstance(m, Int4WeightOnlyLinear) for m in model.modules())
    odd = nn.Sequential(nn.Linear(40, 64), nn.Linear(64, 24))  # in 40: not whole groups; out 24: not 16s
    quantize_weights(odd, 4)
    assert [type(m) for m in odd] == [Int8WeightOnlyLinear, Int8WeightOnlyLinear]
    with pytest.raises(ValueError, match="4 or 8 bits"):
        quantize_weights(nn.Sequential(nn.Linear(32, 32)), 3)
    with pytest.raises(ValueError, match="in_features a multiple of 32"):
        Int4WeightOnlyLinear(nn.Linear(40, 64), torch.bfloat16)


@pytest.mark.parametrize("kernels", KERNELS)
def test_the_heads_logits_come_out_fp32(tiny, kernels):
    """Logits in fp32 whatever the path, the top of each row finer than bf16 (bf16's 8 bits make near-ties exact
    ties, which then go to the lower token id): the project's kernel writes its fp32 sums; on torch's kernels each
    row's top REFINE_TOP are recomputed in fp32, the rest stays torch's bf16 result."""
    model = quantize_weights(copy.deepcopy(tiny.model), 4, gemv_rows=8, native=kernels)
    head = model.get_output_embeddings()
    x = torch.randn(3, head.in_features, dtype=torch.bfloat16)
    logits = head(x)
    assert logits.dtype == torch.float32 and logits.shape == (3, head.out_features)
    exact = (x.float() @ head.int8_weight().float().t()) * head.scales.float()
    top = exact.topk(REFINE_TOP, dim=-1).indices
    assert not torch.equal(logits.gather(-1, top).to(torch.bfloat16).float(), logits.gather(-1, top))
    if kernels:  # two int8 levels of the activations: ~15 bits
        torch.testing.assert_close(logits, exact, rtol=1e-3, atol=1e-2)
    else:
        torch.testing.assert_close(logits.gather(-1, top), exact.gather(-1, top), rtol=1e-5, atol=1e-5)
        rest = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, top, False)
        assert torch.equal(logits[rest].to(torch.bfloat16).float(), logits[rest])  # torch's, as they were
    body = [m for m in model.modules() if isinstance(m, Int4WeightOnlyLinear | Int8WeightOnlyLinear) and m is not head]
    assert body and all(m(torch.randn(2, m.in_features, dtype=torch.bfloat16)).dtype == torch.bfloat16 for m in body)


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_engine_batched_replies_equal_each_alone(tiny, quantize, kernels):
    """The `cpu` preset's promise: a greedy reply does not depend on what shares its batch."""
    model = copy.deepcopy(tiny.model)
    codec = Codec(tiny.tokenizer, tiny.preset.prompt_format, tiny.preset.end_keys)
    codec.end_ids = set()
    backend = TorchBackend(model, slots=8, max_len=256, quantize=quantize, cpu_gemm=kernels)
    assert any(getattr(m, "native", False) for m in model.modules()) == (kernels == "auto" and cpu_gemm.available())
    eng = Engine(backend, codec).start()
    greedy = SamplingParams(temperature=0)
    try:
        ps = prompts(codec)
        alone = [final(eng.submit(p, greedy, 24)).token_ids for p in ps]
        handles = [eng.submit(p, greedy, 24) for p in ps]
        assert [final(h).token_ids for h in handles] == alone
        assert len({tuple(a) for a in alone}) > 1  # different prompts, different replies: the test can fail
    finally:
        eng.stop()
