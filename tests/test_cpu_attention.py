"""worker/pipeline/cpu_attention.py (+ cpu_attention.c): one call does what the lean forward's torch operations do
for a decode step's attention: the cache gets torch's rotated keys and the values bit for bit, the output is torch's
SDPA over each row's positions (to fp32 rounding, then bf16); a row's result depends on that row alone; idle rows
write only the scratch column; bad arguments and positions are refused by name with nothing written; under
torch.compile it is one op that mutates the caches."""

import pytest
import torch
import torch.nn.functional as F

from worker.pipeline import cpu_attention, cpu_gemm
from worker.pipeline.rotary import rotate

pytestmark = pytest.mark.skipif(not cpu_gemm.buildable(), reason="needs x86-64 with AVX2 and a C compiler")

MAX_LEN = 48


def tables(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary.py-shaped tables (cos, sin_signed), (MAX_LEN, d) bf16."""
    freqs = torch.outer(torch.arange(MAX_LEN).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat((freqs, freqs), -1)
    sin = emb.sin()
    half = d // 2
    return emb.cos().bfloat16(), torch.cat((-sin[:, :half], sin[:, half:]), -1).bfloat16()


def caches(slots: int, kv_heads: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (slots, kv_heads, MAX_LEN + 1, d)
    return torch.randn(shape, generator=g).bfloat16(), torch.randn(shape, generator=g).bfloat16()


def torch_path(qkv, heads, kv_heads, cos, sin, rot, write, k, v, scale):
    """The lean forward's torch operations for the same step: rotate q and k, write k and v, SDPA over 0..rot."""
    rows, d = qkv.shape[0], k.shape[-1]
    x = qkv.view(rows, -1, d)
    qk = rotate(x[:, : heads + kv_heads], cos[rot].unsqueeze(1), sin[rot].unsqueeze(1))
    for r in range(rows):
        k[r, :, write[r]] = qk[r, heads:]
        v[r, :, write[r]] = x[r, heads + kv_heads:]
    mask = (torch.arange(MAX_LEN + 1) <= rot[:, None]).view(rows, 1, 1, -1)
    q = qk[:, :heads].reshape(rows, kv_heads, heads // kv_heads, d)
    o = F.scaled_dot_product_attention(q, k[:rows], v[:rows], attn_mask=mask, scale=scale)
    return o.reshape(rows, heads * d)


@pytest.mark.parametrize("heads, kv_heads, d", [(9, 3, 64), (4, 4, 32), (8, 2, 16)])
def test_one_call_gives_torchs_cache_bits_and_attention(heads, kv_heads, d):
    torch.manual_seed(heads)
    rows = 5
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d).bfloat16()
    cos, sin = tables(d)
    rot = torch.tensor([0, 7, 31, 46, 0])
    write = torch.tensor([0, 7, 31, 46, MAX_LEN])  # the last row idle: rot 0, writes the scratch column
    k, v = caches(6, kv_heads, d)
    k_ref, v_ref = k.clone(), v.clone()
    out = cpu_attention.decode_attention(qkv, heads, kv_heads, cos, sin, rot, write, k, v, d**-0.5)
    ref = torch_path(qkv, heads, kv_heads, cos, sin, rot, write, k_ref, v_ref, d**-0.5)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)  # same rotated keys, and nothing else touched
    assert out.shape == (rows, heads * d) and out.dtype == torch.bfloat16
    # fp32 sums in another order, then bf16: an ulp apart now and then (the weights of V are bf16 in both)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    assert (out == ref).float().mean() > 0.95


def test_a_rows_result_does_not_depend_on_its_batch_nor_on_threads():
    heads, kv_heads, d = 9, 3, 64
    torch.manual_seed(1)
    qkv = torch.randn(7, (heads + 2 * kv_heads) * d).bfloat16()
    cos, sin = tables(d)
    rot = torch.tensor([3, 9, 20, 40, 12, 5, 30])
    k, v = caches(8, kv_heads, d)

    def run(rows: int) -> torch.Tensor:
        kk, vv = k.clone(), v.clone()
        return cpu_attention.decode_attention(qkv[:rows].contiguous(), heads, kv_heads, cos, sin, rot[:rows].clone(),
                                              rot[:rows].clone(), kk, vv, 0.125)
    alone = run(3)[2]
    assert all(torch.equal(run(rows)[2], alone) for rows in (4, 7))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(run(7)[2], alone)
    finally:
        torch.set_num_threads(threads)


