"""The sgl_kernel CPU fallback (`dspark_sglang/cpu_shim/common_ops.py`): each op against a plain loop.

The module is imported by path, not through sgl_kernel, so these tests need neither SGLang nor the
loader; one subprocess test checks the real loader path (`import sgl_kernel` with the shim on
PYTHONPATH). Cross-checks against SGLang's own Triton kernels live in tests/interp.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from dspark_sglang.cpu_shim import shim_dir

SHIM_FILE = os.path.join(shim_dir(), "common_ops.py")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SHIM_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ops = _load("dspark_common_ops_under_test")


def _both(name):
    """The module function and the registered op (whichever module registered it)."""
    return [getattr(ops, name), getattr(torch.ops.sgl_kernel, name)]


# ------------------------------------------------------------------------------------------------
# registration


def test_all_nine_ops_registered():
    assert len(ops.SCHEMAS) == 9
    for name in ops.SCHEMAS:
        assert hasattr(torch.ops.sgl_kernel, name)


def test_second_import_never_shadows():
    again = _load("dspark_common_ops_second_copy")
    assert again.REGISTERED == [] and sorted(again.SKIPPED) == sorted(ops.SCHEMAS)


def test_sgl_kernel_loader_finds_the_shim():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([shim_dir(), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    code = ("import sgl_kernel, torch; print(sgl_kernel.common_ops.__file__); "
            "print(torch.ops.sgl_kernel.fill_bonus_tokens_cpu)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0] == SHIM_FILE


# ------------------------------------------------------------------------------------------------
# KV cache / token pool bookkeeping


def test_copy_all_layer_kv_cache_overlapping_moves():
    gen = torch.Generator().manual_seed(0)
    bufs = [torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen).bfloat16(),
            torch.randint(-100, 100, (16, 5), generator=gen, dtype=torch.int8)]
    # Targets overlap sources (a shift by one), one pair is a no-op (9 -> 9).
    tgt = torch.tensor([1, 2, 3, 9, 12], dtype=torch.int64)
    src = torch.tensor([0, 1, 2, 9, 15], dtype=torch.int64)
    expected = []
    for buf in bufs:
        ref, snapshot = buf.clone(), buf.clone()
        for t, s in zip(tgt.tolist(), src.tolist()):
            ref[t] = snapshot[s]  # every source read before any target is written
        expected.append(ref)
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64)
    strides = torch.tensor([b.stride(0) * b.element_size() for b in bufs])
    torch.ops.sgl_kernel.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for buf, ref in zip(bufs, expected):
        assert torch.equal(buf, ref)
    assert torch.equal(bufs[0][1], expected[0][1])  # row 1 got old row 0, not a chained copy


def _ragged(gen, bs, pool_len, idx_dtype):
    starts = torch.randint(0, pool_len // 2, (bs,), generator=gen)
    lens = torch.randint(0, 6, (bs,), generator=gen)
    lens[0] = 0  # an empty span
    return starts.to(idx_dtype), (starts + lens).to(idx_dtype), lens


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_assign_req_to_token_pool(idx_dtype):
    gen = torch.Generator().manual_seed(1)
    bs, pool, pool_len = 5, 8, 24
    req = torch.randperm(pool, generator=gen)[:bs].to(idx_dtype)
    start, end, lens = _ragged(gen, bs, pool_len, idx_dtype)
    out = torch.randint(0, 1000, (int(lens.sum()),), generator=gen)
    for fn in _both("assign_req_to_token_pool_cpu"):
        table = torch.full((pool, pool_len), -7, dtype=torch.int32)
        ref = table.clone()
        off = 0
        for i in range(bs):
            r, s, e = int(req[i]), int(start[i]), int(end[i])
            ref[r, s:e] = out[off:off + e - s].int()
            off += e - s
        fn(req, table, start, end, out, pool_len)
        assert torch.equal(table, ref)


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_assign_extend_cache_locs(idx_dtype):
    gen = torch.Generator().manual_seed(2)
    bs, pool, pool_len = 6, 9, 20
    table = torch.randint(0, 5000, (pool, pool_len), generator=gen, dtype=torch.int32)
    req = torch.randperm(pool, generator=gen)[:bs].to(idx_dtype)
    start, end, lens = _ragged(gen, bs, pool_len, idx_dtype)
    for fn in _both("assign_extend_cache_locs_cpu"):
        out = torch.full((int(lens.sum()) + 3,), -1, dtype=torch.int64)
        ref = out.clone()
        off = 0
        for i in range(bs):
            r, s, e = int(req[i]), int(start[i]), int(end[i])
            ref[off:off + e - s] = table[r, s:e].long()
            off += e - s
        fn(req, table, start, end, out, pool_len)
        assert torch.equal(out, ref)  # the 3 spare entries stay -1


def test_assign_draft_cache_locs_contiguous():
    gen = torch.Generator().manual_seed(3)
    bs, pool, pool_len, topk, steps = 4, 6, 32, 2, 3
    table = torch.randint(0, 5000, (pool, pool_len), generator=gen, dtype=torch.int32)
    req = torch.randperm(pool, generator=gen)[:bs]
    seq = torch.randint(0, pool_len - topk * steps, (bs,), generator=gen)
    width = topk * steps
    for fn in _both("assign_draft_cache_locs_contiguous_cpu"):
        out = torch.zeros(bs * width, dtype=torch.int64)
        ref = torch.cat([table[int(req[i]), int(seq[i]):int(seq[i]) + width].long() for i in range(bs)])
        fn(req, table, seq, out, pool_len, topk, steps)
        assert torch.equal(out, ref)


def test_fill_bonus_tokens():
    gen = torch.Generator().manual_seed(4)
    bs, stride = 5, 4
    tokens = torch.randint(0, 100, (bs, stride), generator=gen)
    lens = torch.randint(1, stride + 1, (bs,), generator=gen).int()
    for fn in _both("fill_bonus_tokens_cpu"):
        bonus = torch.zeros(bs, dtype=torch.int64)
        fn(tokens, lens, bonus, stride)
        assert bonus.tolist() == [int(tokens[i, int(lens[i]) - 1]) for i in range(bs)]


def test_fill_accept_out_cache_loc():
    accept_index = torch.tensor([[0, 1, -1, -1], [4, -1, -1, -1], [8, 9, 10, 11]], dtype=torch.int32)
    out_cache_loc = torch.arange(100, 112)
    for fn in _both("fill_accept_out_cache_loc_cpu"):
        result = torch.full((12,), -1, dtype=torch.int64)
        fn(accept_index, out_cache_loc, result)
        # Kept in order: 0, 1, 4, 8, 9, 10, 11 -> slots 100, 101, 104, 108, ...; the tail untouched.
        assert result.tolist() == [100, 101, 104, 108, 109, 110, 111] + [-1] * 5


# ------------------------------------------------------------------------------------------------
# trees


def _random_parents(gen, n):
    """A tree in topological order: node 0 is the root, parent[i] < i."""
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]


def _links(parent):
    """first child / next sibling lists, children in increasing index order."""
    n = len(parent)
    first, sib = [-1] * n, [-1] * n
    for i in reversed(range(1, n)):
        sib[i], first[parent[i]] = first[parent[i]], i
    return first, sib


def test_reconstruct_indices_from_tree_mask():
    gen = torch.Generator().manual_seed(5)
    bs, n = 3, 7
    parents = [_random_parents(gen, n) for _ in range(bs)]
    mask = torch.zeros(bs, n, n, dtype=torch.bool)
    for b, parent in enumerate(parents):
        for i in range(n):
            j = i
            while j != -1:
                mask[b, i, j] = True
                j = parent[j]
    seq = torch.tensor([5, 0, 11])
    ref_pos, ref_idx, ref_next, ref_sib = [], [], [], []
    for b, parent in enumerate(parents):
        first, sib = _links(parent)
        for i in range(n):
            ref_pos.append(int(seq[b]) + int(mask[b, i, :i].sum()))
            ref_idx.append(b * n + i)
            ref_next.append(first[i])
            ref_sib.append(sib[i])
    for fn in _both("reconstruct_indices_from_tree_mask_cpu"):
        outs = [torch.full((bs * n + 2,), -9, dtype=torch.int64) for _ in range(4)]
        fn(mask.flatten(), seq, *outs, bs, n)
        for out, ref in zip(outs, (ref_pos, ref_idx, ref_next, ref_sib)):
            assert out.tolist() == ref + [-9, -9]


def _verify_ref(candidates, retrive_index, nxt, sib, target_predict, num_spec):
    """The loop spelled out in cpu-dev-recipe.md §4 op 6."""
    bs, n = len(candidates), len(candidates[0])
    predicts = [-5] * (bs * n)
    accept_index = [[-1] * num_spec for _ in range(bs)]
    accept_num = []
    for b in range(bs):
        last = retrive_index[b][0]
        accept_index[b][0] = last
        node, count = 0, 0
        for _ in range(num_spec - 1):
            child = nxt[b][node]
            while child != -1 and candidates[b][child] != target_predict[last]:
                child = sib[b][child]
            if child == -1:
                break
            predicts[last] = candidates[b][child]
            count += 1
            last = retrive_index[b][child]
            accept_index[b][count] = last
            node = child
        accept_num.append(count)
        predicts[last] = target_predict[last]
    return predicts, accept_index, accept_num


def _run_verify(fn, candidates, ridx, nxt, sib, target, num_spec):
    bs, n = candidates.shape
    predicts = torch.full((bs * n,), -5, dtype=torch.int32)
    accept_index = torch.full((bs, num_spec), -1, dtype=torch.int32)
    accept_num = torch.zeros(bs, dtype=torch.int32)
    fn(predicts, accept_index, accept_num, candidates, ridx, nxt, sib, target)
    return predicts.tolist(), accept_index.tolist(), accept_num.tolist()


def test_verify_tree_greedy_chain_by_hand():
    # Chain root -> 1 -> 2 -> 3 with drafts 5, 6, 7. The target's argmax after root, node 1 and
    # node 2 is 5, 6, 9: drafts 5 and 6 are accepted, 7 != 9 is rejected, the bonus is 9.
    candidates = torch.tensor([[1, 5, 6, 7]])
    ridx = torch.tensor([[0, 1, 2, 3]])
    nxt, sib = torch.tensor([[1, 2, 3, -1]]), torch.full((1, 4), -1)
    target = torch.tensor([5, 6, 9, 0])
    for fn in _both("verify_tree_greedy_cpu"):
        predicts, accept_index, accept_num = _run_verify(fn, candidates, ridx, nxt, sib, target, 4)
        assert accept_num == [2]
        assert accept_index == [[0, 1, 2, -1]]
        assert predicts == [5, 6, 9, -5]


def test_verify_tree_greedy_random_trees():
    gen = torch.Generator().manual_seed(6)
    for trial in range(20):
        bs, n, num_spec = 3, 6, 4
        rows_next, rows_sib = [], []
        for _ in range(bs):
            first, sib = _links(_random_parents(gen, n))
            rows_next.append(first)
            rows_sib.append(sib)
        candidates = torch.randint(0, 3, (bs, n), generator=gen)  # tiny vocab: many matches
        ridx = (torch.arange(bs)[:, None] * n + torch.arange(n)[None, :])
        target = torch.randint(0, 3, (bs * n,), generator=gen)
        nxt, sib = torch.tensor(rows_next), torch.tensor(rows_sib)
        ref = _verify_ref(candidates.tolist(), ridx.tolist(), rows_next, rows_sib, target.tolist(), num_spec)
        for fn in _both("verify_tree_greedy_cpu"):
            assert _run_verify(fn, candidates, ridx, nxt, sib, target, num_spec) == (list(ref[0]), ref[1], ref[2])


def _eagle_tree_inputs(gen, bs, topk, depth, n):
    """parent_list / selected_index laid out as EAGLE builds them. Level-1 tokens have flat indices
    0..topk-1; a level-l token (l >= 2) has flat index topk + (l-2)*topk^2 + j*topk + c, the c-th
    child of the j-th token expanded from level l-1, whose flat index sits in parent_list slot
    1 + (l-2)*topk + j (slot 0 is the root). selected_index is a sorted pick of n-1 tokens, so some
    picked tokens may miss their parent (the kernel's "not found" path)."""
    parent_lists, selected = [], []
    for _ in range(bs):
        plist = [-1] + list(range(topk))  # the level-1 tokens all expand into level 2
        level = list(range(topk))
        tokens = list(level)
        for lvl in range(2, depth + 1):
            if lvl >= 3:  # expand topk tokens of the previous level
                plist += [level[int(k)] for k in torch.randperm(len(level), generator=gen)[:topk]]
            base = topk + (lvl - 2) * topk * topk
            level = [base + j * topk + c for j in range(topk) for c in range(topk)]
            tokens += level
        assert len(plist) == topk * (depth - 1) + 1
        picks = torch.randperm(len(tokens), generator=gen)[: n - 1]
        selected.append(sorted(tokens[int(p)] for p in picks))
        parent_lists.append(plist)
    return torch.tensor(parent_lists), torch.tensor(selected)


def _build_tree_ref(plist, sel, seq, topk, depth, n, mode):
    """Straightforward loop for build_tree_kernel_efficient (sglang's kernel semantics)."""
    bs = len(seq)
    positions, retrive_index = [0] * (bs * n), [[0] * n for _ in range(bs)]
    nxt, sib = [[-1] * n for _ in range(bs)], [[-1] * n for _ in range(bs)]
    cells = {}
    prefix = 0
    for b in range(bs):
        parent = [-1] * n
        for i in range(1, n):
            slot = sel[b][i - 1] // topk
            if slot == 0:
                parent[i] = 0
            else:
                tok = plist[b][slot]
                parent[i] = next((pp + 1 for pp in range(n - 1) if sel[b][pp] == tok), -1)
        for i in reversed(range(1, n)):  # push-front: children end up in increasing order
            if parent[i] >= 0:
                sib[b][i], nxt[b][parent[i]] = nxt[b][parent[i]], i
        for i in range(n):
            retrive_index[b][i] = b * n + i
        for x in range(n):
            row, count = [0] * n, 0
            row[0] = 1
            node = x
            if x > 0:
                for _ in range(depth):
                    row[node] = 1
                    count += 1
                    if parent[node] <= 0:
                        break
                    node = parent[node]
            positions[b * n + x] = seq[b] + count
            for j in range(n):
                if mode == 0:
                    cells[n * n * b + n * prefix + (seq[b] + n) * x + seq[b] + j] = row[j]
                else:
                    cells[n * n * b + n * x + j] = row[j]
        prefix += seq[b]
    return positions, retrive_index, nxt, sib, cells


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("topk,depth,n", [(1, 4, 5), (2, 3, 6), (3, 4, 8)])
def test_build_tree_kernel_efficient(mode, topk, depth, n):
    gen = torch.Generator().manual_seed(7 + topk)
    bs = 3
    plist, sel = _eagle_tree_inputs(gen, bs, topk, depth, n)
    seq = torch.tensor([3, 1, 6])
    positions_ref, ridx_ref, nxt_ref, sib_ref, cells = _build_tree_ref(
        plist.tolist(), sel.tolist(), seq.tolist(), topk, depth, n, mode)
    size = n * n * bs + (n * int(seq.sum()) if mode == 0 else 0)
    for fn in _both("build_tree_kernel_efficient_cpu"):
        tree_mask = torch.full((size,), 7, dtype=torch.uint8)  # 7 = "not written by the op"
        positions = torch.zeros(bs * n, dtype=torch.int64)
        retrieve = torch.full((3, bs, n), -1, dtype=torch.int64)
        fn(plist, sel, seq, tree_mask, positions, retrieve[0], retrieve[1], retrieve[2], topk, depth, n, mode)
        assert positions.tolist() == positions_ref
        assert retrieve[0].tolist() == ridx_ref
        assert retrieve[1].tolist() == nxt_ref
        assert retrieve[2].tolist() == sib_ref
        expected = [7] * size
        for k, v in cells.items():
            expected[k] = v
        assert tree_mask.tolist() == expected  # prefix columns (mode 0) untouched


def test_build_tree_chain_by_hand():
    # topk 1, depth 3, 4 nodes: a chain root -> 1 -> 2 -> 3. Token flat indices 0, 1, 2; token k's
    # parent slot is k // 1 = k, and parent_list[k] is the flat index of the token it expands.
    plist = torch.tensor([[-1, 0, 1]])
    sel = torch.tensor([[0, 1, 2]])
    seq = torch.tensor([10])
    tree_mask = torch.zeros(16, dtype=torch.bool)
    positions = torch.zeros(4, dtype=torch.int64)
    retrieve = torch.full((3, 1, 4), -1, dtype=torch.int64)
    ops.build_tree_kernel_efficient_cpu(plist, sel, seq, tree_mask, positions, *retrieve, 1, 3, 4, 1)
    assert positions.tolist() == [10, 11, 12, 13]
    assert retrieve[1].tolist() == [[1, 2, 3, -1]] and retrieve[2].tolist() == [[-1, -1, -1, -1]]
    assert tree_mask.view(4, 4).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_build_tree_rejects_bitpacked_mode():
    with pytest.raises(NotImplementedError, match="bit-packed"):
        ops.build_tree_kernel_efficient_cpu(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.zeros(4),
                                            torch.zeros(2), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2),
                                            1, 1, 2, 2)
