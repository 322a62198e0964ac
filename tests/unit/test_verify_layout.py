"""The verify window layout (dspark_sglang/sglang/verify.py): flat tokens, KV slots and lengths of the
EXTEND batch built from host lengths, without boolean masks on device tensors."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from dspark_sglang.host_syncs import HostSyncCounter
from dspark_sglang.sglang.verify import layout_windows, turn_into_verify_extend

ANCHORS = torch.tensor([11, 12, 13])
DRAFTS = torch.tensor([[21, 22, 23], [31, 32, 33], [41, 42, 43]])  # [R, gamma]
VERIFY_LENS = torch.tensor([2, 0, 3])
SEQ_LENS = torch.tensor([5, 2, 7])


def test_layout_keeps_each_requests_anchor_and_verified_drafts_in_order():
    layout = layout_windows(ANCHORS, DRAFTS, VERIFY_LENS, SEQ_LENS)
    assert layout.tokens.tolist() == [11, 21, 22, 12, 13, 41, 42, 43]
    assert layout.widths.tolist() == [3, 1, 4]
    assert layout.starts.tolist() == [0, 3, 4]
    assert layout.num_tokens == 8


def _batch(pool_rows):
    req_to_token = torch.arange(8 * 16).view(8, 16) + 1000  # KV slot of (row, position)
    return SimpleNamespace(
        seq_lens=SEQ_LENS.clone(), req_pool_indices=pool_rows.clone(),
        req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
        input_ids=None, out_cache_loc=None, forward_mode=None, seq_lens_cpu=None, seq_lens_sum=None,
        orig_seq_lens=None, req_pool_indices_cpu=None, return_logprob=True, return_hidden_states=True,
        spec_info=object(),
    )


def test_extend_batch_has_the_windows_kv_slots_and_lengths():
    pool_rows = torch.tensor([6, 0, 3])
    batch = _batch(pool_rows)
    layout = layout_windows(ANCHORS, DRAFTS, VERIFY_LENS, SEQ_LENS)
    with HostSyncCounter() as counter:
        HostSyncCounter.mark_host(pool_rows, layout.widths, layout.starts, layout.seq_lens)
        turn_into_verify_extend(batch, layout, pool_rows)
    assert counter.count(ours=True) == 0  # index arithmetic on host lengths only
    # request (row 6) at positions 5, 6, 7; (row 0) at 2; (row 3) at 7, 8, 9, 10
    want = [6 * 16 + p for p in (5, 6, 7)] + [0 * 16 + 2] + [3 * 16 + p for p in (7, 8, 9, 10)]
    assert batch.out_cache_loc.tolist() == [1000 + w for w in want]
    assert batch.input_ids.tolist() == layout.tokens.tolist()
    assert batch.extend_lens == [3, 1, 4] and batch.prefix_lens == [5, 2, 7]
    assert batch.seq_lens.tolist() == [8, 3, 11] and batch.seq_lens_sum == 22
    assert batch.req_pool_indices_cpu.tolist() == [6, 0, 3]
    assert batch.spec_info is None and not batch.return_logprob


def test_all_anchor_windows_stay_a_decode_batch():
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    batch = _batch(torch.tensor([6, 0, 3]))
    layout = layout_windows(ANCHORS, DRAFTS, torch.zeros(3, dtype=torch.int64), SEQ_LENS)
    turn_into_verify_extend(batch, layout, torch.tensor([6, 0, 3]))
    assert batch.forward_mode == ForwardMode.DECODE
    assert batch.input_ids.tolist() == [11, 12, 13]
    assert batch.out_cache_loc.tolist() == [1000 + 6 * 16 + 5, 1000 + 0 * 16 + 2, 1000 + 3 * 16 + 7]


def test_a_verify_tier_pads_every_window_to_its_width():
    """Width 4 (the tier of the longest window, 1 + 3): every request gets 4 rows; cells past its
    verify length hold token 0, never a leftover draft (acceptance stops at verify_lens anyway)."""
    layout = layout_windows(ANCHORS, DRAFTS, VERIFY_LENS, SEQ_LENS, width=4)
    assert layout.widths.tolist() == [4, 4, 4] and layout.starts.tolist() == [0, 4, 8]
    assert layout.tokens.tolist() == [11, 21, 22, 0, 12, 0, 0, 0, 13, 41, 42, 43]
    assert layout.owner.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and layout.offsets.tolist() == [0, 1, 2, 3] * 3
    batch = _batch(torch.tensor([6, 0, 3]))
    turn_into_verify_extend(batch, layout, torch.tensor([6, 0, 3]))
    assert batch.extend_lens == [4, 4, 4] and batch.extend_num_tokens == 12
    # the padded rows write KV at slots the scheduler reserved past the window (2N per request)
    assert batch.out_cache_loc.tolist()[4:8] == [1000 + 0 * 16 + p for p in (2, 3, 4, 5)]


def test_a_verify_tier_must_hold_every_window():
    import pytest

    with pytest.raises(ValueError, match="must hold every window"):
        layout_windows(ANCHORS, DRAFTS, VERIFY_LENS, SEQ_LENS, width=3)
    with pytest.raises(ValueError, match="at most gamma"):
        layout_windows(ANCHORS, DRAFTS, VERIFY_LENS, SEQ_LENS, width=5)
