"""Results documents of ``dspark-bench`` and ``dspark-simulate``: curves, matched speedups, tables,
plots and the one-line summary (shared by both tools, so measured and predicted results read alike).

Document layout (JSON)::

    {"tool": "dspark-bench" | "dspark-simulate", "version": 1, "created": ISO time,
     "load_kind": "concurrency" | "rate", "baseline": NAME, "args": {...}, "host": {...},
     "configs": [{"name": NAME, "speculative": bool, ... tool-specific description ...,
                  "levels": [{"load": C, "repeats": [LevelSummary dict + "load_avg": [1, 5, 15 min]
                                                      + "requests": [...] ...]}]}],
     "curves": [Curve dict], "matched": [MatchedSpeedup dict], "summary": "one line"}
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import textwrap
from pathlib import Path
from typing import Optional, Sequence

from dspark_sglang.benchmarks.curves import Curve, MatchedSpeedup, curve_from_repeats, matched_speedup
from dspark_sglang.jsonio import JSON_PARSE_ERRORS

__all__ = ["new_document", "make_console", "host_info", "load_average", "analyze", "curves_of", "print_report",
           "plot_document", "summary_line", "write_document", "read_document"]

VERSION = 1


def load_average() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def host_info() -> dict:
    return {"hostname": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "load_avg_at_start": load_average()}


def new_document(tool: str, load_kind: str, args: dict, baseline: Optional[str]) -> dict:
    return {"tool": tool, "version": VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "load_kind": load_kind, "baseline": baseline, "args": args, "host": host_info(),
            "configs": [], "curves": [], "matched": [], "summary": ""}


def curves_of(doc: dict) -> list[Curve]:
    curves = []
    for cfg in doc["configs"]:
        loads = [lvl["load"] for lvl in cfg["levels"]]
        runs = [[_pair(rep) for rep in lvl["repeats"]] for lvl in cfg["levels"]]
        curves.append(curve_from_repeats(cfg["name"], loads, runs))
    return curves


def _pair(rep: dict) -> Optional[tuple[float, float]]:
    x, y = rep.get("throughput"), rep.get("per_user")
    if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
        return None
    return (float(x), float(y))


def analyze(doc: dict, num_points: int = 5) -> dict:
    """Fill ``curves``, ``matched`` (every config vs the baseline) and ``summary``."""
    curves = curves_of(doc)
    doc["curves"] = [c.to_dict() for c in curves]
    names = [c.name for c in curves]
    baseline = doc.get("baseline") or (names[0] if names else None)
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not one of the configurations {names}")
    doc["baseline"] = baseline
    base = curves[names.index(baseline)]
    doc["matched"] = [matched_speedup(base, c, num_points).to_dict() for c in curves if c.name != baseline]
    doc["summary"] = summary_line(doc)
    return doc


def _fmt(v, spec: str = ".1f", none: str = "–") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, spec)


def summary_line(doc: dict) -> str:
    parts = []
    for m in (MatchedSpeedup.from_dict(d) for d in doc.get("matched", [])):
        if not m.overlaps:
            parts.append(f"{m.config}: no matched range")
            continue
        mid = m.points[len(m.points) // 2] if m.points else None
        parts.append(f"{m.config} {_fmt(m.min_speedup, '.2f')}–{_fmt(m.max_speedup, '.2f')}x"
                     + (f" ({_fmt(mid.speedup, '.2f')}x at {_tp(mid.throughput)} tok/s)" if mid else ""))
    loads = sorted({lvl["load"] for cfg in doc["configs"] for lvl in cfg["levels"]})
    load_txt = ",".join(f"{x:g}" for x in loads)
    what = "predicted" if doc["tool"] == "dspark-simulate" else "measured"
    return (f"{doc['tool']}: per-user speedup vs {doc.get('baseline')} at matched throughput ({what}, "
            f"{doc['load_kind']} {load_txt}): " + ("; ".join(parts) if parts else "no comparisons"))


def print_report(doc: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or make_console()
    kind = doc["load_kind"]
    table = Table(title=f"{doc['tool']}: operating points (mean ± std over repeats)")
    for col in ("config", kind, "agg tok/s", "per-user tok/s", "TTFT p50/p99 s", "ITL p50/p99 ms",
                "accept len", "reqs (steady)", "errors"):
        table.add_column(col, justify="left" if col == "config" else "right")
    curves = {c["name"]: Curve.from_dict(c) for c in doc.get("curves", [])}
    for cfg in doc["configs"]:
        points = {p.load: p for p in curves.get(cfg["name"], Curve(cfg["name"])).points}
        for lvl in cfg["levels"]:
            reps = lvl["repeats"]
            p = points.get(float(lvl["load"]))
            agg = f"{p.throughput:.1f} ± {p.throughput_std:.1f}" if p else "–"
            user = f"{p.per_user:.1f} ± {p.per_user_std:.1f}" if p else "–"
            ttft = f"{_fmt(_mean(reps, 'ttft_p50'), '.2f')}/{_fmt(_mean(reps, 'ttft_p99'), '.2f')}"
            itl = f"{_fmt(_scaled(_mean(reps, 'itl_p50')), '.0f')}/{_fmt(_scaled(_mean(reps, 'itl_p99')), '.0f')}"
            acc = _fmt(_mean(reps, "spec_accept_length"), ".2f")
            reqs = f"{sum(r['num_requests'] for r in reps)} ({sum(r['num_steady'] for r in reps)})"
            errs = str(sum(r["num_errors"] for r in reps))
            table.add_row(cfg["name"], f"{lvl['load']:g}", agg, user, ttft, itl, acc, reqs, errs)
    console.print(table)

    matched = [MatchedSpeedup.from_dict(d) for d in doc.get("matched", [])]
    if matched:
        t2 = Table(title=f"Per-user speedup vs {doc['baseline']} at matched aggregate throughput")
        for col in ("config", "matched range tok/s", "speedup at evenly spaced throughputs", "min", "max"):
            t2.add_column(col, justify="left" if col == "config" else "right")
        for m in matched:
            if not m.overlaps:
                t2.add_row(m.config, "no overlap", "–", "–", "–")
                continue
            at = "  ".join(f"{p.speedup:.2f}x@{_tp(p.throughput)}" for p in m.points)
            t2.add_row(m.config, f"{_tp(m.lo)}–{_tp(m.hi)}", at,
                       f"{_fmt(m.min_speedup, '.2f')}x@{_tp(m.min_at)}",
                       f"{_fmt(m.max_speedup, '.2f')}x@{_tp(m.max_at)}")
        console.print(t2)
    console.print(doc.get("summary") or summary_line(doc))


def _tp(v: Optional[float]) -> str:
    """A throughput, 3 significant digits below 1000 tok/s, whole numbers above."""
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _mean(reps: Sequence[dict], key: str) -> Optional[float]:
    values = [r[key] for r in reps if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return sum(values) / len(values) if values else None


def _scaled(v: Optional[float], factor: float = 1000.0) -> Optional[float]:
    return None if v is None else v * factor


def make_console():
    """A rich console; 160 columns when not writing to a terminal (rich would default to 80)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def plot_document(doc: dict, path: str | Path, title: Optional[str] = None) -> Path:
    """Two panels: per-user speed vs aggregate throughput per config (repeat error bars, loads
    annotated), and the speedup over the baseline across the matched range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [Curve.from_dict(c) for c in doc["curves"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {}
    for curve in curves:
        xs = [p.throughput for p in curve.points]
        ys = [p.per_user for p in curve.points]
        bars = ax1.errorbar(xs, ys, xerr=[p.throughput_std for p in curve.points],
                            yerr=[p.per_user_std for p in curve.points], marker="o", capsize=3,
                            label=curve.name)
        colors[curve.name] = bars[0].get_color()
        for p in curve.points:
            ax1.annotate(f"{p.load:g}", (p.throughput, p.per_user), textcoords="offset points",
                         xytext=(4, 4), fontsize=7, color=colors[curve.name])
    ax1.set_xlabel("aggregate output throughput (tok/s)")
    ax1.set_ylabel("per-user decode speed (tok/s)")
    ax1.set_title(f"per-user speed vs throughput (labels: {doc['load_kind']})")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)

    by_name = {c.name: c for c in curves}
    base = by_name.get(doc.get("baseline"))
    for m in (MatchedSpeedup.from_dict(d) for d in doc["matched"]):
        if not m.overlaps or base is None:
            continue
        cfg = by_name[m.config]
        n = 60
        xs = [m.lo + (m.hi - m.lo) * i / (n - 1) for i in range(n)] if m.hi > m.lo else [m.lo]
        pts = [(x, cfg.speed_at(x), base.speed_at(x)) for x in xs]
        pts = [(x, a / b) for x, a, b in pts if a is not None and b]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], color=colors.get(m.config), label=m.config,
                 marker="." if len(pts) == 1 else None)
        ax2.scatter([p.throughput for p in m.points], [p.speedup for p in m.points], color=colors.get(m.config), s=12)
    ax2.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax2.set_xlabel("matched aggregate throughput (tok/s)")
    ax2.set_ylabel(f"per-user speedup vs {doc.get('baseline')}")
    ax2.set_title("speedup at matched throughput")
    ax2.grid(alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title or doc.get("summary", ""), 200), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_document(doc: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(_sanitize(doc), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _sanitize(obj):
    """NaN/inf -> null, tuples -> lists (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def read_document(path: str | Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
    except JSON_PARSE_ERRORS as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    for key in ("tool", "load_kind", "configs"):
        if not isinstance(doc, dict) or key not in doc:
            raise ValueError(f"{path}: {key}: missing; not a dspark-bench/dspark-simulate results file")
    return doc
