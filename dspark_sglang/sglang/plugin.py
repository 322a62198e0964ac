"""SGLang plugin entry point: registers our worker and takes over `--speculative-algorithm DSPARK`.

Declared in setup.py under the entry-point group `sglang.srt.plugins`; SGLang's `load_plugins()`
calls `register()` in every process it starts (launcher, engine, spawned scheduler), before
server arguments are resolved.

Hook points, and why these:

1. `SpeculativeAlgorithm.register("DSPARK_PLUGIN", spec_class=DSparkPluginSpec)`: SGLang's
   public plugin API for a speculative algorithm. `DSPARK` itself is a reserved enum member and
   cannot be registered, so our worker lives under its own name (users may also pass
   `--speculative-algorithm DSPARK_PLUGIN` directly).
2. `register_resolution_hook("handle_deprecated_dp_attention")`: SGLang's whitelisted hook for
   resolution steps, on the *first* step of `run_resolution_pipeline`. It declares
   `speculative_algorithm = DSPARK_PLUGIN` when the user asked for `DSPARK`, so no later step ever
   sees the string "DSPARK": none of SGLang's ~40 built-in `is_dspark()` branches or "DSPARK"
   string checks (CUDA-only device check, DSpark-only checkpoint parsing, ragged-verify graph
   layouts) fire for our worker. Wearing the enum member instead needs AROUND hooks on
   `_handle_dspark`, `SpeculativeAlgorithm.create_worker` and several shims, each found by a crash
   (reference notes §14), and more would break under features not tried.
3. `DSparkPluginSpec` claims no built-in family (every `is_*()` is False), which routes KV
   reservation through `eagle_prepare_for_decode` (2 × the widest verify window per request) and
   keeps CUDA-graph capture off our path. It supplies the three methods the scheduler calls that
   `CustomSpecAlgo` lacks in 0.5.23 (`carries_draft_hidden_states`, `create_future_map`,
   `need_topk`).

4. An AFTER hook (HookRegistry) on `SchedulerInternalStateController._add_speculative` adds the
   worker's counters (accept lengths, verify histogram, fault fallbacks: `WorkerStats.as_dict`) to
   `/server_info` as `internal_states[i]["dspark_plugin"]`. SGLang adds a worker's records there only
   for its built-in DSPARK (`is_dspark()`), which our spec class deliberately is not.

5. An AFTER hook on `DefaultPoolConfigurator.__init__` adds the drafter's context pool (one row
   per KV slot) to SGLang's per-token KV cost, so a pool sized from free memory leaves room for it
   (memory_budget.py).

6. An AROUND hook on SGLang's `get_config` reads a vLLM speculators drafter's nested decoder
   config while server arguments are resolved (speculators_config.py); AutoConfig alone refuses it.

7. An AFTER hook on `SamplingParams.verify` refuses a malformed `custom_params["dspark"]` (per-request
   control: request_params.py) with SGLang's own 400, before the request reaches a scheduler.

8. Opt-in, for every engine of a process tree: `DSPARK_CPU_DECODE_ATTENTION=fast` replaces
   torch_native's per-request decode attention loop with a 3-5x faster one (cpu_attention.py), and
   `DSPARK_CPU_GEMM=few-rows|row-dot` serves float32 matmuls of few rows faster (cpu_gemm.py).

Who serves `DSPARK` (settings.dspark_owner): our worker on CPU and for every checkpoint the built-in cannot
serve; on CUDA, SGLang's built-in worker for DeepSpec DSpark checkpoints (it has CUDA graphs and
overlap scheduling). `DSPARK_USE_BUILTIN=1` always leaves `DSPARK` to the built-in, `DSPARK_USE_BUILTIN=0`
always takes it, and `--speculative-algorithm DSPARK_PLUGIN` always names ours. The startup log says
which worker serves and why.

If the installed SGLang differs from what this was written against (`signatures.py`), nothing
is registered, the reason is logged at ERROR, and a later request for `DSPARK` fails with that
reason instead of falling through to the built-in (which on CPU would say only "DSpark ... only
supports CUDA").
"""

from __future__ import annotations

import logging

from dspark_sglang.sglang.settings import dspark_owner

logger = logging.getLogger("dspark_sglang")

ALGORITHM_NAME = "DSPARK_PLUGIN"
TAKEOVER_STEP = "handle_deprecated_dp_attention"
STATS_TARGET = (
    "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController._add_speculative"
)
STATS_KEY = "dspark_plugin"

# Why registration was refused in this process (None when registered or not yet tried).
_refusal: list[str] | None = None


