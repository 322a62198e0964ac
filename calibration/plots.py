"""PNG figures for the calibration tools (matplotlib, Agg backend)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

import torch

from ._cli import matplotlib_pyplot

__all__ = ["plot_profile", "plot_reliability"]


def plot_profile(profile, path: Path, title: str = "") -> None:
    """Step time and throughput against batch tokens: every repeat, the median with its min-max
    spread, the flat-then-linear fit and its knee."""
    plt = matplotlib_pyplot()
    probes = sorted(profile.probes, key=lambda p: p.shape.batch_tokens)
    xs = [p.shape.batch_tokens for p in probes]
    med = [1e3 * p.median_seconds for p in probes]
    lo = [m - 1e3 * min(p.seconds) for m, p in zip(med, probes)]
    hi = [1e3 * max(p.seconds) - m for m, p in zip(med, probes)]

    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(12, 4.8))
    for p in probes:
        ax_t.scatter([p.shape.batch_tokens] * len(p.seconds), [1e3 * s for s in p.seconds],
                     s=8, color="0.65", zorder=1)
    if probes and probes[0].clock != "wall":  # the wall clock, for comparison
        ax_t.scatter(xs, [1e3 * statistics.median(p.wall_seconds) for p in probes], marker="x",
                     color="0.4", zorder=2, label="wall-clock median (incl. time preempted)")
    ax_t.errorbar(xs, med, yerr=[lo, hi], fmt="o", color="C0", capsize=3, zorder=3,
                  label="median (bars: min-max over repeats)")
    ax_r.plot(xs, [x / (m / 1e3) for x, m in zip(xs, med)], "o-", color="C0",
              label="measured (median step)")
    fit = profile.fit
    if fit is not None:
        grid = torch.linspace(min(xs), max(xs), 200, dtype=torch.float64)
        fitted = fit.step_seconds(grid)
        ax_t.plot(grid.tolist(), (1e3 * fitted).tolist(), color="C3", zorder=2,
                  label=f"fit: {1e3 * fit.flat_seconds:.1f} ms flat, "
                        f"+{1e3 * fit.slope_seconds_per_token:.2f} ms/token past the knee")
        ax_r.plot(grid.tolist(), (grid / fitted).tolist(), color="C3", label="fit")
        for ax in (ax_t, ax_r):
            ax.axvline(fit.knee, color="C3", linestyle="--", linewidth=1)
        ax_t.annotate(f"knee = {fit.knee} tokens", (fit.knee, 1e3 * fit.flat_seconds),
                      textcoords="offset points", xytext=(6, -14), color="C3")
    ax_t.set_xlabel("batch tokens per step (Σ requests × width)")
    ax_t.set_ylabel(f"step time (ms, {probes[0].clock} clock)" if probes else "step time (ms)")
    ax_t.set_ylim(bottom=0)
    ax_t.legend(fontsize=8, loc="lower right")
    ax_r.set_xlabel("batch tokens per step")
    ax_r.set_ylabel("batch tokens per second")
    ax_r.set_ylim(bottom=0)
    ax_r.legend(fontsize=8, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reliability_points(probs: torch.Tensor, labels: torch.Tensor, num_bins: int):
    # probs, labels: [m] -> (mean predicted, observed frequency, count) per non-empty bin
    bins = (probs.clamp(0.0, 1.0 - 1e-9) * num_bins).long()
    out = []
    for b in range(num_bins):
        sel = bins == b
        if bool(sel.any()):
            out.append((float(probs[sel].mean()), float(labels[sel].float().mean()), int(sel.sum())))
    return out


def plot_reliability(survival_before: torch.Tensor, survival_after: torch.Tensor,
                     labels: torch.Tensor, observed: torch.Tensor, path: Path,
                     positions: Optional[list[int]] = None, num_bins: int = 10,
                     title: str = "", after_label: str = "STS") -> None:
    """Reliability diagram of the cumulative survival Π_{i≤k} c_i against the observed frequency
    of "the first k+1 drafts were accepted", before and after STS, one panel per position (and a
    pooled panel over all positions).

    survival_before, survival_after, labels, observed: [n, gamma] (observed: bool, the verified
    positions; censored ones are left out).
    """
    plt = matplotlib_pyplot()
    gamma = survival_before.shape[1]
    positions = positions if positions is not None else list(range(gamma))
    panels = [(f"position {k + 1}", [k]) for k in positions] + [("all positions", list(range(gamma)))]
    cols = len(panels) if len(panels) <= 5 else 4
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.3 * rows), squeeze=False)
    for ax, (name, ks) in zip(axes.flat, panels):
        keep = observed[:, ks].reshape(-1)
        y = labels[:, ks].reshape(-1)[keep]
        for surv, label, color in ((survival_before, "raw", "C1"), (survival_after, after_label, "C0")):
            pts = _reliability_points(surv[:, ks].reshape(-1)[keep].double(), y, num_bins)
            if pts:
                px, py, pn = zip(*pts)
                ax.plot(px, py, "o-", color=color, label=label, markersize=3)
        ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1)
        ax.set_title(f"{name} (n={int(keep.sum())})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.supxlabel("predicted survival Π c_i (binned)", fontsize=9)
    fig.supylabel("observed frequency of accepted prefix", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
