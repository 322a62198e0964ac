"""DeepSpec's drafter loss (paper §3.3; `deepspec/modeling/dspark/loss.py` conventions).

Per supervised slot k (0-based) with weight w_k = exp(-k / decay) (decay 4, DeepSpec's
`loss_decay_gamma`; Eagle3 uses step weights 0.8^k instead):
- CE:   -log p_draft(gt_k)
- L1:   ||p_draft - p_target||_1 (= 2 TV), at temperature 1
- conf: BCE_with_logits(confidence_logit_k, clamp(1 - ||p_draft - p_target||_1 / 2, 0, 1).detach())
L = 0.1 * CE + 0.9 * L1 + 1.0 * conf, each term a w-weighted mean over the supervised slots
(DeepSpec weights the confidence BCE with the same w_k).

Optional addition (`kl_alpha`, default 0: not in DeepSpec's DSpark loss): KL(target || draft) over
the top-K tokens plus a tail bucket, the forward-KL distillation EAGLE-style drafters train with.
Motivation: L1/TV has small gradients where the draft puts ~0 mass on the target's tokens
(dL1/dz_j is proportional to p_draft(j)). In a 240-step CPU test it did not speed learning up
measurably (single seed), so the zoo drafters are trained with DeepSpec's loss as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_terms(
    logits: torch.Tensor,  # [..., V] float32 draft logits (Markov-corrected for DSpark)
    labels: torch.Tensor,  # [...] int64 ground-truth next tokens
    topk_ids: torch.Tensor,  # [..., K] int64 target's top-K token ids
    topk_logp: torch.Tensor,  # [..., K] float32 their log-probabilities
) -> dict[str, torch.Tensor]:
    """Per-slot CE [...], L1 [...], tail-bucketed KL(target || draft) [...], acceptance 1 - TV [...]
    (detached) and top-1 agreement [...]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ce = -logp.gather(-1, labels[..., None]).squeeze(-1)
    p_top = logp.gather(-1, topk_ids).exp()
    t_top = topk_logp.exp()
    l1 = (p_top - t_top).abs().sum(-1) + (t_top.sum(-1) - p_top.sum(-1)).abs()
    kl = _tail_kl(t_top, p_top)[0]
    with torch.no_grad():
        accept = (1.0 - 0.5 * l1).clamp(0.0, 1.0)
        agree = (logits.argmax(-1) == topk_ids[..., 0]).float()
    return dict(ce=ce, l1=l1, kl=kl, accept=accept, agree=agree)