def register() -> None:
    """Entry point. Idempotent: a second call in the same process does nothing."""
    global _refusal
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from dspark_sglang.sglang import cpu_attention, cpu_gemm

    cpu_attention.install()  # opt-in (DSPARK_CPU_DECODE_ATTENTION=fast), plain and speculative engines alike
    cpu_gemm.install()  # opt-in (DSPARK_CPU_GEMM=few-rows|row-dot), plain and speculative engines alike

    try:
        SpeculativeAlgorithm.from_string(ALGORITHM_NAME)
        return  # already registered in this process
    except ValueError:
        pass

    from dspark_sglang.sglang.signatures import check_sglang

    problems = check_sglang()
    if problems:
        _refusal = problems
        logger.error(
            "dspark-sglang refused to register: %s. `--speculative-algorithm DSPARK` will fail "
            "with this reason; set %s=1 to use SGLang's built-in DSPARK instead.",
            "; ".join(problems),
            "DSPARK_USE_BUILTIN",
        )
        _install_takeover(refusal=problems)
        return

    from dspark_sglang.sglang.spec_class import make_spec_class

    SpeculativeAlgorithm.register(
        ALGORITHM_NAME,
        supports_overlap=False,
        validate_server_args=_validate_server_args,
        spec_class=make_spec_class(),
    )(_worker_factory)
    _install_takeover(refusal=None)
    _install_stats_report()
    from dspark_sglang.sglang import memory_budget, request_params, speculators_config

    memory_budget.install()
    speculators_config.install()
    request_params.install()
    logger.info("dspark-sglang registered speculative algorithm %s", ALGORITHM_NAME)


def _worker_factory(server_args):
    from dspark_sglang.sglang.worker import DSparkPluginWorker

    return DSparkPluginWorker


def _validate_server_args(server_args) -> None:
    """Fail at argument resolution, not in the scheduler, on unusable plugin settings."""
    from dspark_sglang.sglang.spec_class import resolve_plugin_config

    resolve_plugin_config(server_args)


def _install_takeover(refusal: list[str] | None) -> None:
    from sglang.srt.arg_groups import resolution_hooks
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

    if any(getattr(fn, "_dspark_takeover", False) for fn in resolution_hooks._HOOKS.get(TAKEOVER_STEP, ())):
        return

    def takeover(server_args, previous) -> None:
        view = resolving_view(server_args)
        requested = view.speculative_algorithm
        if requested is not None and requested.upper() == "DSPARK":
            owner, why = dspark_owner(_on_cuda(view.device), _drafter_format(view.speculative_draft_model_path))
            if owner == "plugin" and refusal is not None:
                raise RuntimeError(
                    "--speculative-algorithm DSPARK: the dspark-sglang plugin is installed but "
                    f"refused to register ({'; '.join(refusal)}). Install sglang==0.5.23, or set "
                    "DSPARK_USE_BUILTIN=1 to use SGLang's built-in DSPARK worker."
                )
            if owner == "plugin":
                declare_resolution(server_args, "dspark_sglang.takeover", speculative_algorithm=ALGORITHM_NAME)
                logger.info("--speculative-algorithm DSPARK is served by dspark-sglang (%s): %s", ALGORITHM_NAME, why)
            else:
                logger.info("--speculative-algorithm DSPARK is left to SGLang's built-in worker: %s", why)
        previous(server_args)

    takeover._dspark_takeover = True
    resolution_hooks.register_resolution_hook(TAKEOVER_STEP)(takeover)


def _install_stats_report() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if any(getattr(hook, "_dspark_stats", False) for _, hook, _ in HookRegistry._hooks.get(STATS_TARGET, ())):
        return

    def report(result, controller, state, *args, **kwargs):
        worker = getattr(controller.scheduler, "draft_worker", None)
        # Look the method up on the type: the worker delegates unknown attributes to the target.
        if callable(getattr(type(worker), "dspark_plugin_stats", None)):
            try:
                state[STATS_KEY] = worker.dspark_plugin_stats()
            except Exception:  # noqa: BLE001 - a stats bug must not break /server_info
                logger.exception("dspark: could not report worker stats")
        return None  # keep _add_speculative's own result

    report._dspark_stats = True
    HookRegistry.register(STATS_TARGET, report, HookType.AFTER)


def _on_cuda(device: str | None) -> bool:
    """The device the server will run on is a CUDA GPU (None: SGLang picks CUDA when one is present)."""
    if device is None:
        import torch

        return torch.cuda.is_available()
    return str(device).split(":")[0] == "cuda"


def _drafter_format(path: str | None) -> str | None:
    """The checkpoint's format (loader.describe_drafter), or None when it cannot be read here: the
    worker's own validation reports that error later with the file and field."""
    if not path:
        return None
    try:
        from dspark_sglang.drafters.loader import describe_drafter

        return describe_drafter(path).format
    except Exception:  # noqa: BLE001 - a bad checkpoint is reported by resolve_plugin_config
        return None


def refusal_reasons() -> list[str] | None:
    """Why this process refused to register (None if it registered or never tried)."""
    return _refusal