def test_bad_arguments_and_positions_are_refused_by_name_with_nothing_written():
    heads, kv_heads, d = 4, 2, 32
    qkv = torch.randn(2, (heads + 2 * kv_heads) * d).bfloat16()
    cos, sin = tables(d)
    k, v = caches(2, kv_heads, d)
    before = k.clone(), v.clone()
    ok = torch.tensor([1, 2])

    def call(**change):
        args = dict(qkv=qkv, heads=heads, kv_heads=kv_heads, cos=cos, sin=sin, rot=ok, write=ok, k_cache=k,
                    v_cache=v, scale=0.1) | change
        return cpu_attention.decode_attention(**args)
    with pytest.raises(ValueError, match="heads .3. must be a positive multiple of kv_heads"):
        call(heads=3)
    with pytest.raises(ValueError, match="qkv must be contiguous torch.bfloat16"):
        call(qkv=qkv.float())
    with pytest.raises(ValueError, match="qkv must be"):
        call(qkv=qkv[:, :-8])
    with pytest.raises(ValueError, match="rot must be contiguous torch.int64"):
        call(rot=ok.int())
    with pytest.raises(ValueError, match="v_cache must be"):
        call(v_cache=v[:1])
    with pytest.raises(ValueError, match="3 rows, but the cache holds 2"):
        call(qkv=torch.randn(3, qkv.shape[1]).bfloat16(), rot=torch.tensor([1, 2, 3]), write=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="head_dim must be a multiple of 8"):
        cpu_attention.decode_attention(qkv[:, :60].contiguous(), 2, 1, cos[:, :12].contiguous(),
                                       sin[:, :12].contiguous(), ok, ok, k[:, :1, :, :12].contiguous(),
                                       v[:, :1, :, :12].contiguous(), 0.1)
    for rot, write in (([1, MAX_LEN], [1, 2]), ([1, -1], [1, 2]), ([1, 2], [1, MAX_LEN + 1]), ([1, 2], [-3, 2])):
        with pytest.raises(ValueError, match="position outside"):
            call(rot=torch.tensor(rot), write=torch.tensor(write))
    with pytest.raises(ValueError, match="k_cache and v_cache must be two buffers"):
        call(v_cache=k)
    with pytest.raises(ValueError, match="qkv must be"):
        call(qkv=torch._neg_view(qkv))  # its memory does not hold its values
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])


@pytest.mark.parametrize("rot", [6, 7, 8])  # the scores in whole vector blocks of 8 and in the scalar tail
def test_a_nan_or_inf_query_gives_nan_as_torch_does(rot):
    """exp of a NaN (or of inf - inf) stays NaN in the vector blocks as in the tail: a clamp used to turn it into
    e^-87, a weight of ~0, whatever the position."""
    heads, kv_heads, d = 2, 1, 32
    cos, sin = tables(d)
    for bad in (float("nan"), float("inf")):
        qkv = torch.randn(1, (heads + 2 * kv_heads) * d).bfloat16()
        qkv[0, :d] = bad
        k, v = caches(1, kv_heads, d)
        out = cpu_attention.decode_attention(qkv, heads, kv_heads, cos, sin, torch.tensor([rot]), torch.tensor([rot]),
                                             k, v, d**-0.5)
        assert out[0, :d].isnan().all() and out[0, d:].isfinite().all()


def test_torch_compile_sees_one_op_that_writes_the_caches():
    heads, kv_heads, d = 4, 2, 32
    qkv = torch.randn(2, (heads + 2 * kv_heads) * d).bfloat16()
    cos, sin = tables(d)
    rot = torch.tensor([4, 9])
    k, v = caches(2, kv_heads, d)
    k2, v2 = k.clone(), v.clone()

    def f(qkv, k, v):
        return cpu_attention.decode_attention(qkv * 2, heads, kv_heads, cos, sin, rot, rot, k, v, 0.2) + 1

    compiled = torch.compile(f, fullgraph=True, backend="eager")  # fullgraph: a graph break would raise
    assert torch.equal(compiled(qkv, k, v), f(qkv, k2, v2))
    assert torch.equal(k, k2) and torch.equal(v, v2) and not torch.equal(k, caches(2, kv_heads, d)[0])
