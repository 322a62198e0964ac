"""kernels/topk_budget.py against dspark_sglang.schedulers.admit_top (TRITON_INTERPRET=1).

Integer keys and compares only, so the kernel must equal the reference exactly, ties included.
"""

import pytest
import torch

from dspark_sglang import schedulers
from dspark_sglang.kernels import dispatch
from dspark_sglang.kernels._common import KernelInputError, rank_offsets
from dspark_sglang.kernels.topk_budget import topk_budget, topk_budget_ref

pytestmark = pytest.mark.interp
POISON = -7
NEG_INF = float("-inf")


def survivals(seed: int, num_reqs: int, num_pos: int, monotone: bool = True) -> torch.Tensor:
    """Scheduler-like survivals: cumprod of confidences with many exact ties (1.0 and dyadic values
    repeat across requests and positions), some below-eps candidates set to -inf."""
    g = torch.Generator().manual_seed(seed)
    dyadic = torch.tensor([1.0, 1.0, 0.75, 0.5, 0.25])[torch.randint(0, 5, (num_reqs, num_pos), generator=g)]
    smooth = 0.5 + 0.5 * torch.rand(num_reqs, num_pos, generator=g)
    conf = torch.where(torch.rand(num_reqs, num_pos, generator=g) < 0.6, dyadic, smooth)
    surv = torch.cumprod(conf, dim=1) if monotone else conf
    cut = torch.rand(num_reqs, 1, generator=g) < 0.2  # a request whose tail fell below eps
    tail = torch.arange(num_pos)[None, :] >= num_pos // 2
    return torch.where(cut & tail, NEG_INF, surv)


def poisoned(num_reqs: int) -> torch.Tensor:
    return torch.full((num_reqs,), POISON, dtype=torch.int64)


def check_counts(surv: torch.Tensor, counts, **kw) -> None:
    for count in counts:
        got = topk_budget(surv, count, out=poisoned(surv.shape[0]), **kw)
        assert torch.equal(got, topk_budget_ref(surv, count)), f"count={count}"


@pytest.mark.parametrize(
    "seed, num_reqs, num_pos, block_r",
    [
        (0, 1, 7, None),  # batch 1
        (1, 5, 7, None),
        (2, 37, 8, None),  # ragged admitted counts across many requests
        (3, 9, 5, 4),  # several row tiles, last one partial
        (4, 3, 1, None),  # L = 1
    ],
)
def test_equals_reference(seed, num_reqs, num_pos, block_r):
    surv = survivals(seed, num_reqs, num_pos)
    total = num_reqs * num_pos
    check_counts(surv, sorted({1, 2, total // 2, total - 1, total + 3}), block_r=block_r)


def test_non_monotone_rows_and_signed_zero():
    # The reference counts keys >= threshold whatever the row order; -0.0 has a negative key.
    surv = survivals(5, 6, 6, monotone=False)
    surv[0, 2] = -0.0
    surv[1, :] = 0.0
    check_counts(surv, [1, 7, 18, 30, 36])


def test_all_ties_follow_position_then_request():
    # Every survival 1.0: rank = position-major index, so K = 5 over R = 3 gives
    # (r0,k0) (r1,k0) (r2,k0) (r0,k1) (r1,k1) -> [2, 2, 1].
    surv = torch.ones(3, 4)
    assert topk_budget(surv, 5, out=poisoned(3)).tolist() == [2, 2, 1]
    check_counts(surv, [1, 4, 6, 11, 12])


def test_matches_the_scheduler_allocation():
    """Inside LaggedBudgetScheduler's call: same result as schedulers.admit_top with the workspace offsets."""
    surv = survivals(6, 16, 7)
    offsets = rank_offsets(16, 7, surv.device)
    for count in (0, 10, 50, 112):
        assert torch.equal(dispatch.admit_top(surv, count, offsets, backend="triton"),
                           schedulers.admit_top(surv, count, offsets))


def test_empty_and_bad_inputs():
    assert topk_budget(torch.zeros(0, 4), 3).shape == (0,)
    assert topk_budget(torch.ones(2, 3), 0, out=poisoned(2)).tolist() == [0, 0]
    with pytest.raises(ValueError, match="survival"):
        topk_budget(torch.ones(2, 3, dtype=torch.float64), 2)
    with pytest.raises(KernelInputError, match="kernels/topk_budget.py"):
        topk_budget(torch.ones(3), 2)
    with pytest.raises(ValueError, match="out"):
        topk_budget(torch.ones(2, 3), 2, out=torch.zeros(2, dtype=torch.int32))
