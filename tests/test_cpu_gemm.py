"""worker/pipeline/cpu_gemm.py (+ cpu_gemm.c): the kernels compute exactly the scheme they claim (activations to two
levels of int8 per block of 32, integer sums, fp32 scales) for 4-bit and 8-bit weights; a row's result never depends
on the rows beside it, nor on the thread count; the worst-case integer sums do not overflow; the folded RMSNorm,
SwiGLU and residual give what torch's operations give; bad input is refused by name; a failed build falls back to
torch's kernels; torch.compile sees the kernels as one opaque op."""

import logging
import os

import pytest
import torch

from worker.pipeline import cpu_gemm
from worker.pipeline.cpu_gemm import ISAS
from worker.pipeline.fused_linear import rms_norm

pytestmark = pytest.mark.skipif(not cpu_gemm.buildable(), reason="needs x86-64 with AVX2 and a C compiler")
VNNI = pytest.mark.skipif(cpu_gemm.best_isa() != "avx512-vnni", reason="this CPU has no AVX512-VNNI")
ISAS_HERE = ["avx2", pytest.param("avx512-vnni", marks=VNNI)]


@pytest.fixture
def isa(request, monkeypatch):
    """Run the test on the build named by the parameter (CHAT_CPU_GEMM_ISA)."""
    monkeypatch.setenv("CHAT_CPU_GEMM_ISA", request.param)
    cpu_gemm.best_isa.cache_clear()
    assert cpu_gemm.best_isa() == request.param
    yield request.param
    monkeypatch.undo()
    cpu_gemm.best_isa.cache_clear()


def q8_levels(x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The kernel's activation quantization in torch: (M, K) -> two levels of (int values (M, K / 32, 32) as float,
    scales (M, K / 32, 1)): d = absmax / 127 for the first, d / 128 for the second, which quantizes what the first
    left over; in fp32 as the kernel computes it."""
    x = x.float().reshape(x.shape[0], -1, 32)
    d = x.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d > 0, 1 / d, 0)  # x * (1 / d) in fp32, as the kernel: x / d can round the other way
    q0 = torch.round(x * inverse)  # round half to even, as nearbyintf
    q1 = torch.round((x - q0 * d) * (inverse * 128))
    assert q1.abs().max() <= 64  # what is left is at most half a step of the first level
    return [(q0, d), (q1, d / 128)]


def q4_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Per block: scale * sum over levels of dx * sum(q * xq) + (zero - 8 scale) * sx, in float64 (exact sums)."""
    qb = q.double().reshape(q.shape[0], -1, 32)
    s, z = scale.double()[None], zero.double()[None]
    out, sx = 0, 0
    for xq, dx in q8_levels(x):
        dots = torch.einsum("mgk,ngk->mng", xq.double(), qb)  # exact: integers below 2^53
        out = out + s * dx[..., 0].double()[:, None, :] * dots
        sx = sx + (xq.sum(-1) * dx[..., 0]).double()[:, None, :]
    return (out + (z - 8 * s) * sx).sum(-1)


