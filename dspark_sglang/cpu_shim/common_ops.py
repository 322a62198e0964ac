"""Pure-torch CPU versions of the `sgl_kernel` ops SGLang's non-AMX CPU path calls.

No PyPI wheel of `sgl_kernel` has CPU ops: its CUDA extensions fail to load without libcuda, and its
loader (`sgl_kernel/load_utils.py`) then falls back to a plain `import common_ops` from `sys.path`.
This module is that fallback: it defines the `sgl_kernel` torch.library namespace and registers a
CPU kernel for each op that SGLang's Python wrappers (`sgl_kernel/speculative.py`, `kvcacheio.py`)
call as `torch.ops.sgl_kernel.<op>`. Put this directory on PYTHONPATH (`dspark_sglang.cpu_mode`).

Real builds are never shadowed: `sgl_kernel` only imports this module when its own extensions
failed to load, and an op that already exists (an AMX/CUDA build loaded first) is skipped. Do not
import this module yourself ahead of a real build: the real build would then find the names taken.

Semantics follow sglang's Triton/CUDA versions (cpu-dev-recipe.md §4); tests/unit/test_cpu_shim.py
checks each op against a straightforward loop. Index tensors may be int32 or int64; outputs are cast
to the destination's dtype.
"""

from __future__ import annotations

import ctypes

import torch

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

REGISTERED: list[str] = []  # ops this module registered
SKIPPED: list[str] = []  # ops a real build already provided


