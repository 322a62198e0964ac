"""The opt-in torch_native decode attention (dspark_sglang/sglang/cpu_attention.py) against SGLang's own."""

from __future__ import annotations

import pytest
import torch

from dspark_sglang.sglang import cpu_attention


def _inputs(dtype, heads=9, kv_heads=3, d=16, lens=(5, 1, 37, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    slots = 200
    k_cache = torch.randn(slots, kv_heads, d, generator=g).to(dtype)
    v_cache = torch.randn(slots, kv_heads, d, generator=g).to(dtype)
    req_to_token = torch.zeros(8, 64, dtype=torch.int32)
    perm = torch.randperm(slots - 1, generator=g) + 1  # scattered KV slots, as after many allocations
    rows = torch.tensor([6, 0, 3, 5])
    offset = 0
    for row, n in zip(rows.tolist(), lens):
        req_to_token[row, :n] = perm[offset : offset + n].to(torch.int32)
        offset += n
    query = torch.randn(len(lens), heads, d, generator=g).to(dtype)
    return query, k_cache, v_cache, req_to_token, rows, torch.tensor(lens)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_matches_sglang_decode_attention(dtype, tol):
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    query, k_cache, v_cache, r2t, rows, lens = _inputs(dtype)
    want = TorchNativeAttnBackend._run_sdpa_forward_decode(
        None, query, torch.zeros_like(query), k_cache, v_cache, r2t, rows, lens, scaling=0.25, enable_gqa=True)
    got = cpu_attention.decode_attention_rows(query, torch.zeros_like(query), k_cache, v_cache, r2t, rows, lens, 0.25)
    assert (got.float() - want.float()).abs().max().item() <= tol


def test_a_wrong_group_mapping_would_be_caught():
    """Negative control: query head j must read KV head j // group, not j % kv_heads."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    query, k_cache, v_cache, r2t, rows, lens = _inputs(torch.float32)
    want = TorchNativeAttnBackend._run_sdpa_forward_decode(
        None, query, torch.zeros_like(query), k_cache, v_cache, r2t, rows, lens, scaling=0.25, enable_gqa=True)
    shuffled = query.view(4, 3, 3, 16).transpose(1, 2).reshape(4, 9, 16)  # head order of j % kv_heads
    got = cpu_attention.decode_attention_rows(shuffled, torch.zeros_like(query), k_cache, v_cache, r2t, rows, lens, 0.25)
    assert (got - want).abs().max().item() > 1e-2


def test_fast_decode_falls_back_for_what_it_does_not_handle():
    calls = []
    original = lambda *a: calls.append(a) or "stock"  # noqa: E731
    query, k_cache, v_cache, r2t, rows, lens = _inputs(torch.float32)
    out = torch.zeros_like(query)
    assert cpu_attention._fast_decode(original, None, query, out, k_cache, v_cache, r2t, rows, lens,
                                      sliding_window_size=8) == "stock"
    assert cpu_attention._fast_decode(original, None, query, out, k_cache, v_cache, r2t, rows, lens,
                                      encoder_lens=lens) == "stock"
    assert len(calls) == 2
    assert cpu_attention._fast_decode(original, None, query, out, k_cache, v_cache, r2t, rows, lens) is out


@pytest.mark.parametrize("value,expected", [("", False), ("stock", False), ("0", False), ("fast", True), ("FAST", True)])
def test_requested(value, expected):
    assert cpu_attention.requested({cpu_attention.ENV: value}) is expected


def test_requested_refuses_unknown_values():
    with pytest.raises(ValueError, match="DSPARK_CPU_DECODE_ATTENTION"):
        cpu_attention.requested({cpu_attention.ENV: "fastest"})
