"""kernels/block_attention.py against drafters.block.context_block_attention (TRITON_INTERPRET=1).

Float attention: equal to float32 rounding (online vs. two-pass softmax, different dot order).
"""

import pytest
import torch

from dspark_sglang.drafters.block import ContextCache
from dspark_sglang.kernels import dispatch
from dspark_sglang.kernels._common import KernelInputError
from dspark_sglang.kernels.block_attention import block_attention, block_attention_ref

pytestmark = pytest.mark.interp


def case(seed, num_reqs, block, heads, kv_heads, head_dim, num_ctx):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(num_reqs, block, heads, head_dim, generator=g)
    ctx_k = torch.randn(num_reqs, num_ctx, kv_heads, head_dim, generator=g)
    ctx_v = torch.randn(num_reqs, num_ctx, kv_heads, head_dim, generator=g)
    k = torch.randn(num_reqs, block, kv_heads, head_dim, generator=g)
    v = torch.randn(num_reqs, block, kv_heads, head_dim, generator=g)
    lens = torch.randint(0, num_ctx + 1, (num_reqs,), generator=g)
    lens[0] = num_ctx
    ctx_k[torch.arange(num_ctx)[None, :] >= lens[:, None]] = float("nan")  # padding is never read
    return q, ctx_k, ctx_v, lens, k, v


@pytest.mark.parametrize(
    "seed, num_reqs, block, heads, kv_heads, head_dim, num_ctx, block_n",
    [
        (0, 1, 7, 4, 2, 16, 40, None),  # batch 1, GQA 2
        (1, 5, 16, 4, 1, 24, 70, 16),  # ragged contexts over several tiles, MQA, d not a power of two
        (2, 3, 5, 6, 6, 32, 17, 16),  # MHA; N = BLOCK_N + 1
        (3, 2, 1, 2, 2, 16, 0, None),  # no context at all, one-query block
    ],
)
def test_equals_reference(seed, num_reqs, block, heads, kv_heads, head_dim, num_ctx, block_n):
    q, ctx_k, ctx_v, lens, k, v = case(seed, num_reqs, block, heads, kv_heads, head_dim, num_ctx)
    mask = torch.arange(num_ctx)[None, :] < lens[:, None]
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    got = block_attention(q, ctx_k, ctx_v, lens, k, v, 0.3, out=out, block_n=block_n)
    ref = block_attention_ref(q, ctx_k.nan_to_num(0.0), ctx_v, mask, k, v, 0.3)
    assert not bool(torch.isnan(got).any())
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


