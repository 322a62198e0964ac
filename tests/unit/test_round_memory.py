"""Vocabulary-sized temporaries of a round's sampling and acceptance, measured with torch's profiler.

The bound is issue #20's: at batch 128, gamma 15 and a 152k vocabulary one float32 [R, V] row block is
78 MB, and [R, gamma + 1, V] is 1.2 GB, as large as the inputs themselves. A round must not add
vocabulary-sized float64 or int64 copies, nor copy the whole [R, gamma + 1, V] block. Measured here at
8 requests with the full gamma and vocabulary, where the peaks scale linearly in R.
"""

import torch
from torch.profiler import ProfilerActivity, profile

from dspark_sglang.acceptance import chain_accept
from dspark_sglang.sampling import sample_from_probs

R, GAMMA, V = 8, 15, 152_064
ROW_BLOCK = R * V * 4  # bytes of one float32 [R, V]


def peak_bytes(fn, *args) -> int:
    """Peak bytes allocated and still live while fn(*args) runs, beyond its inputs (CPU profiler:
    leaf ops' allocations and the allocator's frees, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    events = [(e.time_range.start, e.cpu_memory_usage) for e in prof.events()
              if e.name == "[memory]" or (e.cpu_memory_usage > 0 and not e.cpu_children)]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def test_inverse_cdf_sampling_keeps_one_float32_copy():
    probs, uniforms = torch.rand(R * GAMMA, V), torch.rand(R * GAMMA)
    # The cleaned float32 weights, plus [N, V / 1024] and [N, 1024] float64 blocks: 1.02x of the input.
    # (A float64 CDF over the vocabulary was 4x.)
    assert peak_bytes(sample_from_probs, probs, uniforms) < 1.1 * probs.numel() * 4


def test_chain_acceptance_adds_a_few_request_rows_not_a_block_copy():
    torch.manual_seed(0)
    target = torch.softmax(torch.randn(R, GAMMA + 1, V), -1)
    draft = torch.softmax(torch.randn(R, GAMMA, V), -1)
    tokens = torch.randint(0, V, (R, GAMMA))
    args = (target, tokens, draft, torch.full((R,), GAMMA), torch.zeros(R, dtype=torch.bool),
            torch.rand(R, GAMMA), torch.rand(R))
    peak = peak_bytes(chain_accept, *args)
    print(f"chain_accept peak: {peak / ROW_BLOCK:.1f} x [R, V] float32 ({peak / 2**20:.0f} MB at R={R})")
    # p and q rows of the next token, their residual and the sampler's copy: a few [R, V], where one
    # [R, gamma + 1, V] copy alone would be 16.
    assert peak < 8 * ROW_BLOCK
