"""worker/pipeline/cpu_decode_layer.py (+ cpu_decode_layer.c): one call per layer does exactly what the five public
kernel calls do (q/k/v with the first norm, attention, o with the residual, gate/up with the second norm, down with
SwiGLU and the residual), bit for bit, hidden state and KV cache; layers that do not all run the kernels are not
taken; bad arguments and positions are refused by name before anything is written."""

import copy

import pytest
import torch

from tests.models import tiny_llama
from worker.pipeline import cpu_attention, cpu_gemm
from worker.pipeline.cpu_decode_layer import LayerKernels, decode_layers
from worker.pipeline.torch_backend import TorchBackend

pytestmark = pytest.mark.skipif(not cpu_gemm.buildable(), reason="needs x86-64 with AVX2 and a C compiler")


@pytest.fixture(scope="module")
def lean():
    """The lean forward of a tiny Llama with int4 layers on the kernels (2 layers, 4 heads, 2 KV heads)."""
    _, model = tiny_llama(128)
    backend = TorchBackend(copy.deepcopy(model), slots=4, max_len=64, lean=True, quantize="int4")
    assert backend._lean.layer_kernels is not None
    return backend._lean


def five_calls(h, layer: LayerKernels, heads, kv_heads, cos, sin, rot, write, k, v, scale):
    """The layer's step through the public, checked kernel calls."""
    def mm(p, x, **fusion):
        bits, w, s = p.kernel_parts()
        return (cpu_gemm.q4_mm if bits == 4 else cpu_gemm.q8_mm)(x, w, s, **fusion)
    qkv = mm(layer.qkv, h, norm=layer.norm1, eps=layer.eps)
    o = cpu_attention.decode_attention(qkv, heads, kv_heads, cos, sin, rot, write, k, v, scale)
    h = mm(layer.o, o, residual=h)
    gate_up = mm(layer.gate_up, h, norm=layer.norm2, eps=layer.eps)
    return mm(layer.down, gate_up, swiglu=True, residual=h)


def inputs(lean, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    caches = [(torch.randn(4, lean.kv_heads, 65, lean.head_dim, generator=g).bfloat16(),
               torch.randn(4, lean.kv_heads, 65, lean.head_dim, generator=g).bfloat16()) for _ in lean.layer_kernels]
    h = torch.randn(rows, lean.hidden, generator=g).bfloat16()
    rot = torch.tensor([5, 17, 40, 0][:rows])
    write = torch.tensor([5, 17, 40, 64][:rows])  # the fourth row idle: the scratch column
    return h, rot, write, caches


@pytest.mark.parametrize("rows", [1, 4])
def test_one_call_per_layer_gives_the_five_calls_bits(lean, rows):
    h, rot, write, caches = inputs(lean, rows)
    ref_h, ref_caches = h.clone(), [(k.clone(), v.clone()) for k, v in caches]
    for layer, (k, v) in zip(lean.layer_kernels, ref_caches):
        ref_h = five_calls(ref_h, layer, lean.heads, lean.kv_heads, lean.cos, lean.sin, rot, write, k, v, lean.scale)
    out = decode_layers(h, lean.layer_kernels, lean.heads, lean.kv_heads, lean.cos, lean.sin, rot, write, caches,
                        lean.scale)
    assert out is h and torch.equal(h, ref_h)  # in place
    assert all(torch.equal(a, b) for pair, ref in zip(caches, ref_caches) for a, b in zip(pair, ref))


def test_bad_arguments_and_positions_are_refused_with_nothing_written(lean):
    h, rot, write, caches = inputs(lean, 2, seed=1)
    before = h.clone(), [(k.clone(), v.clone()) for k, v in caches]

    def call(**change):
        args = dict(h=h, layers=lean.layer_kernels, heads=lean.heads, kv_heads=lean.kv_heads, cos=lean.cos,
                    sin=lean.sin, rot=rot, write=write, caches=caches, scale=lean.scale) | change
        return decode_layers(**args)
    with pytest.raises(ValueError, match="h must be contiguous bf16"):
        call(h=h.float())
    with pytest.raises(ValueError, match="h must be"):
        call(h=h[:, :-8].contiguous())
    with pytest.raises(ValueError, match="rot must be contiguous torch.int64"):
        call(rot=rot.int())
    with pytest.raises(ValueError, match="shapes do not match the attention's heads"):
        call(heads=lean.heads * 2, kv_heads=lean.kv_heads * 2)
    with pytest.raises(ValueError, match="layer 1's caches or projections differ"):
        call(caches=[caches[0], (caches[1][0][:, :, :32].contiguous(), caches[1][1])])
    with pytest.raises(ValueError, match="layer 1's caches or projections differ"):
        call(caches=[caches[0], (caches[1][0], caches[1][1].transpose(2, 3))])
    with pytest.raises(ValueError, match="layer 1's caches or projections differ"):
        call(caches=[caches[0], (caches[1][0].to("meta"), caches[1][1].to("meta"))])  # no memory to write to
    with pytest.raises(ValueError, match="position outside"):
        call(rot=torch.tensor([5, 64]))  # the tables hold 64 positions
    with pytest.raises(ValueError, match="position outside"):
        call(write=torch.tensor([5, 65]))
    assert torch.equal(h, before[0])
    assert all(torch.equal(a, b) for pair, ref in zip(caches, before[1]) for a, b in zip(pair, ref))


def test_only_layers_whose_projections_all_run_the_kernels_are_taken(lean):
    layer = lean.layer_kernels[0]
    parts = layer.qkv, layer.o, layer.gate_up, layer.down
    assert LayerKernels.fits(*parts)
    assert not LayerKernels.fits(layer.qkv, layer.o, layer.gate_up, layer.gate_up)  # down must read inter
    torchs = copy.copy(layer.down)
    torchs.native = False
    assert not LayerKernels.fits(layer.qkv, layer.o, layer.gate_up, torchs)
    with pytest.raises(ValueError, match="norm2 must be contiguous bf16"):
        LayerKernels(*parts, layer.norm1, layer.norm2.float(), layer.eps)
    with pytest.raises(ValueError, match="the four projections must run the kernels"):  # down would be read past
        LayerKernels(layer.qkv, layer.o, layer.o, layer.o, layer.norm1, layer.norm2, layer.eps)
    _, model = tiny_llama(128)
    for kernels in ("torch", "auto"):
        be = TorchBackend(copy.deepcopy(model), slots=2, max_len=64, lean=True, quantize="int4" if kernels == "torch"
                          else "none", cpu_gemm=kernels)
        assert be._lean.layer_kernels is None  # torch's kernels; or fp32 activations (no quantized layers)


def test_heads_the_attention_kernel_does_not_take_keep_torchs_attention():
    """A head_dim that is not a multiple of 8 (12 here) leaves the layer calls off: decode runs torch's attention
    and answers, instead of failing every step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from worker.pipeline.backend import Prefill

    cfg = LlamaConfig(vocab_size=272, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2)
    be = TorchBackend(LlamaForCausalLM(cfg).eval(), slots=2, max_len=32, lean=True, quantize="int8")
    assert be._lean.layer_kernels is None and any(getattr(m, "native", False) for m in be.model.modules())
    be.prefill([Prefill(0, [1, 2, 3], 0)])
    logits = be.decode(torch.tensor([4]), torch.tensor([3]), torch.tensor([True]))
    assert logits.shape == (1, 272) and logits.isfinite().all()
    with pytest.raises(ValueError, match="3 rows, but the backend has 2 slots"):
        be.decode(torch.tensor([4, 4, 4]), torch.tensor([3, 3, 3]), torch.tensor([True, True, True]))