def _spans(start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ragged spans [start_i, end_i), packed in request order.

    Returns (req [total], col [total], offsets [n]): the request and column of every packed element,
    and each request's packed offset (the sum of the previous spans' lengths, as the Triton kernels
    compute it).
    """
    raw = end.long() - start.long()  # [n]
    lengths = raw.clamp_min(0)
    offsets = torch.cumsum(raw, 0) - raw  # [n], exclusive
    req = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)  # [total]
    first = torch.cumsum(lengths, 0) - lengths
    col = start.long()[req] + torch.arange(req.numel()) - first[req]
    return req, col, offsets


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc) -> None:
    """For every buffer i (base address `data_ptrs[i]`, row size `strides[i]` bytes), copy row
    `src_loc[j]` to row `tgt_loc[j]`.

    Shape: data_ptrs [L] uint64, strides [L], tgt_loc [N], src_loc [N].
    The buffers are raw addresses, so this copies bytes with memmove. All source rows are read
    before any target row is written (through a staging buffer), matching the GPU kernel, which is
    safe when targets and sources overlap (slot compaction moves rows onto rows still to be read).
    """
    pairs = [(t, s) for t, s in zip(tgt_loc.tolist(), src_loc.tolist()) if t != s]
    if not pairs:
        return
    for base, width in zip(data_ptrs.tolist(), strides.tolist()):
        staging = ctypes.create_string_buffer(width * len(pairs))
        stage = ctypes.addressof(staging)
        for k, (_, s) in enumerate(pairs):
            ctypes.memmove(stage + k * width, base + s * width, width)
        for k, (t, _) in enumerate(pairs):
            ctypes.memmove(base + t * width, stage + k * width, width)


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len) -> None:
    """Scatter: `req_to_token[r_i, start_i:end_i] = out_cache_loc[off_i : off_i + n_i]`.

    Shape: req_pool_indices [B], req_to_token [P, pool_len] (mutated), start_offset [B],
    end_offset [B], out_cache_loc [sum n_i]. `off_i` is the sum of the previous requests' n.
    """
    req, col, offsets = _spans(start_offset, end_offset)
    rows = req_pool_indices.long()[req]
    src = offsets[req] + col - start_offset.long()[req]
    req_to_token[rows, col] = out_cache_loc[src].to(req_to_token.dtype)


def assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len) -> None:
    """Gather, the inverse of `assign_req_to_token_pool_cpu`:
    `out_cache_loc[off_i : off_i + n_i] = req_to_token[r_i, start_i:end_i]`.

    Shape: req_pool_indices [B], req_to_token [P, pool_len], start_offset [B], end_offset [B],
    out_cache_loc [>= sum n_i] (mutated).
    """
    req, col, offsets = _spans(start_offset, end_offset)
    rows = req_pool_indices.long()[req]
    dst = offsets[req] + col - start_offset.long()[req]
    out_cache_loc[dst] = req_to_token[rows, col].to(out_cache_loc.dtype)


def assign_draft_cache_locs_contiguous_cpu(req_pool_indices, req_to_token, seq_lens, out_cache_loc, pool_len,
                                           topk, num_steps) -> None:
    """`out_cache_loc[i*W:(i+1)*W] = req_to_token[r_i, seq_lens[i] : seq_lens[i] + W]`, W = topk*num_steps.

    Shape: req_pool_indices [B], req_to_token [P, pool_len], seq_lens [B], out_cache_loc [>= B*W].
    """
    width = topk * num_steps
    cols = seq_lens.long()[:, None] + torch.arange(width)[None, :]  # [B, W]
    values = req_to_token[req_pool_indices.long()[:, None], cols]  # [B, W]
    out_cache_loc[: values.numel()] = values.reshape(-1).to(out_cache_loc.dtype)


def reconstruct_indices_from_tree_mask_cpu(tree_mask, verified_seq_len, positions, retrive_index,
                                           retrive_next_token, retrive_next_sibling, batch_size,
                                           draft_token_num) -> None:
    """Tree links from an ancestor mask (NGRAM verify).

    Shape: tree_mask [B*n*n] (bool, row i of request b marks the nodes i attends to: its ancestors
    and itself), verified_seq_len [B]; outputs [B*n] (flat, first B*n entries written).
    depth = #strict ancestors, positions = verified_seq_len + depth, parent = largest strict
    ancestor, next_token = first child (smallest k whose strict ancestors include i), next_sibling =
    smallest k > i with the same parent (-1 for the root, or when none).
    """
    bs, n = batch_size, draft_token_num
    mask = tree_mask.reshape(-1)[: bs * n * n].reshape(bs, n, n).bool()
    idx = torch.arange(n)
    strict = mask & (idx[None, None, :] < idx[None, :, None])  # [bs, i, j]: j strict ancestor of i
    depth = strict.sum(-1)  # [bs, n]
    parent = torch.where(strict, idx, -1).amax(-1)  # [bs, n], -1 for roots
    # First child of i: the smallest k with i among k's strict ancestors (always a direct child,
    # since every ancestor index is smaller than its descendants').
    first_child = torch.where(strict, idx[None, :, None], n).amin(1)  # [bs, i]
    same_parent = (parent[:, :, None] == parent[:, None, :]) & (idx[None, None, :] > idx[None, :, None])
    same_parent &= (parent >= 0)[:, :, None]  # [bs, i, k]
    next_sib = torch.where(same_parent, idx, n).amin(-1)  # [bs, i]
    flat = bs * n
    positions.view(-1)[:flat] = (verified_seq_len.long()[:, None] + depth).reshape(-1).to(positions.dtype)
    retrive_index.view(-1)[:flat] = torch.arange(flat).to(retrive_index.dtype)
    retrive_next_token.view(-1)[:flat] = torch.where(first_child == n, -1, first_child).reshape(-1).to(
        retrive_next_token.dtype)
    retrive_next_sibling.view(-1)[:flat] = torch.where(next_sib == n, -1, next_sib).reshape(-1).to(
        retrive_next_sibling.dtype)


def verify_tree_greedy_cpu(predicts, accept_index, accept_token_num, candidates, retrive_index,
                           retrive_next_token, retrive_next_sibling, target_predict) -> None:
    """Greedy tree verification: per request, walk down from the root while some child's candidate
    equals the target's argmax at the last accepted node.

    Shape: predicts [B*n] (mutated at accepted nodes and the bonus), accept_index [B, S] (mutated:
    retrive indices of the root and each accepted node; the rest untouched), accept_token_num [B]
    (mutated), candidates / retrive_* [B, n], target_predict [B*n] (flat, by retrive index).
    A chain is the case next_token[i] = i+1, next_sibling = -1.
    """
    # Trees are tiny (a few nodes per request): a host loop over Python lists is the simple route.
    bs, num_spec = accept_index.shape
    cand, ridx = candidates.tolist(), retrive_index.tolist()
    nxt, sib = retrive_next_token.tolist(), retrive_next_sibling.tolist()
    tgt = target_predict.reshape(-1).tolist()
    pred_at, pred_val, acc_rows, acc_cols, acc_vals, counts = [], [], [], [], [], []
    for b in range(bs):
        last, node, count = ridx[b][0], 0, 0
        acc_rows.append(b), acc_cols.append(0), acc_vals.append(last)
        for _ in range(1, num_spec):
            child = nxt[b][node]
            while child != -1 and cand[b][child] != tgt[last]:
                child = sib[b][child]
            if child == -1:
                break
            pred_at.append(last), pred_val.append(tgt[last])
            last, node, count = ridx[b][child], child, count + 1
            acc_rows.append(b), acc_cols.append(count), acc_vals.append(last)
        pred_at.append(last), pred_val.append(tgt[last])  # the bonus token
        counts.append(count)
    predicts[torch.tensor(pred_at)] = torch.tensor(pred_val, dtype=predicts.dtype)
    accept_index[torch.tensor(acc_rows), torch.tensor(acc_cols)] = torch.tensor(acc_vals, dtype=accept_index.dtype)
    accept_token_num.copy_(torch.tensor(counts, dtype=accept_token_num.dtype))


def _tree_parents(parent_list, selected_index, topk) -> torch.Tensor:
    """Parent node of every draft-tree node: [B, n] with -1 for the root and unresolved parents.

    Node i >= 1 is `selected_index[:, i-1]`; its parent is the root when `selected // topk == 0`,
    else the node whose selected index equals `parent_list[:, selected // topk]` (first match).
    """
    sel = selected_index.long()  # [B, n-1]
    bs = sel.shape[0]
    parent_tb = sel // topk  # [B, n-1]
    if parent_list.shape[-1] > 0:
        plist = parent_list.long().reshape(bs, -1)
        parent_token = plist.gather(1, parent_tb.clamp(0, plist.shape[1] - 1))  # [B, n-1]
    else:
        parent_token = torch.full_like(parent_tb, -1)
    match = sel[:, None, :] == parent_token[:, :, None]  # [B, i-1, pp]
    found = match.any(-1)
    first = match.int().argmax(-1) + 1  # node index of the first match
    parent = torch.where(parent_tb == 0, 0, torch.where(found, first, -1))
    return torch.cat([torch.full((bs, 1), -1, dtype=torch.long), parent], dim=1)  # [B, n]


def build_tree_kernel_efficient_cpu(parent_list, selected_index, verified_seq_len, tree_mask, positions,
                                    retrive_index, retrive_next_token, retrive_next_sibling, topk, depth,
                                    draft_token_num, tree_mask_mode) -> None:
    """EAGLE draft tree: links, positions and the attention mask (as sglang's build-tree kernel).

    Shape: parent_list [B, topk*(depth-1)+1], selected_index [B, n-1], verified_seq_len [B];
    tree_mask flat bool (mode 0 FULL_MASK: per request n rows of seq_len+n, prefix columns left as
    the caller filled them; mode 1 QLEN_ONLY: [B*n*n]); positions [B*n]; retrive_* [B, n], with
    next_token / next_sibling pre-filled with -1 by the caller (only links are written).
    """
    if tree_mask_mode not in (0, 1):
        raise NotImplementedError(f"tree_mask_mode {tree_mask_mode} (bit-packed) has no CPU version")
    n = draft_token_num
    seq = verified_seq_len.long()  # [B]
    bs = seq.numel()
    parent = _tree_parents(parent_list, selected_index, topk)  # [B, n]
    idx = torch.arange(n)

    # Links: first child = the smallest child; next sibling = the next larger child of the parent.
    child_of = parent[:, None, :] == idx[None, :, None]  # [B, p, i]: i's parent is p
    first_child = torch.where(child_of, idx, n).amin(-1)  # [B, p]
    siblings = (parent[:, :, None] == parent[:, None, :]) & (idx[None, None, :] > idx[None, :, None])
    siblings &= (parent >= 0)[:, :, None]  # [B, i, k]
    next_sib = torch.where(siblings, idx, n).amin(-1)  # [B, i]
    nt, ns = retrive_next_token.view(bs, n), retrive_next_sibling.view(bs, n)
    nt.copy_(torch.where(first_child < n, first_child.to(nt.dtype), nt))
    ns.copy_(torch.where(next_sib < n, next_sib.to(ns.dtype), ns))
    retrive_index.view(-1)[: bs * n] = torch.arange(bs * n).to(retrive_index.dtype)

    # Ancestor rows: each node attends to the root, itself and up to `depth` nodes on its path.
    rows = torch.zeros(bs, n, n, dtype=torch.bool)
    rows[:, :, 0] = True
    cur = idx.expand(bs, n).clone()  # [B, n] node being marked
    alive = cur > 0
    count = torch.zeros(bs, n, dtype=torch.long)
    for _ in range(depth):
        rows |= alive[:, :, None] & (idx[None, None, :] == cur[:, :, None])
        count += alive.long()
        up = parent.gather(1, cur)  # [B, n]
        alive &= up > 0
        cur = torch.where(alive, up, cur)
    positions.view(-1)[: bs * n] = (seq[:, None] + count).reshape(-1).to(positions.dtype)

    if tree_mask_mode == 0:  # FULL_MASK: request b's rows start after the previous requests' rows
        start = n * n * torch.arange(bs) + n * (torch.cumsum(seq, 0) - seq)  # [B]
        row_start = start[:, None] + (seq[:, None] + n) * idx[None, :] + seq[:, None]  # [B, n]
    else:  # QLEN_ONLY
        row_start = n * n * torch.arange(bs)[:, None] + n * idx[None, :]
    cells = row_start[:, :, None] + idx[None, None, :]  # [B, n, n]
    tree_mask.view(-1)[cells.reshape(-1)] = rows.reshape(-1).to(tree_mask.dtype)


def fill_bonus_tokens_cpu(accept_tokens, accept_lens, bonus_tokens, accept_stride) -> None:
    """`bonus_tokens[i] = accept_tokens.flatten()[i*accept_stride + accept_lens[i] - 1]`: the last
    committed token becomes the next anchor.

    Shape: accept_tokens [B, accept_stride], accept_lens [B] (>= 1, bonus included), bonus_tokens [B].
    """
    flat = accept_tokens.reshape(-1)
    index = torch.arange(accept_lens.numel()) * accept_stride + accept_lens.long() - 1  # [B]
    bonus_tokens[: index.numel()] = flat[index].to(bonus_tokens.dtype)


def fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, accept_out_cache_loc) -> None:
    """Compaction: `accept_out_cache_loc[:m] = out_cache_loc[src]` for the m entries of
    `accept_index.flatten()` that are not -1, in order.

    Shape: accept_index [B, S] (-1 = rejected), out_cache_loc [B*n], accept_out_cache_loc [>= m].
    """
    src = accept_index.reshape(-1)
    src = src[src > -1].long()
    accept_out_cache_loc[: src.numel()] = out_cache_loc[src].to(accept_out_cache_loc.dtype)


def _already_defined(name: str) -> bool:
    try:
        getattr(torch.ops.sgl_kernel, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _register() -> torch.library.Library:
    lib = torch.library.Library("sgl_kernel", "FRAGMENT")
    for name, schema in SCHEMAS.items():
        if _already_defined(name):  # a real build provides it: never shadow
            SKIPPED.append(name)
            continue
        lib.define(name + schema)
        lib.impl(name, globals()[name], "CPU")
        REGISTERED.append(name)
    return lib


# Kept alive for the process: a Library's registrations are dropped when it is garbage-collected.
_LIB = _register()
