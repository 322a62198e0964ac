"""Lossless tree-free chain acceptance (speculative sampling over one draft chain per request).

Naming: **p is the target** distribution and **q is the draft** distribution, as in the DSpark
paper (p_t, p_d) and vLLM. gpt-fast uses the opposite letters (its `p` is the draft, `q` the
target); translate before comparing.

Vocabulary (per request r, after the anchor token, the last committed one):
- drafts x_1..x_gamma were sampled from q_1..q_gamma; the first ``verify_lens[r]`` are verified;
- p_i is the target distribution for the position after [anchor, x_1..x_i] (row i of
  ``target_probs``, i = 0..verify_len);
- accepted: x_1..x_n, the longest prefix passing the test below (n = ``num_accepted``);
- next token: the correction at the first rejection, or the bonus when all verified drafts pass.
  Exactly n + 1 tokens are committed.

Sampled rows: accept x_i iff u_i < min(1, p_i(x_i) / q_i(x_i)) (q_i(x_i) == 0 rejects); at the
first rejection draw from norm(max(p_i - q_i, 0)) (p_i itself if that is all zero, i.e. p_i == q_i
up to rounding); after n == verify_len acceptances draw the bonus from p_n. Greedy rows: accept
while x_i == argmax p_i (first index on ties); the next token is argmax p_n.

The output equals the target's distribution for any verify length that does not depend on the
target or on the uniforms (see DESIGN.md, "Lossless"). Randomness enters only as uniform tensors,
so a fused kernel can be compared with this reference exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark_sglang.sampling import SamplingBatch, is_greedy, process_logits, sample_from_probs


@dataclass
class AcceptanceResult:
    num_accepted: torch.Tensor  # [R] int64, drafts accepted, 0..verify_lens[r]
    next_tokens: torch.Tensor  # [R] int64, correction (first rejection) or bonus (all accepted)
    output_tokens: torch.Tensor  # [R, gamma+1] int64: accepted drafts, then next token, then -1


def _clean_probs(probs: torch.Tensor) -> torch.Tensor:
    """NaN, +-inf and negative probabilities count as zero (never drawn, never accepted)."""
    return torch.nan_to_num(probs.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)


def _check_inputs(target_probs, draft_tokens, draft_probs, verify_lens, greedy,
                  accept_uniforms, sample_uniforms) -> None:
    if target_probs.ndim != 3:
        raise ValueError(f"target_probs must be [R, gamma+1, V], got {tuple(target_probs.shape)}")
    num_reqs, rows, vocab = target_probs.shape
    gamma = rows - 1
    expected = {
        "draft_tokens": (draft_tokens, (num_reqs, gamma)),
        "draft_probs": (draft_probs, (num_reqs, gamma, vocab)),
        "verify_lens": (verify_lens, (num_reqs,)),
        "greedy": (greedy, (num_reqs,)),
        "accept_uniforms": (accept_uniforms, (num_reqs, gamma)),
        "sample_uniforms": (sample_uniforms, (num_reqs,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
    if greedy.dtype != torch.bool:
        raise ValueError(f"greedy must be bool, got {greedy.dtype}")
    # NOTE: host sync; an out-of-range length would silently read rows past the chain.
    if num_reqs and bool(((verify_lens < 0) | (verify_lens > gamma)).any()):
        raise ValueError(f"verify_lens must lie in [0, {gamma}], got {verify_lens.tolist()}")


def chain_accept(
    target_probs: torch.Tensor,  # [R, gamma+1, V] processed p; rows > verify_lens[r] ignored
    draft_tokens: torch.Tensor,  # [R, gamma] int64
    draft_probs: torch.Tensor,  # [R, gamma, V] processed q each draft was sampled from
    verify_lens: torch.Tensor,  # [R] int64 in [0, gamma], drafts verified (anchor row excluded)
    greedy: torch.Tensor,  # [R] bool
    accept_uniforms: torch.Tensor,  # [R, gamma] U(0,1), one coin per draft
    sample_uniforms: torch.Tensor,  # [R] U(0,1), for the correction or bonus draw
) -> AcceptanceResult:
    """Accept the longest passing prefix of each request's draft chain, then draw one more token.

    Shape: ``target_probs`` [R, gamma+1, V]; ``draft_tokens`` [R, gamma]; ``draft_probs``
    [R, gamma, V]; ``verify_lens``, ``greedy``, ``sample_uniforms`` [R]; ``accept_uniforms``
    [R, gamma]. R may be 0 and gamma may be 0.

    Rows of ``target_probs`` past ``verify_lens[r]`` and draft positions past it are never read
    into the result, so they may hold anything, NaN included. In rows that are used, NaN, inf and
    negative entries count as probability zero (`sampling.process_logits` never produces them).

    Returns
    -------
    AcceptanceResult
        ``num_accepted`` [R] int64 in [0, verify_lens]; ``next_tokens`` [R] int64;
        ``output_tokens`` [R, gamma+1] int64 = x_1..x_n, next token, then -1 padding.
    """
    _check_inputs(target_probs, draft_tokens, draft_probs, verify_lens, greedy,
                  accept_uniforms, sample_uniforms)
    num_reqs, rows, vocab = target_probs.shape
    gamma = rows - 1
    device = target_probs.device
    verify_lens = verify_lens.long()
    positions = torch.arange(gamma, device=device)  # [gamma]
    verified = positions[None, :] < verify_lens[:, None]  # [R, gamma]
    # Unverified drafts may be padding (e.g. -1): never index with them.
    draft_tokens = torch.where(verified, draft_tokens.long(), 0)  # [R, gamma]

    # Ratio test for every position at once; positions past verify_len are masked below.
    p_at_draft = torch.gather(target_probs[:, :gamma], 2, draft_tokens[..., None]).squeeze(-1)
    q_at_draft = torch.gather(draft_probs, 2, draft_tokens[..., None]).squeeze(-1)  # [R, gamma]
    p_at_draft = _clean_probs(p_at_draft)
    q_at_draft = _clean_probs(q_at_draft)
    # NOTE: q(x) == 0 rejects (ratio 0), avoiding 0/0 = NaN. u < min(1, r) equals u < r for u < 1.
    ratio = torch.where(q_at_draft > 0, p_at_draft / torch.where(q_at_draft > 0, q_at_draft, 1.0), 0.0)
    sampled_ok = accept_uniforms.float() < ratio  # [R, gamma]

    # Greedy: argmax of every row (cleaned, so a NaN can never win), first index on ties.
    # One [R, V] row block at a time: cleaning the whole [R, gamma+1, V] block would copy it twice.
    target_argmax = torch.stack([_clean_probs(target_probs[:, j]).argmax(dim=-1)
                                 for j in range(target_probs.shape[1])], dim=1)  # [R, gamma+1]
    greedy_ok = draft_tokens == target_argmax[:, :gamma]  # [R, gamma]

    accept = torch.where(greedy[:, None], greedy_ok, sampled_ok) & verified  # [R, gamma]
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)  # [R], length of the passing prefix

    # The row the next token comes from: p_n, and q_n+1 (0-based draft index n) on rejection.
    row = num_accepted[:, None, None].expand(num_reqs, 1, vocab)  # [R, 1, V]
    p_next = _clean_probs(torch.gather(target_probs, 1, row).squeeze(1))  # [R, V]
    rejected = num_accepted < verify_lens  # [R]
    if gamma > 0:
        q_row = row.clamp(max=gamma - 1)
        q_next = _clean_probs(torch.gather(draft_probs, 1, q_row).squeeze(1))  # [R, V]
        residual = (p_next - q_next).clamp_min(0.0)  # [R, V]
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
        dist = torch.where(rejected[:, None], residual, p_next)  # [R, V]
    else:
        dist = p_next
    sampled_next = sample_from_probs(dist, sample_uniforms)  # [R]
    greedy_next = torch.gather(target_argmax, 1, num_accepted[:, None]).squeeze(1)  # [R]
    next_tokens = torch.where(greedy, greedy_next, sampled_next)  # [R]

    slots = torch.arange(gamma + 1, device=device)[None, :]  # [1, gamma+1]
    padded_drafts = torch.nn.functional.pad(draft_tokens, (0, 1), value=-1)  # [R, gamma+1]
    output_tokens = torch.where(slots < num_accepted[:, None], padded_drafts, -1)
    output_tokens = torch.where(slots == num_accepted[:, None], next_tokens[:, None], output_tokens)
    return AcceptanceResult(num_accepted, next_tokens, output_tokens)


def greedy_chain_accept(
    target_tokens: torch.Tensor,  # [R, W] int64: the target's argmax after [anchor, x_1..x_j], j < W
    draft_tokens: torch.Tensor,  # [R, W-1] int64
    verify_lens: torch.Tensor,  # [R] int64 in [0, W-1]
) -> AcceptanceResult:
    """`chain_accept` for a batch whose rows are all greedy, from the target's argmax tokens alone.

    Greedy acceptance reads nothing of p but its argmax, so a greedy batch needs no [R, W, V]
    probability block: take ``sanitize_logits(logits).argmax(-1)`` per verify row (what
    `process_logits` puts its one-hot at) and pass it here. Same result as `chain_accept` on the
    one-hot rows; ``output_tokens`` is [R, W].
    """
    num_reqs, width = target_tokens.shape
    if draft_tokens.shape != (num_reqs, width - 1) or verify_lens.shape != (num_reqs,):
        raise ValueError(f"draft_tokens must be [{num_reqs}, {width - 1}] and verify_lens [{num_reqs}], got "
                         f"{list(draft_tokens.shape)} and {list(verify_lens.shape)}")
    positions = torch.arange(width, device=target_tokens.device)  # [W]
    verified = positions[None, :-1] < verify_lens[:, None]  # [R, W-1]
    accept = (draft_tokens == target_tokens[:, :-1]) & verified
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)  # [R]
    next_tokens = target_tokens.gather(1, num_accepted[:, None]).squeeze(1)  # [R]
    padded_drafts = torch.nn.functional.pad(draft_tokens.long(), (0, 1), value=-1)  # [R, W]
    output_tokens = torch.where(positions[None, :] < num_accepted[:, None], padded_drafts, -1)
    output_tokens = torch.where(positions[None, :] == num_accepted[:, None], next_tokens[:, None], output_tokens)
    return AcceptanceResult(num_accepted, next_tokens, output_tokens)


def chain_accept_from_logits(
    target_logits: torch.Tensor,  # [R, gamma+1, V] raw target logits
    draft_tokens: torch.Tensor,  # [R, gamma] int64
    draft_probs: torch.Tensor,  # [R, gamma, V] processed q (same SamplingBatch applied)
    verify_lens: torch.Tensor,  # [R] int64 in [0, gamma]
    sampling: SamplingBatch,  # per-request parameters, [R] each
    accept_uniforms: torch.Tensor,  # [R, gamma] U(0,1)
    sample_uniforms: torch.Tensor,  # [R] U(0,1)
) -> AcceptanceResult:
    """`chain_accept` after `process_logits` on every target row with its request's parameters.

    Shape: as `chain_accept`, with ``target_logits`` [R, gamma+1, V] in place of probabilities.
    Greedy rows are those `sampling.is_greedy` marks. Rows past ``verify_lens`` are processed too
    (their values are ignored; non-finite logits there are harmless).
    """
    if target_logits.ndim != 3:
        raise ValueError(f"target_logits must be [R, gamma+1, V], got {tuple(target_logits.shape)}")
    num_reqs, rows, vocab = target_logits.shape

    def per_row(values: torch.Tensor) -> torch.Tensor:  # [R] -> [R * (gamma+1)]
        if values.shape != (num_reqs,):
            raise ValueError(f"sampling parameters must have shape [{num_reqs}], got {tuple(values.shape)}")
        return values.repeat_interleave(rows)

    target_probs = process_logits(
        target_logits.reshape(num_reqs * rows, vocab),
        per_row(sampling.temperatures), per_row(sampling.top_ks),
        per_row(sampling.top_ps), per_row(sampling.min_ps),
    ).reshape(num_reqs, rows, vocab)
    return chain_accept(
        target_probs, draft_tokens, draft_probs, verify_lens,
        is_greedy(sampling.temperatures, sampling.top_ks), accept_uniforms, sample_uniforms,
    )
