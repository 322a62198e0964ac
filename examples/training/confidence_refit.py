"""Refit a DSpark confidence head on text the drafter never trained on.

Why: the confidence head is a logistic regression on [h_k ; W1[prev_k]] that learns P(slot k is
accepted) from the drafter's own agreement with the target (BCE on 1 - TV, DeepSpec's loss). On a
small corpus seen for many epochs, the backbone fits its training text much better than new text,
so a head trained jointly learns the training text's acceptance and is over-confident everywhere
else (the zoo DSpark at 8000 steps: mean confidence 0.41-0.48 at position 1 where 0.26-0.29 of
first drafts are accepted). STS cannot remove that: it only rescales each position's logit.

The fix keeps the drafter's tokens bit-identical: freeze everything, run the drafter teacher-forced
over fresh self-distilled sequences, and refit only the head's 609 weights to the same target
(weighted BCE on 1 - TV, slot weights exp(-k/decay)), full batch with L-BFGS from the trained head.

Pure functions here (no I/O but `write_confidence_head`); the CLI is examples/refit_confidence.py.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from examples.training.batches import collate, supervised_blocks
from examples.training.features import FeatureSet
from examples.training.forward import block_scores
from examples.training.losses import distill_terms

CONFIDENCE_KEYS = ("confidence_head.proj.weight", "confidence_head.proj.bias")


@dataclass
class HeadRows:
    """Frozen confidence-head inputs and targets, one row per supervised (anchor, slot)."""

    hidden: torch.Tensor  # [n, H] float32, final-normed block hidden state h_k
    prev_rows: torch.Tensor  # [n, rank] float32, W1[prev_k] (rank 0 without Markov features)
    accept: torch.Tensor  # [n] float32, 1 - TV(p_draft, p_target) at that slot (teacher-forced)
    slot: torch.Tensor  # [n] int64, k

    def __len__(self) -> int:
        return int(self.accept.numel())


def require_confidence_head(drafter) -> None:
    if getattr(drafter, "confidence_head", None) is None:
        raise ValueError("this drafter has no confidence head (DFlash, or DSpark with confidence_head false): "
                         "nothing to refit")


@torch.no_grad()
def collect_rows(drafter, fs: FeatureSet, seq_ids: list[int], *, max_anchors: int = 96, seed: int = 1234) -> HeadRows:
    """Run the frozen drafter teacher-forced over `seq_ids` (`max_anchors` seeded anchors each) and keep
    every supervised slot's head input and acceptance target: the rows training supervises."""
    require_confidence_head(drafter)
    rng = random.Random(seed)
    parts: dict[str, list[torch.Tensor]] = {"hidden": [], "prev_rows": [], "accept": [], "slot": []}
    for s in seq_ids:
        b = collate(fs, [s], rng, max_anchors)
        if not bool(b["keep"].any()):
            continue
        hidden, labels, prev, valid, tk_ids, tk_lp = supervised_blocks(drafter, b)  # [N, G, H], [N, G], ...
        logits, _ = block_scores(drafter, hidden, prev)  # [N, G, V] full vocabulary, float32
        accept = distill_terms(logits, labels, tk_ids, tk_lp)["accept"]  # [N, G]
        rows = drafter.markov_head.markov_w1(prev) if drafter.confidence_head.with_markov else hidden[..., :0]
        parts["hidden"].append(hidden[valid].float())
        parts["prev_rows"].append(rows[valid].float())
        parts["accept"].append(accept[valid].float())
        parts["slot"].append(torch.arange(valid.shape[-1]).expand_as(valid)[valid])
    if not parts["accept"]:
        raise ValueError("no supervised slot in the given sequences (every response shorter than 2 tokens?)")
    return HeadRows(*(torch.cat(parts[k]) for k in ("hidden", "prev_rows", "accept", "slot")))


def slot_weights(slot: torch.Tensor, decay: float) -> torch.Tensor:
    """DeepSpec's per-slot loss weight exp(-k / decay) [n]."""
    return torch.exp(-slot.float() / decay)


def head_logits(head, rows: HeadRows) -> torch.Tensor:  # [n]
    return head(rows.hidden, rows.prev_rows if head.with_markov else None)


def head_report(head, rows: HeadRows, decay: float) -> dict:
    """Weighted BCE, mean |sigmoid(c) - (1 - TV)| and, per slot, mean confidence vs mean target (their
    gap is the offset STS cannot remove)."""
    with torch.no_grad():
        c = head_logits(head, rows).float()
        w = slot_weights(rows.slot, decay)
        bce = float((F.binary_cross_entropy_with_logits(c, rows.accept, reduction="none") * w).sum() / w.sum())
        err = float(((torch.sigmoid(c) - rows.accept).abs() * w).sum() / w.sum())
        per_slot = []
        for k in range(int(rows.slot.max()) + 1):
            m = rows.slot == k
            if m.any():
                per_slot.append(dict(slot=k, rows=int(m.sum()), confidence=round(float(torch.sigmoid(c[m]).mean()), 4),
                                     accept=round(float(rows.accept[m].mean()), 4)))
    return dict(rows=len(rows), bce=round(bce, 5), abs_err=round(err, 4), per_slot=per_slot)


def fit_head(head, rows: HeadRows, decay: float, max_iter: int = 200) -> dict:
    """Weighted-BCE refit of `head` in place (float32, full batch, L-BFGS from its current weights).
    Deterministic for fixed rows and thread count. Returns the optimiser's trace."""
    params = [p for p in head.parameters()]
    for p in params:
        p.requires_grad_(True)
    w = slot_weights(rows.slot, decay)
    w = w / w.sum()
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    trace = []

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = (F.binary_cross_entropy_with_logits(head_logits(head, rows).float(), rows.accept, reduction="none") * w).sum()
        loss.backward()
        trace.append(float(loss.detach()))
        return loss

    opt.step(closure)
    for p in params:
        p.requires_grad_(False)
    return dict(evaluations=len(trace), bce_start=round(trace[0], 5), bce_end=round(trace[-1], 5))


def write_confidence_head(checkpoint: Path, head) -> None:
    """Replace only the confidence head's tensors in `checkpoint/model.safetensors`, in the stored dtype;
    every other tensor and the file metadata are kept as they are. Written to a temporary file and
    renamed, so a failure leaves the old checkpoint intact."""
    file = Path(checkpoint) / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        missing = [k for k in CONFIDENCE_KEYS if k not in f.keys()]
        if missing:
            raise ValueError(f"{file} has no {missing}: not a DSpark checkpoint with a confidence head")
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    new = {"confidence_head.proj.weight": head.proj.weight, "confidence_head.proj.bias": head.proj.bias}
    for k, v in new.items():
        if tuple(v.shape) != tuple(tensors[k].shape):
            raise ValueError(f"{k}: refitted shape {tuple(v.shape)} != stored {tuple(tensors[k].shape)}")
        tensors[k] = v.detach().to(tensors[k].dtype).contiguous()
    tmp = file.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    shutil.copymode(file, tmp)  # keep the checkpoint's permissions
    tmp.replace(file)
