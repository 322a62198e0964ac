"""Our `CustomSpecAlgo` subclass and the server-argument resolution it performs.

SGLang hands `handle_server_args` / `validate_server_args` a stand-in of ServerArgs whose writes
are declared as resolutions (`record_foreign_defaults`); we only write real ServerArgs fields
there, and never mutate ServerArgs anywhere else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dspark_sglang.sglang.settings import PluginSettings, load_settings

logger = logging.getLogger("dspark_sglang")


@dataclass(frozen=True)
class PluginConfig:
    """Everything the worker needs, resolved once from settings, ServerArgs and the drafter."""

    settings: PluginSettings
    drafter_path: str
    drafter_gamma: int  # drafts per block the checkpoint produces
    max_verify_len: int  # largest number of drafts ever verified (<= drafter_gamma)

    @property
    def num_draft_tokens(self) -> int:
        """Verify window including the anchor row: what SGLang calls speculative_num_draft_tokens."""
        return self.max_verify_len + 1


def resolve_plugin_config(cfg) -> PluginConfig:
    """`cfg`: ServerArgs or SGLang's resolving view of it. Raises ValueError with a clear message."""
    drafter_path = cfg.speculative_draft_model_path
    if not drafter_path:
        raise ValueError(
            "--speculative-algorithm DSPARK needs --speculative-draft-model-path: a DSpark, DFlash or "
            "Eagle3 checkpoint directory (DeepSpec, z-lab or SpecForge format)"
        )
    settings = load_settings(
        server_defaults={
            "cost_table": getattr(cfg, "speculative_dspark_sps_table_path", None),
            "sts": getattr(cfg, "speculative_dspark_confidence_sts_path", None),
            "gamma": getattr(cfg, "speculative_dspark_block_size", None),
        }
    )
    from dspark_sglang.drafters.loader import describe_drafter

    gamma = describe_drafter(drafter_path).gamma
    if settings.gamma is not None and settings.gamma > gamma:
        raise ValueError(
            f"gamma={settings.gamma} (DSPARK_GAMMA / --speculative-dspark-block-size) exceeds the "
            f"{gamma} drafts per block that {drafter_path} produces"
        )
    max_verify = settings.gamma if settings.gamma is not None else gamma
    if settings.scheduler == "fixed":
        if settings.fixed_len > max_verify:
            raise ValueError(f"DSPARK_FIXED_LEN={settings.fixed_len} exceeds the block of {max_verify} drafts")
    return PluginConfig(settings, str(drafter_path), gamma, max_verify)


def keeps_radix_cache(config: PluginConfig) -> bool:
    """DSPARK_KEEP_RADIX_CACHE, or by default: on for drafters whose context lives in the KV-slot
    pool (DSpark, DFlash: a hit finds the cached rows in place), off for Eagle3."""
    if config.settings.keep_radix_cache is not None:
        return config.settings.keep_radix_cache
    from dspark_sglang.drafters.loader import describe_drafter

    return describe_drafter(config.drafter_path).family in ("dspark", "dflash")


def make_spec_class():
    """Build the spec class lazily: importing sglang at module import would make the entry point
    heavy for processes that never speculate."""
    from sglang.srt.managers.overlap_utils import FutureMap
    from sglang.srt.speculative.spec_registry import CustomSpecAlgo

    class DSparkPluginSpec(CustomSpecAlgo):
        # The enum's own semantics for the three methods CustomSpecAlgo lacks in 0.5.23.
        def carries_draft_hidden_states(self) -> bool:
            return False

        def create_future_map(self, device, req_to_token_pool, needs_cpu_seq_lens=True,
                              needs_confidence_relay=False):
            return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens, needs_confidence_relay)

        def need_topk(self) -> bool:
            return False

        def handle_server_args(self, server_args) -> None:
            if getattr(server_args, "enable_dp_attention", False):
                # DP attention gathers every rank's token count before the forward, for a verify of
                # speculative_num_draft_tokens rows per request; our ragged verify sends a different
                # count, and no rank can know the others' before drafting. Refused until that is wired.
                raise ValueError(
                    "--speculative-algorithm DSPARK_PLUGIN does not support --enable-dp-attention: its verify "
                    "changes the per-rank token counts DP attention gathers beforehand. Serve DSPARK with "
                    "SGLang's built-in worker (DSPARK_USE_BUILTIN=1, DeepSpec DSpark checkpoints on CUDA) or "
                    "without DP attention")
            config = resolve_plugin_config(server_args)
            # One chain, one step: the verify window is the anchor plus up to max_verify_len drafts.
            server_args.speculative_num_steps = 1
            server_args.speculative_eagle_topk = 1
            server_args.speculative_num_draft_tokens = config.num_draft_tokens
            # Our worker is synchronous (it needs the accepted tokens before drafting again).
            server_args.disable_overlap_schedule = True
            if not server_args.disable_cuda_graph:
                # The round replays no CUDA graph: the verify is an eager EXTEND with the drafter's layers
                # captured. Left on, SGLang would capture TARGET_VERIFY graphs (memory, startup time) and
                # send a round that verifies no draft, a DECODE forward asking for hidden states, to a
                # graph captured without them: a crash. Declined until the
                # round itself is graph-capturable.
                server_args.disable_cuda_graph = True
                logger.warning("dspark-sglang: CUDA graphs are off for this server (the DSPARK_PLUGIN round runs "
                               "eagerly and never replays one)")
            if not keeps_radix_cache(config):
                # A prefix-cache hit skips the target forward over the cached positions; a drafter
                # without a KV-slot context would be left without their features (lossless, but
                # acceptance drops on shared prefixes).
                server_args.disable_radix_cache = True
            logger.info(
                "dspark-sglang: drafter %s (gamma %d), verify window %d, scheduler %s",
                config.drafter_path, config.drafter_gamma, config.num_draft_tokens, config.settings.scheduler,
            )

    return DSparkPluginSpec
