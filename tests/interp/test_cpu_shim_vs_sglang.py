"""The sgl_kernel CPU fallback's tree ops against SGLang's own Triton kernels (TRITON_INTERPRET=1).

tests/unit/test_cpu_shim.py checks each op against a loop written from our reading of the kernels;
this checks that reading against SGLang 0.5.23's Triton versions, which run on CPU tensors under the
interpreter. Importing them needs `sgl_kernel`, which needs the shim on sys.path.
"""

import importlib.util
import os
import sys

import pytest
import torch

from dspark_sglang.cpu_shim import shim_dir

pytestmark = pytest.mark.interp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit"))
from test_cpu_shim import _eagle_tree_inputs, _links, _random_parents, ops  # noqa: E402


@pytest.fixture(scope="module")
def sglang_tree_kernels():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported (tests/conftest.py sets it)")
    if shim_dir() not in sys.path:
        sys.path.insert(0, shim_dir())
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("sglang is not installed")
    from sglang.kernels.ops.speculative.reconstruct_tree import reconstruct_indices_from_tree_mask_triton
    from sglang.kernels.ops.speculative.spec_tree import (
        TreeMaskMode,
        sgl_build_tree_kernel_triton,
        verify_tree_greedy_triton,
    )

    return {"build": sgl_build_tree_kernel_triton, "mode": TreeMaskMode, "verify": verify_tree_greedy_triton,
            "reconstruct": reconstruct_indices_from_tree_mask_triton}


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("topk,depth,n", [(1, 4, 5), (2, 3, 6), (3, 4, 8)])
def test_build_tree_matches_sglang(sglang_tree_kernels, mode, topk, depth, n):
    gen = torch.Generator().manual_seed(100 + topk)
    bs = 3
    plist, sel = _eagle_tree_inputs(gen, bs, topk, depth, n)
    seq = torch.tensor([3, 1, 6])
    size = n * n * bs + (n * int(seq.sum()) if mode == 0 else 0)
    results = []
    for run in ("ours", "sglang"):
        tree_mask = torch.ones(size, dtype=torch.bool)
        positions = torch.zeros(bs * n, dtype=torch.int64)
        retrieve = torch.full((3, bs, n), -1, dtype=torch.int64)
        if run == "ours":
            ops.build_tree_kernel_efficient_cpu(plist, sel, seq, tree_mask, positions, *retrieve, topk, depth, n, mode)
        else:
            sglang_tree_kernels["build"](plist, sel, seq, tree_mask, positions, *retrieve, topk, depth, n,
                                         sglang_tree_kernels["mode"](mode))
        results.append((tree_mask, positions, retrieve))
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


def test_verify_tree_greedy_matches_sglang(sglang_tree_kernels):
    gen = torch.Generator().manual_seed(200)
    bs, n, num_spec = 4, 6, 4
    links = [_links(_random_parents(gen, n)) for _ in range(bs)]
    nxt = torch.tensor([first for first, _ in links])
    sib = torch.tensor([s for _, s in links])
    candidates = torch.randint(0, 3, (bs, n), generator=gen)
    ridx = torch.arange(bs * n).view(bs, n)
    target = torch.randint(0, 3, (bs, n), generator=gen)
    results = []
    for fn in (ops.verify_tree_greedy_cpu, sglang_tree_kernels["verify"]):
        predicts = torch.full((bs * n,), -5, dtype=torch.int64)
        accept_index = torch.full((bs, num_spec), -1, dtype=torch.int64)
        accept_num = torch.zeros(bs, dtype=torch.int64)
        fn(predicts, accept_index, accept_num, candidates, ridx, nxt, sib, target)
        results.append((predicts, accept_index, accept_num))
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


def test_reconstruct_matches_sglang(sglang_tree_kernels):
    gen = torch.Generator().manual_seed(300)
    bs, n = 3, 7
    mask = torch.zeros(bs, n, n, dtype=torch.bool)
    for b in range(bs):
        parent = _random_parents(gen, n)
        for i in range(n):
            j = i
            while j != -1:
                mask[b, i, j] = True
                j = parent[j]
    seq = torch.tensor([5, 0, 11])
    results = []
    for fn in (ops.reconstruct_indices_from_tree_mask_cpu, sglang_tree_kernels["reconstruct"]):
        outs = [torch.full((bs * n,), -9, dtype=torch.int64) for _ in range(4)]
        fn(mask.flatten(), seq, *outs, bs, n)
        results.append(outs)
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)
