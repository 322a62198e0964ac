"""Learning curves of one or more training runs, side by side: held-out teacher-forced tau_prob and
first-slot acceptance against anchors seen (the training data consumed), from each run's
`learning_curve.json` (written by examples/train_drafter.py --eval-every N).

    python -m examples.training.plot_curves kl0=examples/training/runs/dspark-kl0 \
        kl1=examples/training/runs/dspark-kl1 --out examples/training/runs/ablation-kl.png

Prints a table of each run's points too, so the numbers can be read without the picture.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_curve(run: Path) -> list[dict]:
    path = run / "learning_curve.json" if run.is_dir() else run
    if not path.exists():
        raise SystemExit(f"{path}: no learning curve (train with --eval-every N)")
    points = json.loads(path.read_text())
    if not isinstance(points, list) or not all("tau_prob" in p and "anchors_seen" in p for p in points):
        raise SystemExit(f"{path}: not a learning_curve.json (expected a list of points with tau_prob, anchors_seen)")
    return points


def parse_run(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    return (name, Path(path)) if sep else (Path(text).name, Path(text))


def table(runs: dict[str, list[dict]]) -> str:
    lines = ["| run | step | anchors seen | train min | first slot (1-TV) | greedy top-1 @0 | tau_prob |",
             "|---|---|---|---|---|---|---|"]
    for name, points in runs.items():
        for p in points:
            lines.append(f"| {name} | {p['step']} | {p['anchors_seen']} | {p['seconds'] / 60:.1f} | "
                         f"{p['accept_at'][0]:.3f} | {p['agree_at'][0]:.3f} | {p['tau_prob']:.3f} |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, points in runs.items():
        x = [p["anchors_seen"] / 1e3 for p in points]
        ax1.plot(x, [p["tau_prob"] for p in points], marker="o", label=name)
        ax2.plot(x, [p["accept_at"][0] for p in points], marker="o", label=name)
    ax1.set(xlabel="anchors seen (thousands)", ylabel="tau_prob (teacher-forced, held out)",
            title="accepted length per round")
    ax2.set(xlabel="anchors seen (thousands)", ylabel="slot-0 acceptance 1 - TV", title="first-slot acceptance")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.training.plot_curves", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="[NAME=]RUN", help="run directory or learning_curve.json")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: print the table only)")
    args = parser.parse_args(argv)
    runs = {name: load_curve(path) for name, path in map(parse_run, args.runs)}
    print(table(runs))
    if args.out is not None:
        plot(runs, args.out)
        print(f"[plot] {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
