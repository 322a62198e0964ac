"""The SGLang internals this plugin overrides or calls, checked before anything is registered.

SGLang's speculative internals move between minor releases (the V1 worker path disappeared, and
`draft_tp_context` changed shape between 0.5.16 and 0.5.23). Rather than fail deep inside a
scheduler process, `register()` checks this table first and refuses to register, loudly, if any
entry is missing or has a different signature. `tests/unit/test_plugin.py` checks it too.

Each entry names a dotted path and, for callables, the parameter names we pass or rely on (a
subset check: SGLang may add parameters, it may not drop or rename ours). `kind` says why we
depend on it: we *call* it, *override* it (subclass or hook), or read a *field* of it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass
from typing import Any

SUPPORTED_SGLANG_VERSION = "0.5.23"


@dataclass(frozen=True)
class Internal:
    path: str  # dotted path: module.attr[.attr...]
    kind: str  # "call" | "override" | "field" | "member"
    params: tuple[str, ...] = ()  # callables: parameter names we rely on; fields: attribute names
    why: str = ""


SGLANG_INTERNALS: list[Internal] = [
    # --- registration (plugin.py) -------------------------------------------------------------
    Internal("sglang.srt.speculative.spec_info.SpeculativeAlgorithm.register", "call",
             ("name", "supports_overlap", "validate_server_args", "spec_class"),
             "registers DSPARK_PLUGIN"),
    Internal("sglang.srt.speculative.spec_info.SpeculativeAlgorithm.from_string", "call", ("name",),
             "idempotency probe; proves the name resolves to us"),
    Internal("sglang.srt.speculative.spec_registry.CustomSpecAlgo", "override",
             ("handle_server_args", "create_worker", "resolve_max_speculative_num_draft_tokens",
              "has_draft_kv"),
             "our spec class subclasses it"),
    Internal("sglang.srt.speculative.spec_info.SpeculativeAlgorithm.carries_draft_hidden_states", "override",
             ("self",), "CustomSpecAlgo lacks it; we supply the enum's semantics"),
    Internal("sglang.srt.speculative.spec_info.SpeculativeAlgorithm.create_future_map", "override",
             ("self", "device", "req_to_token_pool", "needs_cpu_seq_lens", "needs_confidence_relay"),
             "CustomSpecAlgo lacks it; we supply the enum's semantics"),
    Internal("sglang.srt.speculative.spec_info.SpeculativeAlgorithm.need_topk", "override", ("self",),
             "CustomSpecAlgo lacks it"),
    Internal("sglang.srt.managers.overlap_utils.FutureMap", "call",
             ("device", "spec_algo", "req_to_token_pool"), "built by create_future_map"),
    Internal("sglang.srt.arg_groups.resolution_hooks.register_resolution_hook", "call", ("name",),
             "rewrites DSPARK to DSPARK_PLUGIN at the first resolution step"),
    Internal("sglang.srt.arg_groups.resolution_hooks._OVERRIDABLE_HOOKS", "member",
             ("handle_deprecated_dp_attention",), "the first step of run_resolution_pipeline"),
    Internal("sglang.srt.arg_groups.overrides.declare_resolution", "call", ("server_args", "source"),
             "declares the rewritten algorithm name"),
    Internal("sglang.srt.arg_groups.overrides.resolving_view", "call", ("server_args",),
             "reads the algorithm being resolved"),
    Internal("sglang.srt.runtime_context.get_spec", "call", (), "the worker reads resolved spec args"),
    Internal("sglang.srt.runtime_context.get_serving", "call", (),
             "served_model_name: the model_name label of the worker's Prometheus series"),
    Internal("sglang.srt.plugins.hook_registry.HookRegistry.register", "call", ("target", "hook", "hook_type"),
             "hooks the worker's counters into /server_info"),
    Internal("sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController"
             "._add_speculative", "override", ("self", "state"),
             "AFTER hook: internal_states[i]['dspark_plugin'] = the worker's counters"),
    Internal("sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController",
             "call", ("scheduler",), "built with the scheduler; the hook reads controller.scheduler.draft_worker"),
    # --- worker (worker.py) ------------------------------------------------------------------
    Internal("sglang.srt.speculative.base_spec_worker.BaseSpecWorker", "override", (),
             "our worker subclasses it"),
    Internal("sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation", "call",
             ("batch", "forward_batch", "is_verify", "capture_hidden_mode"), "target forwards"),
    Internal("sglang.srt.speculative.base_spec_worker.BaseSpecWorker.note_request_finished", "override",
             ("self", "rid"), "frees the drafter slot of a finished request"),
    Internal("sglang.srt.managers.schedule_batch.ScheduleBatch", "field",
             ("prefix_lens", "extend_lens", "extend_num_tokens", "extend_logprob_start_lens", "orig_seq_lens",
              "req_pool_indices_cpu", "seq_lens_cpu", "out_cache_loc", "forward_mode", "sampling_info"),
             "verify.py turns a decode batch into an EXTEND batch over the chains"),
    Internal("sglang.srt.models.llama.LlamaForCausalLM.set_dflash_layers_to_capture", "call", ("self", "layer_ids"),
             "captures the drafter's target layers (layer id = decoder-layer output)"),
    Internal("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend._run_sdpa_forward_extend",
             "override", ("self", "query", "output", "k_cache", "v_cache", "req_to_token", "req_pool_indices",
                          "seq_lens", "extend_prefix_lens", "extend_seq_lens"),
             "verify.py serves verify extends without the quadratic query padding"),
    Internal("sglang.srt.layers.logits_processor.LogitsProcessor._get_pruned_states", "override",
             ("self", "hidden_states", "hidden_states_before_norm", "aux_hidden_states", "logits_metadata"),
             "verify.py keeps every position of a verify extend, so one LM-head pass gives all logits"),
    Internal("sglang.srt.layers.logits_processor.LogitsProcessor._get_hidden_states_to_store", "override",
             ("self", "hidden_states", "hidden_states_before_norm", "aux_hidden_states", "pruned_states",
              "pruned_states_before_norm", "aux_pruned_states", "sample_indices", "logits_metadata"),
             "verify.plain_hidden_states keeps what a plain forward returns beside the drafter's layers"),
    Internal("sglang.srt.model_executor.forward_batch_info.get_required_capture_hidden_mode", "call",
             ("capture_hidden_mode", "spec_info"), "which prefill hidden-state rows SGLang reads back"),
    Internal("sglang.srt.model_executor.forward_batch_info.get_server_return_hidden_states_mode", "call", (),
             "the server's --enable-return-hidden-states mode"),
    Internal("sglang.srt.managers.schedule_batch.ScheduleBatch", "field",
             ("return_hidden_states", "return_hidden_states_mode"), "requests that ask for hidden states"),
    Internal("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend._run_sdpa_forward_decode",
             "override", ("self", "query", "output", "k_cache", "v_cache", "req_to_token", "req_pool_indices",
                          "seq_lens", "encoder_lens", "scaling", "enable_gqa", "causal", "is_cross_attn",
                          "sliding_window_size"),
             "cpu_attention.py (opt-in) replaces the per-request decode loop"),
    Internal("sglang.srt.layers.quantization.unquant.UnquantizedLinearMethod.apply", "override",
             ("self", "layer", "x", "bias"), "cpu_gemm.py (opt-in) serves few float32 rows on CPU"),
    Internal("sglang.srt.layers.logits_processor.LogitsProcessor._compute_lm_head", "override",
             ("self", "hidden_states", "lm_head", "embedding_bias", "out"),
             "cpu_gemm.py (opt-in) serves few float32 rows of the plain-weight LM head on CPU"),
    Internal("sglang.srt.layers.logits_processor.should_apply_lm_head_quant_method", "call",
             ("lm_head", "quant_method"), "cpu_gemm.py leaves quantized LM heads to SGLang"),
    Internal("sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator.__init__", "override",
             ("self", "kvc"), "memory_budget.py adds the drafter's context pool to the KV cell size"),
    Internal("sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator", "field",
             ("calculate_pool_sizes",), "divides the free bytes by _cell_size (which we extend)"),
    Internal("sglang.srt.utils.hf_transformers.config.get_config", "override", ("model", "trust_remote_code", "revision"),
             "speculators_config.py answers for a speculators drafter (no top-level model_type) during resolution"),
    Internal("sglang.srt.sampling.sampling_params.SamplingParams.verify", "override", ("self", "vocab_size"),
             "request_params.py validates custom_params['dspark'] with SGLang's own request checks"),
    Internal("sglang.srt.sampling.sampling_params.SamplingParams", "field", ("custom_params", "max_new_tokens"),
             "the worker reads a request's custom_params['dspark'] once at prefill"),
    Internal("sglang.srt.managers.utils.GenerationBatchResult", "field",
             ("logits_output", "next_token_ids", "accept_lens", "new_seq_lens", "next_draft_input",
              "speculative_num_draft_tokens", "can_run_cuda_graph", "cap_lens"),
             "what the scheduler reads back"),
]


class SignatureMismatch(RuntimeError):
    pass


def _resolve(path: str) -> Any:
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # not a module: the rest of the path is attributes
            raise
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"cannot import any prefix of {path}")


def _field_names(cls: type) -> set[str]:
    names = set(dir(cls))
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    names |= set(getattr(cls, "__annotations__", {}))
    names |= set(getattr(cls, "__struct_fields__", ()))
    return names


def check_internal(entry: Internal) -> str | None:
    """Return a problem description, or None when `entry` matches the installed SGLang."""
    try:
        obj = _resolve(entry.path)
    except (ImportError, AttributeError) as exc:
        hint = ""
        if "common_ops" in str(exc) or "libcuda" in str(exc):
            hint = " (on a CPU-only machine, enable CPU mode first: eval \"$(dspark-cpu-env)\")"
        return f"{entry.path}: cannot be imported: {type(exc).__name__}: {str(exc).splitlines()[0]}{hint}"
    if entry.kind == "member":
        missing = [p for p in entry.params if p not in obj]
        return f"{entry.path}: lacks {missing}" if missing else None
    if entry.kind == "field" or (entry.kind == "override" and inspect.isclass(obj)):
        missing = [p for p in entry.params if p not in _field_names(obj)]
        return f"{entry.path}: lacks attributes {missing}" if missing else None
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError) as exc:
        return f"{entry.path}: no inspectable signature ({exc})"
    missing = [p for p in entry.params if p not in params]
    return f"{entry.path}: parameters {missing} are gone (has {list(params)})" if missing else None


def check_sglang(installed_version: str | None = None) -> list[str]:
    """All problems with the installed SGLang; empty when the plugin may register."""
    if installed_version is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed_version = version("sglang")
        except PackageNotFoundError:
            return ["sglang is not installed"]
    problems = []
    if installed_version != SUPPORTED_SGLANG_VERSION:
        problems.append(
            f"sglang {installed_version} is installed; this plugin was written against "
            f"sglang=={SUPPORTED_SGLANG_VERSION}"
        )
    problems += [p for p in map(check_internal, SGLANG_INTERNALS) if p]
    return problems
