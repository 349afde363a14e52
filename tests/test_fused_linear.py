"""worker/pipeline/fused_linear.py: one matmul for q/k/v (gate/up) gives each part's output, for every layer kind;
the parts keep working on views of the fused weights (nothing held twice); int4 parts that torch's packing cannot
concatenate fall back to separate calls; layers that cannot be fused are refused by name."""

import pytest
import torch
from torch import nn

from worker.pipeline import cpu_gemm
from worker.pipeline.fused_linear import Concatenated, fuse_linears
from worker.pipeline.quantize import PACK_BLOCK_N, Int4WeightOnlyLinear, Int8WeightOnlyLinear


def parts(kind: str, sizes: list[int], in_features: int = 128) -> list[nn.Module]:
    """kind: fp32, int8 or int4, with "-torch" for torch's kernels' layouts (else cpu_gemm's where built)."""
    torch.manual_seed(11)
    linears = [nn.Linear(in_features, n, bias=False) for n in sizes]
    if kind == "fp32":
        return linears
    layer = Int8WeightOnlyLinear if kind.startswith("int8") else Int4WeightOnlyLinear
    native = False if kind.endswith("-torch") else None
    return [layer(lin, torch.bfloat16, gemv_rows=8, native=native) for lin in linears]


def run(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer.mm(x) if hasattr(layer, "mm") else layer(x)


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("kind", ["fp32", "int8", "int4", "int8-torch", "int4-torch"])
@pytest.mark.parametrize("rows", [1, 8, 40])  # 40 > gemv_rows: the prompt path of the quantized kinds
def test_the_fused_matmul_is_the_parts_side_by_side(kind, rows):
    layers = parts(kind, [128, 64, 64])
    x = torch.randn(rows, 128, dtype=torch.float32 if kind == "fp32" else torch.bfloat16)
    separate = torch.cat([run(p, x) for p in layers], -1)
    fused = fuse_linears(layers)
    assert not isinstance(fused, Concatenated)
    torch.testing.assert_close(run(fused, x), separate, rtol=1e-5, atol=1e-5)
    # the parts still give their own outputs, now from views of the fused weights
    torch.testing.assert_close(torch.cat([run(p, x) for p in layers], -1), separate, rtol=1e-5, atol=1e-5)
    big = "packed" if kind.startswith("int4") else "weight"
    assert {storage(getattr(p, big)) for p in layers} == {storage(getattr(fused, big))}


def test_torchs_int4_packing_concatenates_in_blocks_of_pack_block_n():
    """fuse_linears concatenates packed int4 weights: that holds only for parts of whole packing blocks, 64 rows
    with AVX-512 and 32 with AVX2 (both divide PACK_BLOCK_N)."""
    torch.manual_seed(5)
    qs = [torch.randint(0, 16, (n, 64), dtype=torch.int32) for n in (PACK_BLOCK_N, 2 * PACK_BLOCK_N)]
    packed = [torch._convert_weight_to_int4pack_for_cpu(q, 1) for q in qs]
    assert torch.equal(torch.cat(packed), torch._convert_weight_to_int4pack_for_cpu(torch.cat(qs), 1))
    block = 64 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 32
    halves = [q[: block // 2] for q in qs]
    assert not torch.equal(torch.cat([torch._convert_weight_to_int4pack_for_cpu(q, 1) for q in halves]),
                           torch._convert_weight_to_int4pack_for_cpu(torch.cat(halves), 1))


def test_int4_parts_off_the_packing_block_run_side_by_side():
    layers = parts("int4-torch", [64, 32, 32])
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    fused = fuse_linears(layers)
    assert isinstance(fused, Concatenated)
    assert torch.equal(fused.mm(x), torch.cat([p.mm(x) for p in layers], -1))


@pytest.mark.skipif(not cpu_gemm.available(), reason="no cpu_gemm here")
def test_cpu_gemm_tiles_fuse_at_any_multiple_of_the_tile_and_mixed_layouts_run_side_by_side():
    layers = parts("int4", [64, 32, 32])  # off torch's packing block, whole cpu_gemm tiles
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    separate = torch.cat([p.mm(x) for p in layers], -1)
    fused = fuse_linears(layers)
    assert not isinstance(fused, Concatenated) and torch.equal(fused.mm(x), separate)
    mixed = parts("int8", [16]) + parts("int8-torch", [16])
    assert isinstance(fuse_linears(mixed), Concatenated)


@pytest.mark.parametrize("layers, match", [
    (lambda: [nn.Linear(32, 16, bias=False), Int8WeightOnlyLinear(nn.Linear(32, 16, bias=False), torch.bfloat16)],
     "one kind"),
    (lambda: [nn.Linear(32, 16), nn.Linear(32, 16)], "without bias"),
    (lambda: [nn.Linear(32, 16, bias=False), nn.Linear(48, 16, bias=False)], "same in_features"),
    (lambda: [nn.Conv1d(4, 4, 1)], "one kind"),
])
def test_layers_that_cannot_be_fused_are_refused(layers, match):
    with pytest.raises(ValueError, match=match):
        fuse_linears(layers())
