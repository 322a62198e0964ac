"""The drafter's context pool inside SGLang's KV memory budget.

Block drafters (DSpark, DFlash) keep their context K/V in a pool with one row per SGLang KV slot
(drafters/block.py `KvSlotContext`): num_layers x 2 x kv_heads x head_dim values per slot. When
SGLang sizes its KV pool from free memory (GPU: --mem-fraction-static), it divides the bytes it may
use by the bytes one token costs (`DefaultPoolConfigurator._cell_size`); an AFTER hook on that
configurator adds the drafter's bytes per token, so the pool that results leaves room for ours
instead of running out of memory beside it. With --max-total-tokens (the CPU recipe) SGLang takes
the token count as given and this changes nothing. Hybrid SWA / DSV4 pool configurators are not
hooked (their models are not served by the plugin's drafters today).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("dspark_sglang")

TARGET = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator.__init__"


def context_bytes_per_token(drafter_path: str, element_size: int) -> int:
    """Bytes the drafter's KV-slot context pool adds per token (0 for drafters that keep their own
    per-request caches: Eagle3)."""
    from dspark_sglang.drafters.loader import describe_drafter

    desc = describe_drafter(drafter_path)
    if desc.family not in ("dspark", "dflash"):
        return 0
    return desc.num_layers * 2 * desc.num_kv_heads * desc.head_dim * element_size


def add_context_pool(result, configurator, kvc, *args, **kwargs):
    """AFTER hook on DefaultPoolConfigurator.__init__: our bytes per token join its cell size."""
    algorithm = kvc.spec_algorithm
    if kvc.is_draft_worker or getattr(algorithm, "name", None) != "DSPARK_PLUGIN" or not configurator._cell_size:
        return None
    from sglang.srt.runtime_context import get_spec

    path = get_spec().speculative_draft_model_path
    extra = context_bytes_per_token(path, kvc.model_dtype.itemsize) if path else 0
    if extra:
        configurator._cell_size += extra
        logger.info("dspark: KV budget counts the drafter's context pool: +%d bytes per token", extra)
    return None


def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if any(getattr(hook, "_dspark_budget", False) for _, hook, _ in HookRegistry._hooks.get(TARGET, ())):
        return
    add_context_pool._dspark_budget = True
    HookRegistry.register(TARGET, add_context_pool, HookType.AFTER)
