"""Plugin settings: one frozen record, built once from the environment, a JSON file and ServerArgs.

SGLang drops CLI flags it does not know (`ServerArgs.from_cli_args` keeps record fields only), so
plugin-specific knobs come from environment variables (they survive SGLang's `spawn` of the
scheduler process) or from a JSON file named by `DSPARK_CONFIG`. Precedence, highest first:

    DSPARK_* environment variables  >  DSPARK_CONFIG JSON file  >  SGLang's own DSpark flags  >  defaults

SGLang's own flags that we honour: `--speculative-dspark-sps-table-path` (cost table),
`--speculative-dspark-confidence-sts-path` (STS temperatures), `--speculative-dspark-block-size` (γ).

| env var                | JSON key        | meaning                                                        |
|------------------------|-----------------|----------------------------------------------------------------|
| DSPARK_SCHEDULER       | scheduler       | lagged (default) · algorithm1 · fixed · verify_all · none      |
| DSPARK_FIXED_LEN       | fixed_len       | drafts verified per round for `fixed`                          |
| DSPARK_COST_TABLE      | cost_table      | steps/s table (SGLang SPS JSON, plain or additive)             |
| DSPARK_STS             | sts             | STS temperatures (SGLang STS JSON)                             |
| DSPARK_GAMMA           | gamma           | drafts per block; must not exceed the drafter's block          |
| DSPARK_LAG             | lag             | rounds of lag for the budget of the `lagged` scheduler         |
| DSPARK_DRAFT_COST      | draft_cost      | draft-step time in the `lagged` budget: measured (default) · none · A[,B] ms (+ ms/request) |
| DSPARK_SEED            | seed            | seed of the acceptance/draft random stream                     |
| DSPARK_ESTIMATOR       | estimator       | confidence estimator JSON for head-less drafters (DFlash, Eagle3) |
| DSPARK_STATS_EVERY     | stats_every     | log a worker summary every N rounds (0: never)                 |
| DSPARK_KEEP_RADIX_CACHE| keep_radix_cache| auto (default): on for DSpark/DFlash drafters, off for Eagle3 · 1 · 0 (see below) |
| DSPARK_DRAFT_VOCAB     | draft_vocab     | auto (default): draft_vocab.safetensors beside the drafter if present · none · a file path |
| DSPARK_VERIFY_TIERS    | verify_tiers    | off (default): ragged verify windows · auto · W1,W2,..: fixed-width tiers (verify_tiers.py) |
| DSPARK_TEST_FAULT      | test_fault      | TESTING ONLY: inject faults into decode rounds (see below)     |
| DSPARK_TEST_BREAK      | test_break      | TESTING ONLY: a deliberately wrong acceptance (negative controls, see below) |
| DSPARK_USE_BUILTIN     | —               | who serves `--speculative-algorithm DSPARK`: 1 SGLang's built-in · 0 ours · unset: `dspark_owner` |

Radix cache: on a prefix-cache hit the target does not recompute the cached positions, so the
drafter must find their context elsewhere. DSpark and DFlash drafters keep their context K/V in a
pool indexed by SGLang's KV slots (drafters/block.py `KvSlotContext`), where a hit finds the cached
prefix's rows in place: the radix cache stays on for them by default. Eagle3 drafters keep a
per-request cache; for them the radix cache is off unless DSPARK_KEEP_RADIX_CACHE=1, which stores
the drafter's target features per KV slot (sglang/feature_pool.py: len(target_layer_ids) x hidden
values per KV slot, outside SGLang's KV budget). DSPARK_KEEP_RADIX_CACHE=0 turns it off for all.

Fault injection (testing only). `DSPARK_TEST_FAULT=KIND[:P][,KIND[:P]...]` makes the worker inject
faults into its own decode rounds, to prove that each one falls back to plain decoding without
changing a token: `nan_draft` (a request's draft distributions turn NaN from a random position on),
`garbage_confidence` (a request's confidences turn into NaN / +-inf / huge / negative values),
`draft_exception` (the draft step raises for the whole round), `extra_sync` (one more host read per
round: the negative control of the host-sync counter, `DSPARK_COUNT_HOST_SYNCS=1`). P in (0, 1]
(default 1) is the chance per request and round (per round for `draft_exception` and `extra_sync`),
drawn from a generator seeded by `seed` and separate from the acceptance stream. Unset, the worker builds no injector and pays nothing.

Broken acceptance (testing only). `DSPARK_TEST_BREAK=residual_from_p` draws a rejected position's
token from the target's p instead of norm(max(p - q, 0)); `temperature_x1.25` verifies against the
target at 1.25x the request's temperature. Both are wrong on purpose: the server-level distribution
test (benchmarks/server_distribution.py) must reject them at the sample size that passes the real one.

This module is pure (no sglang import) so it is unit-testable without an engine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from dspark_sglang.draft_cost import DraftCostError, parse_draft_cost
from dspark_sglang.jsonio import JSON_PARSE_ERRORS
from dspark_sglang.verify_tiers import VerifyTierError, check_tier_spelling

SCHEDULER_KINDS = ("lagged", "algorithm1", "fixed", "verify_all", "none")  # as make_scheduler names them
OPT_OUT_ENV = "DSPARK_USE_BUILTIN"
CONFIG_ENV = "DSPARK_CONFIG"
FAULT_KINDS = ("nan_draft", "garbage_confidence", "draft_exception", "extra_sync")  # DSPARK_TEST_FAULT kinds
BREAK_KINDS = ("residual_from_p", "temperature_x1.25")  # DSPARK_TEST_BREAK kinds


class PluginSettingsError(ValueError):
    """A plugin setting is malformed; the message names its source and the field."""


@dataclass(frozen=True)
class PluginSettings:
    scheduler: str = "lagged"
    fixed_len: int | None = None
    cost_table: str | None = None
    sts: str | None = None
    gamma: int | None = None
    lag: int = 2
    seed: int = 0
    estimator: str | None = None
    stats_every: int = 200
    keep_radix_cache: bool | None = None  # None: auto (on where the drafter's context is in the KV-slot pool)
    test_fault: str | None = None  # testing only; parse_fault_spec's format
    test_break: str | None = None  # testing only; one of BREAK_KINDS
    draft_cost: str = "measured"  # draft_cost.parse_draft_cost's format
    draft_vocab: str = "auto"  # reduced draft vocabulary: auto | none | path (drafters/draft_vocab.py)
    verify_tiers: str = "off"  # fixed-width verify tiers: off | auto | comma widths (verify_tiers.py)

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULER_KINDS:
            raise PluginSettingsError(f"scheduler: {self.scheduler!r} is not one of {', '.join(SCHEDULER_KINDS)}")
        if self.scheduler == "fixed" and self.fixed_len is None:
            raise PluginSettingsError("fixed_len: required when scheduler is 'fixed' (DSPARK_FIXED_LEN)")
        if self.fixed_len is not None and self.fixed_len < 0:
            raise PluginSettingsError(f"fixed_len: must be >= 0, got {self.fixed_len}")
        if self.gamma is not None and self.gamma < 1:
            raise PluginSettingsError(f"gamma: must be >= 1, got {self.gamma}")
        if self.lag < 0:
            raise PluginSettingsError(f"lag: must be >= 0, got {self.lag}")
        if not -(2**63) <= self.seed < 2**64:  # torch.Generator.manual_seed's range
            raise PluginSettingsError(f"seed: must lie in [-2**63, 2**64), got {self.seed}")
        if self.stats_every < 0:
            raise PluginSettingsError(f"stats_every: must be >= 0, got {self.stats_every}")
        if self.test_fault is not None:
            parse_fault_spec(self.test_fault)  # raises with the offending item named
        if self.test_break is not None and self.test_break not in BREAK_KINDS:
            raise PluginSettingsError(f"test_break: {self.test_break!r} is not one of {', '.join(BREAK_KINDS)}")
        try:
            parse_draft_cost(self.draft_cost)
        except DraftCostError as exc:
            raise PluginSettingsError(str(exc)) from None
        try:
            check_tier_spelling(self.verify_tiers)
        except VerifyTierError as exc:
            raise PluginSettingsError(str(exc)) from None
        if self.draft_vocab.lower() not in ("auto", "none") and not Path(self.draft_vocab).is_file():
            raise PluginSettingsError(f"draft_vocab: file {self.draft_vocab!r} does not exist (or use auto / none)")
        for name in ("cost_table", "sts", "estimator"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise PluginSettingsError(f"{name}: file {path!r} does not exist")


_ENV_KEYS = {
    "scheduler": "DSPARK_SCHEDULER",
    "fixed_len": "DSPARK_FIXED_LEN",
    "cost_table": "DSPARK_COST_TABLE",
    "sts": "DSPARK_STS",
    "gamma": "DSPARK_GAMMA",
    "lag": "DSPARK_LAG",
    "seed": "DSPARK_SEED",
    "estimator": "DSPARK_ESTIMATOR",
    "stats_every": "DSPARK_STATS_EVERY",
    "keep_radix_cache": "DSPARK_KEEP_RADIX_CACHE",
    "test_fault": "DSPARK_TEST_FAULT",
    "test_break": "DSPARK_TEST_BREAK",
    "draft_cost": "DSPARK_DRAFT_COST",
    "draft_vocab": "DSPARK_DRAFT_VOCAB",
    "verify_tiers": "DSPARK_VERIFY_TIERS",
}
_INT_FIELDS = {"fixed_len", "gamma", "lag", "seed", "stats_every"}
_BOOL_FIELDS = {"keep_radix_cache"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def parse_fault_spec(spec: str) -> dict[str, float]:
    """`"nan_draft:0.5,draft_exception"` -> {"nan_draft": 0.5, "draft_exception": 1.0}.

    Empty items are ignored (so "" means no faults); an unknown kind, a repeated kind or a
    probability outside (0, 1] raises PluginSettingsError naming the item.
    """
    faults: dict[str, float] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        kind, _, prob_text = (x.strip() for x in item.partition(":"))
        kind = kind.lower().replace("-", "_")
        if kind not in FAULT_KINDS:
            raise PluginSettingsError(f"test_fault: unknown fault {kind!r} in {item!r}; known: {', '.join(FAULT_KINDS)}")
        if kind in faults:
            raise PluginSettingsError(f"test_fault: fault {kind!r} given twice")
        try:
            prob = float(prob_text) if prob_text else 1.0
        except ValueError:
            prob = float("nan")
        if not 0.0 < prob <= 1.0:  # NaN fails too
            raise PluginSettingsError(f"test_fault: {item!r}: probability must be a number in (0, 1]")
        faults[kind] = prob
    return faults


def _coerce(source: str, name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _BOOL_FIELDS:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() == "auto":
            return None
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise PluginSettingsError(f"{source}: {name}: expected true/false (1/0), got {value!r}")
    if name in _INT_FIELDS:
        if isinstance(value, bool):
            raise PluginSettingsError(f"{source}: {name}: expected an integer, got {value!r}")
        try:
            if isinstance(value, str):
                return int(value.strip())
            if isinstance(value, int):
                return value
        except ValueError:
            pass
        raise PluginSettingsError(f"{source}: {name}: expected an integer, got {value!r}")
    if not isinstance(value, str):
        raise PluginSettingsError(f"{source}: {name}: expected a string, got {type(value).__name__}")
    # "verify-all" and "verify_all" both name the same scheduler.
    return value.strip().lower().replace("-", "_") if name == "scheduler" else value


def _read_json(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PluginSettingsError(f"{CONFIG_ENV}: file {path!r} does not exist") from None
    except UnicodeDecodeError as exc:
        raise PluginSettingsError(f"{path}: not valid JSON ({exc})") from None
    except (OSError, ValueError) as exc:  # unreadable, embedded NUL in the path
        raise PluginSettingsError(f"{CONFIG_ENV}: file {path!r} cannot be read ({exc})") from None
    try:
        data = json.loads(text)
    except JSON_PARSE_ERRORS as exc:
        raise PluginSettingsError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PluginSettingsError(f"{path}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(PluginSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PluginSettingsError(f"{path}: unknown keys {unknown}; known keys are {sorted(known)}")
    defaults = PluginSettings.__dataclass_fields__
    nulls = sorted(k for k, v in data.items() if v is None and defaults[k].default is not None)
    if nulls:  # null for a field with a non-null default would reach __post_init__ as None
        raise PluginSettingsError(f"{path}: {nulls[0]}: expected a value, got null")
    return {k: _coerce(path, k, v) for k, v in data.items()}


def load_settings(
    environ: Mapping[str, str] | None = None,
    server_defaults: Mapping[str, Any] | None = None,
) -> PluginSettings:
    """Build the settings record. `server_defaults` carries values from SGLang's own DSpark flags
    (keys as in PluginSettings); they rank below the env vars and the JSON file."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {k: v for k, v in (server_defaults or {}).items() if v is not None}
    if environ.get(CONFIG_ENV):
        values.update(_read_json(environ[CONFIG_ENV]))
    for name, env in _ENV_KEYS.items():
        if environ.get(env, "") != "":
            values[name] = _coerce(env, name, environ[env])
    return replace(PluginSettings(), **values) if values else PluginSettings()