def test_strided_views_from_the_context_cache():
    """ContextCache.gather returns views ([L, 1, N, kv, d] slices of a larger buffer) for one request."""
    cache = ContextCache(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(5)
    cache.append(0, torch.randn(2, 37, 2, 16, generator=g), torch.randn(2, 37, 2, 16, generator=g))
    keys, values, mask = cache.gather([0])
    assert mask is None and keys._base is not None  # a view into the slot's buffer
    q = torch.randn(1, 7, 4, 16, generator=g)
    k, v = torch.randn(1, 7, 2, 16, generator=g), torch.randn(1, 7, 2, 16, generator=g)
    got = dispatch.block_attention(q, keys[1], values[1], mask, k, v, 0.25, backend="triton")
    torch.testing.assert_close(got, block_attention_ref(q, keys[1], values[1], mask, k, v, 0.25), atol=2e-6, rtol=1e-5)
    # Non-contiguous batch: slices of wider buffers (row strides differ from the shapes).
    wide_k, wide_v = torch.randn(3, 50, 2, 16, generator=g), torch.randn(3, 50, 2, 16, generator=g)
    q3 = torch.randn(3, 9, 4, 16, generator=g)[:, :7]
    k3, v3 = torch.randn(3, 7, 2, 16, generator=g), torch.randn(3, 7, 2, 16, generator=g)
    assert not wide_k[:, :37].is_contiguous() and not q3.is_contiguous()
    got = block_attention(q3, wide_k[:, :37], wide_v[:, :37], None, k3, v3, 0.25)
    ref = block_attention_ref(q3, wide_k[:, :37], wide_v[:, :37], None, k3, v3, 0.25)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


def test_dispatch_converts_the_padding_mask():
    q, ctx_k, ctx_v, lens, k, v = case(6, 3, 4, 2, 1, 16, 20)
    ctx_k = ctx_k.nan_to_num(0.0)
    mask = torch.arange(20)[None, :] < lens[:, None]
    got = dispatch.block_attention(q, ctx_k, ctx_v, mask, k, v, 0.25, backend="triton")
    torch.testing.assert_close(got, dispatch.block_attention(q, ctx_k, ctx_v, mask, k, v, 0.25, backend="torch"),
                               atol=2e-6, rtol=1e-5)


def test_bad_inputs_raise():
    q, ctx_k, ctx_v, lens, k, v = case(7, 2, 4, 4, 2, 16, 8)
    with pytest.raises(KernelInputError, match="kernels/block_attention.py"):
        block_attention(q, ctx_k, ctx_v, lens, k[:, :3], v)
    with pytest.raises(ValueError, match="multiple"):
        block_attention(q[:, :, :3], ctx_k, ctx_v, lens, k, v)
    with pytest.raises(ValueError, match="ctx_v"):
        block_attention(q, ctx_k, ctx_v.double(), lens, k, v)


@pytest.mark.parametrize(
    "seed, num_reqs, block, heads, kv_heads, head_dim, max_ctx, block_n",
    [
        (10, 1, 7, 4, 2, 16, 40, None),  # batch 1, GQA 2
        (11, 4, 7, 9, 3, 16, 70, 16),  # ragged contexts over several tiles, 9 heads over 3 KV heads
        (12, 3, 5, 2, 2, 24, 0, None),  # no context at all, d not a power of two
    ],
)
def test_paged_equals_reference(seed, num_reqs, block, heads, kv_heads, head_dim, max_ctx, block_n):
    from dspark_sglang.kernels.block_attention import paged_block_attention, paged_block_attention_ref

    g = torch.Generator().manual_seed(seed)
    num_slots = 300
    pool_k = torch.randn(num_slots, kv_heads, head_dim, generator=g)
    pool_v = torch.randn(num_slots, kv_heads, head_dim, generator=g)
    lens = torch.randint(0, max_ctx + 1, (num_reqs,), generator=g).tolist()
    lens[0] = max_ctx
    rows = torch.zeros(num_reqs, max(max_ctx, 1), dtype=torch.int32)
    for r, n in enumerate(lens):  # scattered slots, like an engine's KV pool after many allocations
        rows[r, :n] = (torch.randperm(num_slots - 1, generator=g)[:n] + 1).to(torch.int32)
    q = torch.randn(num_reqs, block, heads, head_dim, generator=g)
    k = torch.randn(num_reqs, block, kv_heads, head_dim, generator=g)
    v = torch.randn(num_reqs, block, kv_heads, head_dim, generator=g)
    out = torch.full_like(q, float("nan"))
    got = paged_block_attention(q, pool_k, pool_v, rows, lens, k, v, 0.3, out=out, block_n=block_n)
    ref = paged_block_attention_ref(q, pool_k, pool_v, rows.long(), lens, k, v, 0.3)
    assert not bool(torch.isnan(got).any())
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    # the paged reference equals the padded one on the gathered rows
    ctx_k = torch.stack([pool_k[rows[r].long()] for r in range(num_reqs)])
    ctx_v = torch.stack([pool_v[rows[r].long()] for r in range(num_reqs)])
    mask = torch.arange(rows.shape[1])[None, :] < torch.tensor(lens)[:, None]
    torch.testing.assert_close(ref, block_attention_ref(q, ctx_k, ctx_v, mask, k, v, 0.3), atol=2e-6, rtol=1e-5)
