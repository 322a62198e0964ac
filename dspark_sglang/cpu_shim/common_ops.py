"""Pure-torch CPU versions of the `sgl_kernel` ops SGLang's non-AMX CPU path calls.

No PyPI wheel of `sgl_kernel` has CPU ops: its CUDA extensions fail to load without libcuda, and
its loader then falls back to a plain `import common_ops` from `sys.path`. This module is that
fallback: it defines the `sgl_kernel` torch.library namespace and registers a CPU kernel for each
op that SGLang's Python wrappers (`sgl_kernel/speculative.py`, `kvcacheio.py`) call as
`torch.ops.sgl_kernel.<op>`. Put this directory on PYTHONPATH (`dspark_sglang.cpu_mode`).

Real builds are never shadowed: an op that already exists (an AMX/CUDA build loaded first) is
skipped, and `sgl_kernel` only imports this module when its own extensions failed to load.

Semantics follow the reference notes (cpu-dev-recipe §4); `tests/unit/test_cpu_shim.py` checks each
op against a straightforward loop.
"""

from __future__ import annotations

import ctypes

import torch

_LIB = torch.library.Library("sgl_kernel", "FRAGMENT")

SCHEMAS = {
    "copy_all_layer_kv_cache_cpu": "(Tensor data_ptrs, Tensor strides, Tensor tgt_loc, Tensor src_loc) -> ()",
    "assign_req_to_token_pool_cpu": "(Tensor req_pool_indices, Tensor(a!) req_to_token, Tensor start_offset, "
    "Tensor end_offset, Tensor out_cache_loc, int pool_len) -> ()",
    "assign_extend_cache_locs_cpu": "(Tensor req_pool_indices, Tensor req_to_token, Tensor start_offset, "
    "Tensor end_offset, Tensor(a!) out_cache_loc, int pool_len) -> ()",
    "assign_draft_cache_locs_contiguous_cpu": "(Tensor req_pool_indices, Tensor req_to_token, Tensor seq_lens, "
    "Tensor(a!) out_cache_loc, int pool_len, int topk, int num_steps) -> ()",
    "reconstruct_indices_from_tree_mask_cpu": "(Tensor tree_mask, Tensor verified_seq_len, Tensor(a!) positions, "
    "Tensor(b!) retrive_index, Tensor(c!) retrive_next_token, Tensor(d!) retrive_next_sibling, int batch_size, "
    "int draft_token_num) -> ()",
    "verify_tree_greedy_cpu": "(Tensor(a!) predicts, Tensor(b!) accept_index, Tensor(c!) accept_token_num, "
    "Tensor candidates, Tensor retrive_index, Tensor retrive_next_token, Tensor retrive_next_sibling, "
    "Tensor target_predict) -> ()",
    "build_tree_kernel_efficient_cpu": "(Tensor parent_list, Tensor selected_index, Tensor verified_seq_len, "
    "Tensor(a!) tree_mask, Tensor(b!) positions, Tensor(c!) retrive_index, Tensor(d!) retrive_next_token, "
    "Tensor(e!) retrive_next_sibling, int topk, int depth, int draft_token_num, int tree_mask_mode) -> ()",
    "fill_bonus_tokens_cpu": "(Tensor accept_tokens, Tensor accept_lens, Tensor(a!) bonus_tokens, int accept_stride) -> ()",
    "fill_accept_out_cache_loc_cpu": "(Tensor accept_index, Tensor out_cache_loc, Tensor(a!) accept_out_cache_loc) -> ()",
}