def builtin_requested(environ: Mapping[str, str] | None = None) -> bool:
    """True when the user asked to leave `--speculative-algorithm DSPARK` to SGLang's built-in."""
    environ = os.environ if environ is None else environ
    return environ.get(OPT_OUT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def plugin_forced(environ: Mapping[str, str] | None = None) -> bool:
    """True when the user asked for our worker under `DSPARK` even where the built-in could serve."""
    environ = os.environ if environ is None else environ
    return environ.get(OPT_OUT_ENV, "").strip().lower() in ("0", "false", "no", "off")


BUILTIN_FORMATS = ("deepspec_dspark",)  # the checkpoints SGLang's built-in DSPARK worker serves (CUDA only)


def dspark_owner(on_cuda: bool, drafter_format: str | None, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Who serves `--speculative-algorithm DSPARK`: ("plugin" | "builtin", why).

    The takeover policy. Our worker serves DSPARK wherever SGLang's built-in cannot: on CPU (the
    built-in is CUDA-only) and for every checkpoint other than DeepSpec's DSpark format (DFlash, Eagle3,
    z-lab, SpecForge, speculators). On CUDA with a DeepSpec DSpark checkpoint the built-in keeps DSPARK:
    it runs CUDA graphs and overlap scheduling that our worker does not yet have, and our CUDA path has
    not run on a GPU. DSPARK_USE_BUILTIN=1 always leaves DSPARK to the built-in; DSPARK_USE_BUILTIN=0
    always takes it; `--speculative-algorithm DSPARK_PLUGIN` names our worker directly.
    """
    if builtin_requested(environ):
        return "builtin", f"{OPT_OUT_ENV}=1"
    if plugin_forced(environ):
        return "plugin", f"{OPT_OUT_ENV}=0"
    if not on_cuda:
        return "plugin", "SGLang's built-in DSPARK worker runs on CUDA only"
    if drafter_format not in BUILTIN_FORMATS:
        return "plugin", f"SGLang's built-in DSPARK worker cannot serve a {drafter_format or 'missing'} checkpoint"
    return "builtin", (f"on CUDA SGLang's built-in worker serves {drafter_format} checkpoints with CUDA graphs and "
                       f"overlap scheduling; {OPT_OUT_ENV}=0 or --speculative-algorithm DSPARK_PLUGIN selects ours")


def opt_in(environ: Mapping[str, str], name: str, on: str) -> bool:
    """An opt-in CPU override's switch: `name` unset, "", "stock" or "0" is off; `on` is on; anything
    else is refused (a typo must not silently leave the stock path on)."""
    value = environ.get(name, "").strip().lower()
    if value in ("", "stock", "0"):
        return False
    if value == on:
        return True
    raise ValueError(f"{name}={value!r}: expected {on!r} or 'stock'")
