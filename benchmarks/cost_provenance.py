"""Where each cost curve of a simulation came from, so a projection says what it stands on.

A projection is only as good as its cost curves, and they differ in kind: a profiled table is a
measurement on one machine, a built-in GPU curve may be a roofline estimate, a draft cost may be a
number typed on the command line. ``dspark-simulate`` prints this block before a run and stores it
in the result's ``engine.provenance``. Each entry is a dict with a one-line ``summary`` (what is
printed) and the facts behind it.

- A steps/s curve ``builtin:NAME``: the description in ``sps_curves.py`` (it says measured or
  derived). A file: its path as given and, when ``dspark-profile`` left ``<stem>.samples.json``
  beside it, that run's facts (device, dtype, runner, model, when); otherwise "no provenance
  recorded".
- The draft cost: the command-line numbers (nothing recorded about where they came from), or the
  round-cost file it was fitted to.
- The worker overhead: the round-cost file, its command, arguments, drafter and the fit.
Pure (no sglang import).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

from dspark_sglang.benchmarks.sps_curves import builtin_description
from dspark_sglang.benchmarks.worker_overhead import WorkerOverhead
from dspark_sglang.calibration.sweep import samples_path

__all__ = ["curve_provenance", "draft_provenance", "overhead_provenance", "cost_model_provenance",
           "format_provenance"]

# The dspark-profile run facts worth repeating (the rest of its meta stays in the samples file).
PROFILE_FACTS = ("device", "dtype", "runner", "backend", "model", "clock", "torch_threads", "context_len",
                 "repeats", "started")


def curve_provenance(spec: str) -> dict:
    """A steps/s curve given as ``builtin:NAME`` or as a file path (module doc)."""
    if spec.startswith("builtin:"):
        description = builtin_description(spec.split(":", 1)[1])
        return {"source": spec, "kind": "builtin", "description": description, "summary": f"{spec}: {description}"}
    sidecar = samples_path(Path(spec))
    out = {"source": spec, "kind": "file", "samples": None, "profile": None}
    if not sidecar.is_file():
        out["summary"] = f"{spec}: no provenance recorded (no {sidecar.name} beside it)"
        return out
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8")).get("meta")
        if not isinstance(meta, dict):
            raise ValueError("no 'meta' object")
    except (OSError, ValueError, AttributeError) as exc:
        out["summary"] = f"{spec}: no provenance recorded ({sidecar.name} unreadable: {exc})"
        return out
    facts = {k: meta[k] for k in PROFILE_FACTS if k in meta}
    out.update(samples=str(sidecar), profile=facts)
    shown = ", ".join(f"{k} {facts[k]}" for k in ("device", "dtype", "runner", "model", "started") if k in facts)
    out["summary"] = f"{spec}: measured by dspark-profile ({shown or 'no run facts recorded'}; {sidecar.name})"
    return out


def draft_provenance(draft_ms: float, draft_ms_per_req: float, overhead: Optional[WorkerOverhead],
                     from_round_cost: bool) -> dict:
    """The draft step's a + b·R: typed on the command line, fitted to a round-cost file, or none."""
    if from_round_cost and overhead is not None:
        path = overhead.source.get("path")
        return {"kind": "round-cost", "source": path, "draft_ms": overhead.draft_base_ms,
                "draft_ms_per_req": overhead.draft_per_req_ms, "fit": overhead.source.get("draft_fit"),
                "summary": f"{overhead.describe_draft()}, fitted to {path} (--draft-from-round-cost)"}
    if draft_ms == 0 and draft_ms_per_req == 0:
        return {"kind": "none", "source": None, "draft_ms": 0.0, "draft_ms_per_req": 0.0,
                "summary": "none: drafting is free in this model (no --draft-ms, --draft-ms-per-req or "
                           "--draft-from-round-cost)"}
    return {"kind": "command line", "source": "--draft-ms/--draft-ms-per-req", "draft_ms": draft_ms,
            "draft_ms_per_req": draft_ms_per_req,
            "summary": f"{draft_ms:g} ms + {draft_ms_per_req:g} ms/request, given on the command line "
                       "(no provenance recorded)"}


def overhead_provenance(overhead: Optional[WorkerOverhead]) -> dict:
    """The worker's per-round host time: the round-cost file and its fit, or not modelled."""
    if overhead is None:
        return {"kind": "none", "source": None,
                "summary": "not modelled (no --worker-overhead): speculative rounds pay no acceptance, commit "
                           "or bookkeeping time, which flatters speculation"}
    src = overhead.source
    coefficients = {k: v for k, v in overhead.to_dict().items() if k != "source"}
    return {"kind": "round-cost", "source": src.get("path"), "command": src.get("command"), "args": src.get("args"),
            "drafter": src.get("drafter"), "coefficients": coefficients, "fit": src.get("fit"),
            "fitted_terms": src.get("fitted_terms"), "rms_residual_ms": src.get("rms_residual_ms"),
            "summary": f"{overhead.describe()}; measured by `{src.get('command')}`, drafter {src.get('drafter')}"}


def cost_model_provenance(sps: str, scheduler_table: Optional[str], draft_ms: float, draft_ms_per_req: float,
                          overhead: Optional[WorkerOverhead], draft_from_round_cost: bool = False,
                          config_tables: Optional[Mapping[str, str]] = None) -> dict:
    """Every cost curve of a simulation. ``config_tables``: validate's per-configuration scheduler
    tables (a measured configuration's DSPARK_COST_TABLE)."""
    if scheduler_table:
        sched = curve_provenance(scheduler_table)
    else:
        sched = {"kind": "same", "source": sps, "summary": "the --sps curve"}
    out = {"sps": curve_provenance(sps), "scheduler_cost_table": sched,
           "draft_cost": draft_provenance(draft_ms, draft_ms_per_req, overhead, draft_from_round_cost),
           "worker_overhead": overhead_provenance(overhead)}
    if config_tables:
        out["config_scheduler_tables"] = {name: curve_provenance(path) for name, path in config_tables.items()}
    return out


LABELS = (("sps", "steps/s curve"), ("scheduler_cost_table", "schedulers' table"), ("draft_cost", "draft cost"),
          ("worker_overhead", "worker overhead"))


def format_provenance(prov: dict) -> str:
    """The printed block: one line per cost curve."""
    lines = ["cost model provenance:"]
    lines += [f"  {label}: {prov[key]['summary']}" for key, label in LABELS if key in prov]
    for name, entry in (prov.get("config_scheduler_tables") or {}).items():
        lines.append(f"  schedulers' table for {name}: {entry['summary']}")
    return "\n".join(lines)