def _spans(start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ragged spans [start_i, end_i): (request index, column) of every element, in order."""
    lengths = (end.long() - start.long()).clamp_min(0)  # [n]
    req = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)  # [sum]
    offsets = torch.cumsum(lengths, 0) - lengths  # [n] exclusive
    col = start.long()[req] + torch.arange(req.numel()) - offsets[req]
    return req, col


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc) -> None:
    # Raw addresses (one buffer per layer), so this copies bytes with memmove, not tensor ops.
    pairs = [(int(t), int(s)) for t, s in zip(tgt_loc.tolist(), src_loc.tolist()) if t != s]
    for base, width in zip(data_ptrs.tolist(), strides.tolist()):
        for t, s in pairs:
            ctypes.memmove(base + t * width, base + s * width, width)


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len) -> None:
    req, col = _spans(start_offset, end_offset)
    rows = req_pool_indices.long()[req]
    req_to_token[rows, col] = out_cache_loc[: req.numel()].to(req_to_token.dtype)


def assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len) -> None:
    req, col = _spans(start_offset, end_offset)
    rows = req_pool_indices.long()[req]
    out_cache_loc[: req.numel()] = req_to_token[rows, col].to(out_cache_loc.dtype)


def assign_draft_cache_locs_contiguous_cpu(req_pool_indices, req_to_token, seq_lens, out_cache_loc, pool_len,
                                           topk, num_steps) -> None:
    width = topk * num_steps
    cols = seq_lens.long()[:, None] + torch.arange(width)[None, :]  # [bs, width]
    values = req_to_token[req_pool_indices.long()[:, None], cols]
    out_cache_loc[: values.numel()] = values.reshape(-1).to(out_cache_loc.dtype)


def reconstruct_indices_from_tree_mask_cpu(tree_mask, verified_seq_len, positions, retrive_index,
                                           retrive_next_token, retrive_next_sibling, batch_size,
                                           draft_token_num) -> None:
    bs, n = batch_size, draft_token_num
    mask = tree_mask.reshape(-1)[: bs * n * n].reshape(bs, n, n).bool()
    idx = torch.arange(n)
    strict = mask & (idx[None, None, :] < idx[None, :, None])  # [bs, i, j]: j strict ancestor of i
    depth = strict.sum(-1)  # [bs, n]
    parent = torch.where(strict.any(-1), (strict * idx).amax(-1), torch.full_like(depth, -1))
    big = n + 1
    # First child of i: the smallest k whose strict ancestors include i.
    is_desc = strict.transpose(1, 2)  # [bs, i, k]: i strict ancestor of k
    child_of = (parent[:, None, :] == idx[None, :, None])  # [bs, i, k]: k's parent is i
    first_child = torch.where(child_of & is_desc, idx, big).amin(-1)
    # Next sibling of i: the smallest k > i with the same parent (the root has none).
    same_parent = (parent[:, :, None] == parent[:, None, :]) & (idx[None, None, :] > idx[None, :, None])
    same_parent &= (parent >= 0)[:, :, None]
    next_sib = torch.where(same_parent, idx, big).amin(-1)
    flat = bs * n
    positions.view(-1)[:flat] = (verified_seq_len.long()[:, None] + depth).reshape(-1).to(positions.dtype)
    retrive_index.view(-1)[:flat] = torch.arange(flat).to(retrive_index.dtype)
    retrive_next_token.view(-1)[:flat] = torch.where(first_child == big, -1, first_child).reshape(-1).to(
        retrive_next_token.dtype)
    retrive_next_sibling.view(-1)[:flat] = torch.where(next_sib == big, -1, next_sib).reshape(-1).to(
        retrive_next_sibling.dtype)


def verify_tree_greedy_cpu(predicts, accept_index, accept_token_num, candidates, retrive_index,
                           retrive_next_token, retrive_next_sibling, target_predict) -> None:
    # A walk down the tree per request; trees are tiny (a few nodes), so a host loop is fine.
    bs, num_spec = accept_index.shape
    cand, ridx = candidates.tolist(), retrive_index.tolist()
    nxt, sib, tgt = retrive_next_token.tolist(), retrive_next_sibling.tolist(), target_predict.reshape(-1).tolist()
    for b in range(bs):
        last = ridx[b][0]
        accept_index[b, 0] = last
        node, count = 0, 0
        for step in range(1, num_spec):
            child = nxt[b][node]
            found = False
            while child != -1:
                if cand[b][child] == tgt[last]:
                    predicts[last] = cand[b][child]
                    last = ridx[b][child]
                    accept_index[b, step] = last
                    node, count, found = child, count + 1, True
                    break
                child = sib[b][child]
            if not found:
                break
        accept_token_num[b] = count
        predicts[last] = tgt[last]


def build_tree_kernel_efficient_cpu(parent_list, selected_index, verified_seq_len, tree_mask, positions,
                                    retrive_index, retrive_next_token, retrive_next_sibling, topk, depth,
                                    draft_token_num, tree_mask_mode) -> None:
    # EAGLE tree building is only reached by EAGLE/STANDALONE workers; SGLang's own Triton kernel
    # serves it on CPU tensors under TRITON_INTERPRET=1.
    from sglang.kernels.ops.speculative.spec_tree import TreeMaskMode, sgl_build_tree_kernel_triton

    sgl_build_tree_kernel_triton(parent_list, selected_index, verified_seq_len, tree_mask, positions,
                                 retrive_index, retrive_next_token, retrive_next_sibling, topk, depth,
                                 draft_token_num, TreeMaskMode(tree_mask_mode))


def fill_bonus_tokens_cpu(accept_tokens, accept_lens, bonus_tokens, accept_stride) -> None:
    flat = accept_tokens.reshape(-1)
    index = torch.arange(bonus_tokens.numel()) * accept_stride + accept_lens.long() - 1
    bonus_tokens.copy_(flat[index].to(bonus_tokens.dtype))


def fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, accept_out_cache_loc) -> None:
    src = accept_index.reshape(-1)
    src = src[src > -1].long()
    accept_out_cache_loc[: src.numel()] = out_cache_loc[src].to(accept_out_cache_loc.dtype)


def _register() -> None:
    for name, schema in SCHEMAS.items():
        if hasattr(torch.ops.sgl_kernel, name):
            continue  # a real build already provides it: never shadow
        _LIB.define(name + schema)
        _LIB.impl(name, globals()[name], "CPU")


_register()