def random_q4(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    scale = (torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3).to(torch.bfloat16)
    zero = (torch.randn(n, k // 32, generator=g) * 0.05).to(torch.bfloat16)
    return q, scale, zero


@pytest.mark.parametrize("rows", [1, 3, 4, 8, 13])
def test_q4_computes_the_two_level_q8_1_scheme(rows):
    q, scale, zero = random_q4(48, 96)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    y = cpu_gemm.q4_mm(x, *cpu_gemm.q4_layout(q, scale, zero))
    assert y.shape == (rows, 48) and y.dtype == torch.bfloat16
    ref = q4_reference(x, q, scale, zero)
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-3)  # bf16 output: half an ulp is 2^-9
    w = (q - 8) * scale.float().repeat_interleave(32, 1) + zero.float().repeat_interleave(32, 1)
    exact = x.float() @ w.t()
    # two int8 levels: the activations' rounding is below bf16's own (one level alone costs ~0.6% here)
    assert ((y.float() - exact).norm() / exact.norm()).item() < 0.005


def test_q8_computes_the_two_level_q8_0_scheme():
    torch.manual_seed(1)
    w = torch.randint(-127, 128, (40, 64), dtype=torch.int8)
    scales = (torch.rand(40) * 0.01 + 1e-3).to(torch.bfloat16)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    y = cpu_gemm.q8_mm(x, cpu_gemm.q8_layout(w), scales)
    ref = sum((torch.einsum("mgk,ngk->mng", xq.double(), w.double().reshape(40, -1, 32))
               * dx[..., 0].double()[:, None, :]).sum(-1) for xq, dx in q8_levels(x)) * scales.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("isa", ISAS_HERE, indirect=True)
def test_worst_case_integer_sums_do_not_overflow(isa):
    """q = 15 and x at +127 in every position: the largest int16 partial sums the 4-bit AVX2 path keeps (30,480);
    the 8-bit path at +-127 in both, whose pairs would overflow int16 if summed over steps; -128 weights, whose
    magnitude only fits unsigned."""
    n, k = 16, 64
    x = torch.ones(2, k, dtype=torch.bfloat16)
    q = torch.full((n, k), 15)
    scale = torch.ones(n, k // 32, dtype=torch.bfloat16)
    y = cpu_gemm.q4_mm(x, *cpu_gemm.q4_layout(q, scale, torch.zeros_like(scale)))
    assert torch.equal(y.float(), torch.full((2, n), 7.0 * k))  # (15 - 8) * 1 per weight
    w = torch.full((n, k), -127, dtype=torch.int8)
    x8 = torch.full((2, k), -1.0, dtype=torch.bfloat16)
    y8 = cpu_gemm.q8_mm(x8, cpu_gemm.q8_layout(w), torch.ones(n, dtype=torch.bfloat16))
    assert torch.equal(y8.float(), torch.full((2, n), 127.0 * k))
    y8 = cpu_gemm.q8_mm(-x8, cpu_gemm.q8_layout(w - 1), torch.ones(n, dtype=torch.bfloat16))
    assert torch.equal(y8.float(), torch.full((2, n), -128.0 * k))


@VNNI
def test_the_avx512_vnni_build_gives_the_avx2_builds_bits(monkeypatch):
    """Integer sums are exact in both builds and the floating point is vectorized alike, so the faster build is a
    drop-in: same bits for every row count, both weight kinds and every fold."""
    torch.manual_seed(3)
    q, scale, zero = random_q4(64, 96, seed=5)
    q4 = cpu_gemm.q4_layout(q, scale, zero)
    q8 = (cpu_gemm.q8_layout(torch.randint(-128, 128, (64, 96), dtype=torch.int8)), torch.rand(64).to(torch.bfloat16))
    norm = (torch.rand(96) + 0.5).to(torch.bfloat16)
    results = {}
    for build in ISAS:
        monkeypatch.setenv("CHAT_CPU_GEMM_ISA", build)
        cpu_gemm.best_isa.cache_clear()
        torch.manual_seed(4)
        results[build] = [mm(torch.randn(rows, 192 if swiglu else 96, dtype=torch.bfloat16) * 4, *parts, norm=norm,
                             eps=1e-5, swiglu=swiglu, residual=torch.randn(rows, 64, dtype=torch.bfloat16))
                          for rows in (1, 2, 3, 4, 5, 8, 9) for swiglu in (False, True)
                          for mm, parts in ((cpu_gemm.q4_mm, q4), (cpu_gemm.q8_mm, q8))]
    cpu_gemm.best_isa.cache_clear()
    assert all(torch.equal(a, b) for a, b in zip(*results.values(), strict=True))


def test_an_isa_this_cpu_lacks_is_not_loaded(monkeypatch, caplog):
    monkeypatch.setenv("CHAT_CPU_GEMM_ISA", "avx512-vnni" if cpu_gemm.best_isa() == "avx2" else "sse9")
    cpu_gemm.best_isa.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_gemm.__name__):
            chosen = cpu_gemm.best_isa()
        assert "is not a build this CPU runs (avx2" in caplog.text and chosen in ISAS
    finally:
        monkeypatch.undo()
        cpu_gemm.best_isa.cache_clear()


def test_a_rows_result_does_not_depend_on_its_batch_nor_on_threads():
    q, scale, zero = random_q4(64, 128, seed=4)
    packed, sz = cpu_gemm.q4_layout(q, scale, zero)
    w8 = cpu_gemm.q8_layout(torch.randint(-127, 128, (64, 128), dtype=torch.int8))
    s8 = torch.rand(64).to(torch.bfloat16)
    x = torch.randn(11, 128, dtype=torch.bfloat16)
    for mm, parts in ((cpu_gemm.q4_mm, (packed, sz)), (cpu_gemm.q8_mm, (w8, s8))):
        alone = mm(x[6:7].contiguous(), *parts)
        for rows in range(7, 12):
            assert torch.equal(mm(x[:rows].contiguous(), *parts)[6:7], alone)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(mm(x, *parts), mm(x, *parts)) and torch.equal(mm(x[6:7].contiguous(), *parts), alone)
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("rows", [1, 8])
def test_fp32_outputs_are_the_sums_bf16_outputs_round(rows):
    """Logits come out fp32: the same sums, not rounded to bf16 (whose 8 bits made the default chat's first-token
    near-tie, 25.33 against 25.24 in fp32, an exact tie at 25.25 that the lower token id won)."""
    q, scale, zero = random_q4(48, 96, seed=6)
    q4 = cpu_gemm.q4_layout(q, scale, zero)
    q8 = (cpu_gemm.q8_layout(torch.randint(-127, 128, (48, 96), dtype=torch.int8)), torch.rand(48).to(torch.bfloat16))
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    for mm, parts in ((cpu_gemm.q4_mm, q4), (cpu_gemm.q8_mm, q8)):
        wide = mm(x, *parts, out_dtype=torch.float32)
        assert wide.dtype == torch.float32 and torch.equal(wide.to(torch.bfloat16), mm(x, *parts))
        assert not torch.equal(wide, wide.to(torch.bfloat16).float())  # finer than bf16
    with pytest.raises(ValueError, match="out_dtype must be bf16, or fp32 without a residual"):
        cpu_gemm.q8_mm(x, *q8, residual=torch.zeros(rows, 48, dtype=torch.bfloat16), out_dtype=torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        cpu_gemm.q8_mm(x, *q8, out_dtype=torch.float16)


def test_activations_too_small_to_scale_count_as_zeros():
    """A block whose scale's inverse would overflow fp32 (|x| below ~1e-36, bf16 subnormals) is zeros, not the
    undefined conversion of an infinity; the row's other blocks are unaffected."""
    q, scale, zero = random_q4(16, 64, seed=8)
    parts = cpu_gemm.q4_layout(q, scale, zero)
    for tiny in (1e-37, 1e-39, 1e-41):
        x = torch.full((1, 64), tiny, dtype=torch.bfloat16)
        assert torch.equal(cpu_gemm.q4_mm(x, *parts).float(), torch.zeros(1, 16))
        x[0, 32:] = torch.randn(32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        alone = x.clone()
        alone[0, :32] = 0
        assert torch.equal(cpu_gemm.q4_mm(x, *parts), cpu_gemm.q4_mm(alone, *parts))


def test_zero_activations_and_zero_rows():
    q, scale, zero = random_q4(16, 32)
    parts = cpu_gemm.q4_layout(q, scale, zero)
    assert torch.equal(cpu_gemm.q4_mm(torch.zeros(2, 32, dtype=torch.bfloat16), *parts).float(), torch.zeros(2, 16))
    assert cpu_gemm.q4_mm(torch.zeros(0, 32, dtype=torch.bfloat16), *parts).shape == (0, 16)


def test_layouts_refuse_what_the_kernels_would_misread():
    with pytest.raises(ValueError, match=r"q \(N, K\) in 0..15"):
        cpu_gemm.q4_layout(torch.full((8, 32), 16), torch.ones(8, 1), torch.zeros(8, 1))  # spills into a nibble
    with pytest.raises(ValueError, match="N a multiple of 8"):
        cpu_gemm.q4_layout(torch.zeros(12, 32, dtype=torch.long), torch.ones(12, 1), torch.zeros(12, 1))
    with pytest.raises(ValueError, match="K of 32"):
        cpu_gemm.q8_layout(torch.zeros(8, 40, dtype=torch.int8))
    parts = cpu_gemm.q4_layout(*random_q4(16, 32))
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        cpu_gemm.check_weights(5, *parts)
    with pytest.raises(ValueError, match="x must be"):
        cpu_gemm.q4_mm(torch._neg_view(torch.randn(2, 32, dtype=torch.bfloat16)), *parts)


def test_layouts_round_trip():
    w = torch.randint(-127, 128, (24, 96), dtype=torch.int8)
    assert torch.equal(cpu_gemm.q8_unlayout(cpu_gemm.q8_layout(w)), w)
    assert cpu_gemm.fits(24, 96) and not cpu_gemm.fits(20, 96) and not cpu_gemm.fits(24, 40)


@pytest.mark.parametrize("x", [torch.randn(2, 32), torch.randn(32, 2, dtype=torch.bfloat16).t(),
                               torch.randn(32, dtype=torch.bfloat16)])
def test_bad_activations_are_refused_by_name(x):
    parts = cpu_gemm.q4_layout(*random_q4(16, 32))
    with pytest.raises(ValueError, match="2-d contiguous bf16"):
        cpu_gemm.q4_mm(x, *parts)


def test_a_failed_build_names_the_compiler_and_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match=r"false \(from \$CC\) failed to build the CPU kernels \(exit status 1\): "
                       "no output"):
        cpu_gemm.build(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left to load
    (tmp_path / "a-file").write_text("")
    with pytest.raises(RuntimeError, match="a-file .CHAT_KERNEL_DIR. is not a writable directory"):
        cpu_gemm.build(tmp_path / "a-file")
    monkeypatch.setenv("CHAT_KERNEL_DIR", str(tmp_path))
    cpu_gemm.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_gemm.__name__):
            assert cpu_gemm.library() is None and not cpu_gemm.available()
        assert "torch's int4/int8 kernels instead" in caplog.text
    finally:
        cpu_gemm.library.cache_clear()
    monkeypatch.undo()
    assert cpu_gemm.available()  # rebuilt (or found) in the default place once the compiler is back


def test_torch_compile_sees_one_opaque_op():
    q, scale, zero = random_q4(32, 64)
    packed, sz = cpu_gemm.q4_layout(q, scale, zero)
    x = torch.randn(3, 64, dtype=torch.bfloat16)

    def f(x):
        return cpu_gemm.q4_mm(x * 2, packed, sz) + 1

    compiled = torch.compile(f, fullgraph=True, backend="eager")  # fullgraph: a graph break would raise
    assert torch.equal(compiled(x), f(x))


@pytest.mark.parametrize("fold", ["norm", "swiglu", "residual", "norm+residual"])
def test_folded_norm_swiglu_and_residual_equal_torchs_operations_then_the_kernel(fold):
    """What a decode layer does around its matmuls, folded into the kernel, gives what torch's operations give
    before (RMSNorm, SwiGLU) and after (the residual add) the plain kernel, in torch's bf16 roundings."""
    torch.manual_seed(9)
    q, scale, zero = random_q4(64, 96, seed=2)
    parts = cpu_gemm.q4_layout(q, scale, zero)
    rows = 5
    x = torch.randn(rows, 2 * 96 if "swiglu" in fold else 96, dtype=torch.bfloat16) * 3
    weight = (torch.rand(96) + 0.5).to(torch.bfloat16)
    residual = torch.randn(rows, 64, dtype=torch.bfloat16) if "residual" in fold else None
    fusion = {"swiglu": "swiglu" in fold, "residual": residual}
    if "norm" in fold:
        fusion |= {"norm": weight, "eps": 1e-5}
    folded = cpu_gemm.q4_mm(x, *parts, **fusion)
    x_in = x
    if "swiglu" in fold:
        x_in = torch.nn.functional.silu(x[:, :96]) * x[:, 96:]
    if "norm" in fold:
        x_in = rms_norm(x_in, weight, 1e-5)
    ref = cpu_gemm.q4_mm(x_in.contiguous(), *parts)
    if residual is not None:
        ref = residual + ref
    # exp and rsqrt may differ from torch's by an ulp of fp32, which moves a bf16 rounding now and then
    torch.testing.assert_close(folded.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert (folded == ref).float().mean() > 0.9


def test_folded_inputs_of_the_wrong_shape_are_refused_by_name():
    parts = cpu_gemm.q4_layout(*random_q4(16, 32))
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="64 columns"):
        cpu_gemm.q4_mm(x, *parts, swiglu=True)  # SwiGLU reads 2K columns
    with pytest.raises(ValueError, match="norm must be contiguous bf16"):
        cpu_gemm.q4_mm(x, *parts, norm=torch.ones(16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="residual must be contiguous bf16"):
        cpu_gemm.q4_mm(x, *parts, residual=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="32 columns"):
        cpu_gemm.q4_mm(torch.randn(2, 64, dtype=torch.bfloat16), *parts)  # K must match the weight


def test_old_builds_are_pruned_the_ones_in_use_kept(tmp_path):
    """Each source change adds a build: all but the last KEEP_BUILDS used are removed, a build loaded again
    counting as used."""
    for i in range(10):
        for suffix in (".so", ".sha256"):
            f = tmp_path / f"cpu_gemm-old{i}{suffix}"
            f.write_text("x")
            os.utime(f, (1_000_000 + i, 1_000_000 + i))
    os.utime(tmp_path / "cpu_gemm-old0.sha256")  # the oldest build, just loaded again
    path = cpu_gemm.build(tmp_path)
    left = sorted(f.name for f in tmp_path.glob("*.sha256"))
    assert len(left) == cpu_gemm.KEEP_BUILDS and path.with_suffix(".sha256").name in left
    assert "cpu_gemm-old0.sha256" in left and "cpu_gemm-old1.sha256" not in left
    assert sorted(f.name for f in tmp_path.glob("*.so")) == sorted(n.replace(".sha256", ".so") for n in left)


def test_a_damaged_library_is_rebuilt_not_loaded(tmp_path):
    """A library cut short (a full disk, a killed copy) could crash the process at load: it fails its checksum and
    is built again. $CC may carry arguments."""
    path = cpu_gemm.build(tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    assert cpu_gemm.build(tmp_path) == path and path.read_bytes() == good
    os.environ["CC"], cc = "env gcc", os.environ.get("CC")
    try:
        assert cpu_gemm.build(tmp_path / "with-args").exists()
    finally:
        os.environ.pop("CC") if cc is None else os.environ.__setitem__("CC", cc)


def test_a_nan_in_a_row_makes_that_rows_outputs_nan_and_no_other():
    q, scale, zero = random_q4(16, 64)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    x[1, 5] = float("nan")
    y = cpu_gemm.q4_mm(x, *cpu_gemm.q4_layout(q, scale, zero))
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()
    y8 = cpu_gemm.q8_mm(x, cpu_gemm.q8_layout(torch.ones(16, 64, dtype=torch.int8)), torch.ones(16).to(torch.bfloat16))
    assert y8[1].isnan().all() and not y8[[0, 2]].isnan().any()


def test_bad_weights_scales_and_devices_are_refused_by_name():
    packed, sz = cpu_gemm.q4_layout(*random_q4(16, 64))
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="scales must be contiguous bf16"):
        cpu_gemm.q4_mm(x, packed, sz[:1])
    with pytest.raises(ValueError, match="weight must be contiguous torch.uint8"):
        cpu_gemm.q4_mm(x, packed.to(torch.int8), sz)
    with pytest.raises(ValueError, match="5-d tiled layout"):
        cpu_gemm.q4_mm(x, packed.reshape(16, -1), sz)
    with pytest.raises(ValueError, match="on the CPU"):
        cpu_gemm.q4_mm(x.to("meta"), packed, sz)
    with pytest.raises(ValueError, match="weight must be contiguous torch.int8"):
        cpu_gemm.q8_mm(x, packed, torch.ones(16, dtype=torch.bfloat16))
