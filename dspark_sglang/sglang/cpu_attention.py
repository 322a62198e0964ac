"""Opt-in faster decode attention for SGLang's `torch_native` backend on CPU.

`TorchNativeAttnBackend._run_sdpa_forward_decode` loops over requests and, per request and layer,
gathers its K/V rows with advanced indexing, moves axes into a strided layout and calls SDPA with
`enable_gqa`. At high concurrency that loop is most of a CPU decode step (79 % of a bf16 step at 128
requests, measured with py-spy). The same loop with `index_select` on contiguous rows and GQA folded
into the query shape ([kv_heads, group, d] against [kv_heads, L, d]) computes the same attention
3-5x faster in bfloat16 (1.5x in float32).

It changes the last bits of bfloat16 results (different SDPA kernels), so it is opt-in and applies
to every engine of a process tree alike: `DSPARK_CPU_DECODE_ATTENTION=fast` in the environment of a
plain or a speculative server. The corpus generator (examples/training/corpus.py) uses it; the
project's parity tests and benchmarks do not, unless they set it for every configuration they compare.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from dspark_sglang.sglang.settings import opt_in

ENV = "DSPARK_CPU_DECODE_ATTENTION"
TARGET = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend._run_sdpa_forward_decode"


def requested(environ=os.environ) -> bool:
    return opt_in(environ, ENV, "fast")


def decode_attention_rows(
    query: torch.Tensor,  # [R, heads, d] one query per request
    output: torch.Tensor,  # [R, heads, d] written in place
    k_cache: torch.Tensor,  # [slots, kv_heads, d] contiguous
    v_cache: torch.Tensor,  # [slots, kv_heads, d] contiguous
    req_to_token: torch.Tensor,  # [max_reqs, row_width] KV slot of each position
    req_pool_indices: torch.Tensor,  # [R]
    seq_lens: torch.Tensor,  # [R] keys per request
    scaling: float | None,
) -> torch.Tensor:
    """Each request's query over its own keys; query head j reads KV head j // group."""
    heads, d = query.shape[1], query.shape[2]
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    k_rows = k_cache.view(k_cache.shape[0], kv_heads * d)
    v_rows = v_cache.view(v_cache.shape[0], kv_heads * d)
    for i, (row, n) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        slots = req_to_token[row, :n]
        keys = torch.index_select(k_rows, 0, slots).view(n, kv_heads, d).transpose(0, 1)  # [kv_heads, n, d]
        values = torch.index_select(v_rows, 0, slots).view(n, kv_heads, d).transpose(0, 1)
        q = query[i].view(kv_heads, group, d)
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        output[i] = F.scaled_dot_product_attention(q, keys, values, scale=scaling).reshape(heads, d)
    return output


def _fast_decode(original, self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                 encoder_lens=None, scaling=None, enable_gqa=False, causal=False, is_cross_attn=False,
                 sliding_window_size=None):
    plain = (
        encoder_lens is None and not causal and not is_cross_attn
        and (sliding_window_size is None or sliding_window_size <= -1)
        and query.device.type == "cpu" and query.dim() == 3
        and k_cache.is_contiguous() and v_cache.is_contiguous()
        and query.shape[1] % k_cache.shape[1] == 0
    )
    if not plain:
        return original(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                        encoder_lens, scaling, enable_gqa, causal, is_cross_attn, sliding_window_size)
    return decode_attention_rows(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scaling)


def install() -> bool:
    """Register the AROUND hook when the environment asks for it (called from the plugin's register)."""
    if not requested():
        return False
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if any(getattr(hook, "_dspark_fast_decode", False) for _, hook, _ in HookRegistry._hooks.get(TARGET, ())):
        return True
    _fast_decode._dspark_fast_decode = True
    HookRegistry.register(TARGET, _fast_decode, HookType.AROUND)
    return True