def _tail_kl(topk_p: torch.Tensor, p_top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL(target || draft) over the top-K tokens plus one bucket for the rest: [N], and the two
    tail masses r = 1 - sum_topK t, Q = 1 - sum_topK p (clamped away from 0) [N]."""
    r = (1.0 - topk_p.sum(-1)).clamp_min(0.0)
    q_tail = (1.0 - p_top.sum(-1)).clamp_min(1e-8)
    kl = (torch.xlogy(topk_p, topk_p) - topk_p * torch.log(p_top.clamp_min(1e-30))).sum(-1)
    kl = kl + torch.xlogy(r, r) - r * torch.log(q_tail)
    return kl, r, q_tail


class _FusedDistill(torch.autograd.Function):
    """sum_r (w_ce[r] CE_r + w_l1[r] L1_r + w_kl[r] KL_r) over rows, with a hand-written backward.

    The same quantities as `distill_terms`, but without autograd's full-vocabulary intermediates
    (log-softmax output, scattered gather gradients and their sums): forward keeps the logits and
    the row log-sum-exp; backward is one dense pass, softmax * c_r, plus sparse corrections at the
    label and the top-K ids. With p = softmax(z), P = sum_topK p, T = sum_topK t,
    a_i = sign(p_i - t_i) - sign(T - P) for i in topK, r = 1 - T, Q = 1 - P:
        dCE/dz = p - onehot(label)
        dL1/dz_j = [j in topK] a_j p_j - p_j * sum_i a_i p_i
        dKL/dz_j = p_j (1 - r/Q) + [j in topK] (p_j r/Q - t_j)
    """

    @staticmethod
    def forward(ctx, logits, labels, topk_ids, topk_p, w_ce, w_l1, w_kl):
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [N, 1]
        z_top = logits.gather(-1, topk_ids)
        p_top = (z_top - lse).exp()  # [N, K]
        ce = lse.squeeze(-1) - logits.gather(-1, labels[:, None]).squeeze(-1)
        tail = topk_p.sum(-1) - p_top.sum(-1)  # T - P
        l1 = (p_top - topk_p).abs().sum(-1) + tail.abs()
        kl, r, q_tail = _tail_kl(topk_p, p_top)
        ctx.save_for_backward(logits, lse, labels, topk_ids, p_top, topk_p, tail, r / q_tail, w_ce, w_l1, w_kl)
        return (w_ce * ce + w_l1 * l1 + w_kl * kl).sum(), ce.detach(), l1.detach(), kl.detach()

    @staticmethod
    def backward(ctx, grad_out, _g_ce, _g_l1, _g_kl):
        logits, lse, labels, topk_ids, p_top, topk_p, tail, ratio, w_ce, w_l1, w_kl = ctx.saved_tensors
        a = torch.sign(p_top - topk_p) - torch.sign(tail)[:, None]  # [N, K]
        ap = a * p_top
        dense = (w_ce - w_l1 * ap.sum(-1) + w_kl * (1.0 - ratio))[:, None] * grad_out  # [N, 1]
        grad = (logits - lse).exp_().mul_(dense)  # [N, V]
        sparse = w_l1[:, None] * ap + w_kl[:, None] * (p_top * ratio[:, None] - topk_p)
        grad.scatter_add_(-1, topk_ids, sparse * grad_out)
        grad.scatter_add_(-1, labels[:, None], -(w_ce * grad_out)[:, None])
        return grad, None, None, None, None, None, None


def fused_distill(logits, labels, topk_ids, topk_logp, w_ce, w_l1, w_kl=None):
    """(sum_r w_ce CE + w_l1 L1 + w_kl KL, CE [N], L1 [N], KL [N]) for float32 logits [N, V]."""
    w_kl = torch.zeros_like(w_ce) if w_kl is None else w_kl
    return _FusedDistill.apply(logits.float(), labels, topk_ids, topk_logp.exp(), w_ce, w_l1, w_kl)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum().clamp_min(1e-6)


def dspark_loss(
    logits: torch.Tensor,  # [N, G, V]
    conf_logits: torch.Tensor | None,  # [N, G] or None (DFlash)
    labels: torch.Tensor,  # [N, G] int64
    valid: torch.Tensor,  # [N, G] bool: a contiguous supervised prefix per block
    topk_ids: torch.Tensor,  # [N, G, K]
    topk_logp: torch.Tensor,  # [N, G, K]
    decay: float = 4.0,
    alphas: tuple[float, float, float] = (0.1, 0.9, 1.0),
    fused: bool = False,
    kl_alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """Total loss, scalar stats, and per-slot tensors for metrics (`fused`: the hand-written
    backward of `_FusedDistill`, for training speed; the per-slot tensors then have no `agree`)."""
    N, G, V = logits.shape
    w = torch.exp(-torch.arange(G, dtype=torch.float32) / decay)[None, :] * valid.float()  # [N, G]
    den = w.sum().clamp_min(1e-6)
    if fused:
        rows = (w > 0).reshape(-1)  # only supervised rows reach the vocabulary-wide math
        wr = w.reshape(-1)[rows]
        total, ce_r, l1_r, kl_r = fused_distill(logits.reshape(-1, V)[rows], labels.reshape(-1)[rows],
                                                topk_ids.reshape(-1, topk_ids.shape[-1])[rows],
                                                topk_logp.reshape(-1, topk_logp.shape[-1])[rows],
                                                alphas[0] * wr / den, alphas[1] * wr / den, kl_alpha * wr / den)
        loss = total
        t = {name: torch.zeros(N * G) for name in ("ce", "l1", "kl")}
        t["ce"][rows], t["l1"][rows], t["kl"][rows] = ce_r, l1_r, kl_r
        t = {k: v.view(N, G) for k, v in t.items()}
        t["accept"] = (1.0 - 0.5 * t["l1"]).clamp(0.0, 1.0)
        ce, l1 = weighted_mean(t["ce"], w), weighted_mean(t["l1"], w)
    else:
        t = distill_terms(logits, labels, topk_ids, topk_logp)
        ce, l1 = weighted_mean(t["ce"], w), weighted_mean(t["l1"], w)
        loss = alphas[0] * ce + alphas[1] * l1 + kl_alpha * weighted_mean(t["kl"], w)
    stats = dict(ce=ce.item(), l1=l1.item(), kl=weighted_mean(t["kl"].detach(), w).item())
    if conf_logits is not None:
        bce = F.binary_cross_entropy_with_logits(conf_logits.float(), t["accept"], reduction="none")
        conf = weighted_mean(bce, w)
        loss = loss + alphas[2] * conf
        stats["conf"] = conf.item()
        with torch.no_grad():
            stats["conf_err"] = weighted_mean((torch.sigmoid(conf_logits.float()) - t["accept"]).abs(), w).item()
    stats["loss"] = loss.item()
    return loss, stats, t


def eagle3_loss(
    logits: list[torch.Tensor],  # per step [n, V]
    labels: list[torch.Tensor],  # per step [n]
    valid: list[torch.Tensor],  # per step [n] bool
    topk_ids: list[torch.Tensor],  # per step [n, K]
    topk_logp: list[torch.Tensor],  # per step [n, K]
    step_decay: float = 0.8,
    alphas: tuple[float, float] = (0.1, 0.9),
    fused: bool = False,
    kl_alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float], list[dict[str, torch.Tensor]]]:
    """The same CE + L1 distillation per TTT step, step k weighted by step_decay^k."""
    num = logits[0].new_zeros(())
    ce_num = l1_num = kl_num = 0.0
    per_step = []
    den = sum(((step_decay**k) * v.float()).sum() for k, v in enumerate(valid)).clamp_min(1e-6)
    for k, (lg, lb, v, ti, tl) in enumerate(zip(logits, labels, valid, topk_ids, topk_logp)):
        w = (step_decay**k) * v.float()
        if fused:
            part, ce_r, l1_r, kl_r = fused_distill(lg, lb, ti, tl, alphas[0] * w / den, alphas[1] * w / den,
                                                   kl_alpha * w / den)
            t = dict(ce=ce_r, l1=l1_r, kl=kl_r)
        else:
            t = distill_terms(lg, lb, ti, tl)
            part = (w * (alphas[0] * t["ce"] + alphas[1] * t["l1"] + kl_alpha * t["kl"])).sum() / den
        num = num + part
        ce_num += (w * t["ce"]).sum().item()
        l1_num += (w * t["l1"]).sum().item()
        kl_num += (w * t["kl"]).sum().item()
        per_step.append(t)
    d = den
    loss = num
    return loss, dict(loss=loss.item(), ce=ce_num / d.item(), l1=l1_num / d.item(), kl=kl_num / d.item()), per_step
