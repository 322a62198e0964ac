"""Opt-in faster float32 matmuls for few-row batches on CPU, in SGLang's linear layers and LM head.

`DSPARK_CPU_GEMM=few-rows|row-dot` in a server's environment registers two AROUND hooks that hand
SGLang's unquantized linear layers and its LM head to a few-row kernel of `dspark_sglang.cpu_linear`
(measured there, and in examples/bench/cpu-gemm-row-block), and selects the same kernel for the
drafter's own matmuls. Both kernels change the last bits of float32 results against stock, so they
are opt-in and apply to every engine of a process tree alike: plain and speculative servers.
Benchmarks that compare plain with speculative decoding set the variable for both or for neither.
"""

from __future__ import annotations

import os

import torch

from dspark_sglang import cpu_linear

ENV = "DSPARK_CPU_GEMM"
LINEAR_TARGET = "sglang.srt.layers.quantization.unquant.UnquantizedLinearMethod.apply"
LM_HEAD_TARGET = "sglang.srt.layers.logits_processor.LogitsProcessor._compute_lm_head"


def requested_kernel(environ=os.environ) -> str | None:
    """The kernel `DSPARK_CPU_GEMM` names (few-rows | row-dot), or None (unset, "", "stock", "0").
    Anything else is refused: a typo must not silently leave the stock path on."""
    value = environ.get(ENV, "").strip().lower()
    if value in ("", "stock", "0"):
        return None
    if value in cpu_linear.KERNELS:
        return value
    raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(cpu_linear.KERNELS)} or 'stock'")


def _linear_apply(original, self, layer, x, bias=None):
    """AROUND `UnquantizedLinearMethod.apply`: few float32 rows on CPU take the selected kernel."""
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and not getattr(layer, "use_intel_amx_backend", False):
        kernel = cpu_linear.kernel_for(x, weight, bias)
        if kernel is not None:
            return kernel(x, weight, bias)
    return original(self, layer, x, bias)


def _compute_lm_head(original, self, hidden_states, lm_head, embedding_bias=None, *, out=None):
    """AROUND `LogitsProcessor._compute_lm_head`: the plain-weight branch (no LoRA, no quantized
    head, no AMX packing, no on-policy bf16 cast) for few float32 rows on CPU. On CPU that branch
    ignores `out` (only CUDA writes into it) and `embedding_bias` (only a quantized head adds it)."""
    from sglang.srt.layers.logits_processor import should_apply_lm_head_quant_method

    weight = getattr(lm_head, "weight", None)
    if (
        isinstance(weight, torch.Tensor)
        and not (hasattr(lm_head, "set_lora") and hasattr(lm_head, "apply_lora"))
        and not should_apply_lm_head_quant_method(lm_head, getattr(lm_head, "quant_method", None))
        and not getattr(lm_head, "use_intel_amx_backend", False)
        and getattr(self, "rl_on_policy_target", None) is None
    ):
        kernel = cpu_linear.kernel_for(hidden_states, weight, lm_head=True)
        if kernel is not None:
            return kernel(hidden_states, weight)
    return original(self, hidden_states, lm_head, embedding_bias, out=out)


def active() -> bool:
    """Whether both hooks are registered in this process (reported in `/server_info`)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    return all(any(getattr(h, "_dspark_few_rows", False) for _, h, _ in HookRegistry._hooks.get(target, ()))
               for target in (LINEAR_TARGET, LM_HEAD_TARGET))


def active_kernel() -> str:
    """The kernel the hooks run in this process ("stock" when they are not installed)."""
    chosen = cpu_linear.selection()
    return chosen.name if chosen is not None and active() else "stock"


def install() -> bool:
    """Select the kernel `DSPARK_CPU_GEMM` names and register both AROUND hooks (called from the
    plugin's register); nothing when it names none."""
    name = requested_kernel()
    if name is None:
        return False
    cpu_linear.select(name)
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target, hook in ((LINEAR_TARGET, _linear_apply), (LM_HEAD_TARGET, _compute_lm_head)):
        if any(getattr(h, "_dspark_few_rows", False) for _, h, _ in HookRegistry._hooks.get(target, ())):
            continue
        hook._dspark_few_rows = True
        HookRegistry.register(target, hook, HookType.AROUND)
    return True
