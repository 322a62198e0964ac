"""SGLang's per-request logit adjustments, applied to verify windows without losing exactness.

The plain engine samples each token from logits adjusted by, in this order: penalties (frequency,
presence, repetition, min_new_tokens), the grammar's vocabulary mask, `logit_bias`, then custom
logit processors (`ModelRunner._preprocess_logits`, then `Sampler._preprocess_logits`).

- `logit_bias` does not depend on the tokens generated so far: adding it to every row of a window
  gives each position exactly the plain engine's distribution, so biased requests still speculate.
- Penalties, grammar masks and custom processors depend on the tokens before each position, and
  SGLang's state for them (penalizer counts, grammar FSM) only knows the committed tokens. A request
  using any of them is verified with length 0 for the round: its window is the anchor row alone,
  adjusted by SGLang's own code from SGLang's own state, so the round is plain decoding for it,
  token for token. (SGLang's built-in speculative workers instead apply the committed-prefix
  penalty to every draft position, which is not exact.)
"""

from __future__ import annotations

import torch


def needs_plain_decoding(req) -> bool:
    """True if `req`'s next-token distribution depends on state only SGLang can advance."""
    params = req.sampling_params
    penalized = (
        (params.frequency_penalty or 0.0) != 0.0
        or (params.presence_penalty or 0.0) != 0.0
        or (params.repetition_penalty or 1.0) != 1.0
        or len(req.output_ids) < (params.min_new_tokens or 0)
    )
    return penalized or req.grammar is not None or getattr(req, "custom_logit_processor", None) is not None


def plain_decoding_rows(reqs) -> torch.Tensor:
    """[R] bool, on CPU."""
    return torch.tensor([needs_plain_decoding(req) for req in reqs], dtype=torch.bool)


def has_adjustments(sampling_info, plain_rows: torch.Tensor) -> bool:
    return bool(plain_rows.any()) or getattr(sampling_info, "logit_bias", None) is not None


def adjust_verify_logits(
    logits: torch.Tensor,  # [T, V] float32 verify logits, modified in place
    starts: torch.Tensor,  # [R] int64 first row of each request's window (its anchor row)
    widths: torch.Tensor,  # [R] int64 window widths; 1 for every plain-decoding row
    sampling_info,
) -> None:
    """Give every verify row the logits the plain engine would sample that position from."""
    device = logits.device
    starts, widths = starts.to(device), widths.to(device)
    vocab = logits.shape[1]

    # Anchor rows: [R, V], one per request in batch order, as SGLang's sampler lays them out.
    anchor = logits.index_select(0, starts)
    if getattr(sampling_info, "grammars", None):
        sampling_info.update_regex_vocab_mask()
    if getattr(sampling_info, "vocab_size", vocab) != vocab:  # both come from model_config.vocab_size
        raise ValueError(f"verify logits have {vocab} columns, SGLang's sampling info {sampling_info.vocab_size}")
    sampling_info.apply_logits_bias(anchor)
    if getattr(sampling_info, "has_custom_logit_processor", False):
        from sglang.srt.layers.sampler import apply_custom_logit_processor

        apply_custom_logit_processor(anchor, sampling_info)
    logits.index_copy_(0, starts, anchor)

    # Draft rows (only requests that speculate): logit_bias, the one position-independent term.
    bias = getattr(sampling_info, "logit_bias", None)  # [R, V] or None
    if bias is None or int(widths.max()) <= 1:
        return
    request_of_row = torch.repeat_interleave(torch.arange(len(widths), device=device), widths)  # [T]
    is_draft_row = torch.ones(logits.shape[0], dtype=torch.bool, device=device)
    is_draft_row[starts] = False
    rows = is_draft_row.nonzero().squeeze(1)
    logits[rows] += bias[request_of_row[rows], :vocab].to(logits.dtype)

