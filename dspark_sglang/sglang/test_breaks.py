"""Deliberately wrong acceptance, for negative controls only (DSPARK_TEST_BREAK; settings.py).

The server-level distribution test must tell a correct server from these at the same sample size:
- `residual_from_p`: after a rejection, the correction token is drawn from the target's p instead of
  the residual norm(max(p - q, 0)): drafts the target rejected come back too often;
- `temperature_x1.25`: drafts are verified against the target at 1.25x the request's temperature.
"""

from __future__ import annotations

import torch

from dspark_sglang.acceptance import AcceptanceResult
from dspark_sglang.sampling import sample_from_probs

TEMPERATURE_FACTOR = 1.25


def break_temperatures(kind: str | None, temperatures: torch.Tensor) -> torch.Tensor:
    """[T] row temperatures the target probabilities are computed at."""
    return temperatures * TEMPERATURE_FACTOR if kind == "temperature_x1.25" else temperatures


def break_residual(
    kind: str | None,
    result: AcceptanceResult,
    target_probs: torch.Tensor,  # [R, W, V]
    verify_lens: torch.Tensor,  # [R] int64
    greedy: torch.Tensor,  # [R] bool
    sample_uniforms: torch.Tensor,  # [R]
) -> AcceptanceResult:
    if kind != "residual_from_p":
        return result
    n = result.num_accepted  # [R]
    rows = target_probs[torch.arange(n.numel(), device=n.device), n]  # [R, V] p at the rejected position
    redrawn = sample_from_probs(rows, sample_uniforms)  # [R]
    wrong = (n < verify_lens.to(n.device)) & ~greedy  # sampled requests that rejected a draft
    next_tokens = torch.where(wrong, redrawn, result.next_tokens)
    slots = torch.arange(result.output_tokens.shape[1], device=n.device)[None, :]
    output = torch.where(slots == n[:, None], next_tokens[:, None], result.output_tokens)
    return AcceptanceResult(n, next_tokens, output)
