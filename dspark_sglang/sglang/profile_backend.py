"""The SGLang side of `dspark-profile`: verify-shaped steps on SGLang's own model runner.

A verify step of width n is a causal EXTEND of n tokens per request over that request's committed
context (reference notes §14), so the profiler times exactly that: it builds a `ModelRunner` in
this process (no scheduler, no server, the way SGLang's `benchmark/one_batch.py` does), prefills
`max_requests` random contexts of `context_len` tokens once, and then times EXTEND batches with
`prefix_len = context_len` and per-request widths. Each timed step frees the KV slots it wrote, so
every repeat sees the same committed contexts.

The worker needs logits at every verified position; an EXTEND without input logprobs returns only
the last one, so with ``all_logits=True`` (the default) the step runs under the worker's own
`verify.every_position_logits`: SGLang's LogitsProcessor computes every position's logits in its one
LM-head pass (through whatever LM-head hook is installed, e.g. `DSPARK_CPU_GEMM`), and the final hidden
states are captured (`CaptureHiddenMode.FULL`), as in the worker's verify. (Until 2026-12-08 the
profile multiplied the captured states by the LM head in a second, unhooked pass: on CPU that added a
stock float32 GEMM of 2-3 rows, 24-35 ms, to every multi-token probe.)

CPU: the engine needs `SGLANG_USE_CPU_ENGINE=1` before sglang is imported and the `sgl_kernel`
fallback (`common_ops`) on `sys.path`; `dspark_sglang.cpu_mode.enable_cpu_mode()` does both.
Attention defaults to `torch_native` on CPU, whose stock extend attention pads each request's
queries to its full length (O(L^2) per layer); the worker verifies with its own
(`verify.fast_verify_attention`), and so does every timed step here. The runner calls SGLang's
`load_plugins()` first, so whatever our plugin installs in an engine process is installed here too.
A step whose requests all have width 1 runs as a DECODE batch, as the worker runs a round that
verifies no draft.
"""

from __future__ import annotations

import time
from array import array
from typing import Optional, Sequence

import torch

__all__ = ["SglangStepRunner"]


class SglangStepRunner:
    """Times verify-shaped EXTEND steps on an in-process SGLang `ModelRunner`.

    Parameters
    ----------
    model_path : str
        HF-format model directory.
    context_len : int
        Committed tokens per request before each step.
    max_requests : int
        Requests prefilled once; a step uses the first ``len(widths)`` of them.
    max_width : int
        The widest step per request (sizes the KV pool).
    dtype : str
        SGLang ``--dtype`` ("auto", "bfloat16", "float32", ...).
    device : str
        "cpu" or "cuda".
    attention_backend : str or None
        SGLang ``--attention-backend``; None picks ``torch_native`` on CPU and SGLang's default
        elsewhere.
    all_logits : bool
        Compute logits at every position of the step (what a verify needs).
    load_plugins : bool
        Run SGLang's ``load_plugins()`` first, as every engine process does, so the patches our
        plugin installs for serving (e.g. an attention replacement) are in place while timing.
    seed : int
        Seeds the random context and step tokens.
    """

    def __init__(self, model_path: str, *, context_len: int, max_requests: int, max_width: int,
                 dtype: str = "auto", device: str = "cpu", attention_backend: Optional[str] = None,
                 all_logits: bool = True, load_plugins: bool = True, seed: int = 0):
        if device == "cpu":
            from dspark_sglang.cpu_mode import enable_cpu_mode

            enable_cpu_mode()  # before sglang is first imported in this process
            attention_backend = attention_backend or "torch_native"
        self.context_len, self.all_logits = context_len, all_logits
        self._generator = torch.Generator().manual_seed(seed)
        # KV slots: the contexts plus one step's worth of new tokens, with slack for page rounding.
        pool_tokens = max_requests * (context_len + max_width) + 1024
        self._runner = _load_runner(model_path, dtype, device, attention_backend, pool_tokens,
                                    max_requests, seed, load_plugins)
        self.vocab_size = self._runner.model_config.vocab_size
        self.device = self._runner.device
        self._reqs = [self._new_req(i) for i in range(max_requests)]
        self._prefill()

    # --------------------------------------------------------------------------------------------

    def _random_ids(self, n: int) -> list[int]:
        return torch.randint(0, self.vocab_size, (n,), generator=self._generator).tolist()

    def _new_req(self, rid: int):
        from sglang.srt.managers.schedule_batch import Req
        from sglang.srt.sampling.sampling_params import SamplingParams

        ids = array("q", self._random_ids(self.context_len))
        req = Req(rid=rid, origin_input_text="", origin_input_ids=ids,
                  sampling_params=SamplingParams(temperature=0, max_new_tokens=1))
        req.full_untruncated_fill_ids = array("q", ids)
        req.logprob_start_len = -1
        req.extend_end = self.context_len
        return req

    def _prefill(self, chunk: int = 8) -> None:
        """Write every request's context into the KV cache (a few requests per forward)."""
        for start in range(0, len(self._reqs), chunk):
            self._extend(self._reqs[start:start + chunk], capture_all=False)

    def _extend(self, reqs, capture_all: bool, as_decode: bool = False):
        from sglang.benchmark.one_batch import TreeCacheNamespace
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode

        from dspark_sglang.sglang.verify import every_position_logits, fast_verify_attention
        from sglang.srt.runtime_context import get_schedule
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        runner = self._runner
        tree_cache = TreeCacheNamespace(  # no prefix sharing: allocation only
            page_size=get_schedule().page_size, device=runner.device,
            token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator,
        )
        batch = ScheduleBatch.init_new(
            reqs=reqs, req_to_token_pool=runner.req_to_token_pool,
            token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator, tree_cache=tree_cache,
            model_config=runner.model_config, enable_overlap=False,
            spec_algorithm=SpeculativeAlgorithm.NONE,
        )
        batch.prepare_for_extend()
        if batch.input_ids is None and getattr(batch, "prefill_input_ids_cpu", None) is not None:
            batch.input_ids = batch.prefill_input_ids_cpu.to(batch.device)
            batch.prefill_input_ids_cpu = None
        if as_decode:
            # One new token per request: the worker serves such a round as a plain DECODE batch
            # (verify.turn_into_verify_extend), positions = seq_lens - 1 as in the extend.
            batch.forward_mode = ForwardMode.DECODE
        mode = CaptureHiddenMode.FULL if capture_all else None
        forward_batch = ForwardBatch.init_new(batch, runner, capture_hidden_mode=mode,
                                              return_hidden_states_before_norm=False)
        # The worker's verify attention, and its one-pass logits at every position ([sum(widths), V]).
        with fast_verify_attention(runner.attn_backend), \
                every_position_logits(runner.model, active=capture_all and not as_decode):
            output = runner.forward(forward_batch).logits_output
        if capture_all and not as_decode and output.next_token_logits.shape[0] != forward_batch.input_ids.shape[0]:
            raise RuntimeError("the profiled verify step did not compute every position's logits")
        return batch

    def _synchronize(self) -> None:
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()

    @torch.inference_mode()
    def step(self, widths: Sequence[int]) -> tuple[float, float]:
        """One verify-shaped step: request i extends by ``widths[i]`` tokens. Returns (wall
        seconds, this thread's CPU seconds)."""
        if len(widths) > len(self._reqs):
            raise ValueError(f"{len(widths)} requests asked, {len(self._reqs)} prefilled")
        reqs = self._reqs[:len(widths)]
        for req, width in zip(reqs, widths):
            req.full_untruncated_fill_ids = array(
                "q", list(req.origin_input_ids) + self._random_ids(width)
            )
            req.prefix_len, req.extend_end = self.context_len, self.context_len + width
        self._synchronize()
        start, cpu_start = time.perf_counter(), time.thread_time()
        batch = self._extend(reqs, capture_all=self.all_logits, as_decode=max(widths) == 1)
        self._synchronize()
        seconds = (time.perf_counter() - start, time.thread_time() - cpu_start)
        # Drop the step's tokens: the next step extends the same committed contexts.
        self._runner.token_to_kv_pool_allocator.free(batch.out_cache_loc)
        return seconds

    def describe(self) -> str:
        backend = self._runner.server_args.attention_backend or "default"
        return (f"sglang ModelRunner ({backend} attention, "
                f"{self._runner.model_config.dtype}, {self.device})")

    def close(self) -> None:
        self._runner.req_to_token_pool.clear()
        self._runner.token_to_kv_pool_allocator.clear()


def _load_runner(model_path: str, dtype: str, device: str, attention_backend: Optional[str],
                 pool_tokens: int, max_requests: int, seed: int, load_plugins: bool):
    """A `ModelRunner` for one model in this process, set up as SGLang's one-batch benchmark does."""
    if load_plugins:
        from sglang.srt.plugins import load_plugins as sglang_load_plugins

        sglang_load_plugins()
    from sglang.benchmark.one_batch import _init_process_global_configs
    from sglang.srt.arg_groups.overrides import resolving_view
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import bootstrap
    from sglang.srt.entrypoints.engine import _set_envs_and_config
    from sglang.srt.model_executor.model_runner import ModelRunner
    from sglang.srt.runtime_context import SpawnRanks, get_device, publish, spawn_world_rank
    from sglang.srt.server_args import PortArgs, ServerArgs

    kwargs = dict(model_path=model_path, device=device, dtype=dtype, max_total_tokens=pool_tokens,
                  max_running_requests=max(max_requests, 1), skip_tokenizer_init=True,
                  disable_cuda_graph=True, random_seed=seed)
    if attention_backend:
        kwargs["attention_backend"] = attention_backend
    server_args = ServerArgs(**kwargs)
    server_args.resolve_once()
    _set_envs_and_config(server_args)
    port_args = PortArgs.init_new(server_args)
    publish(server_args, role="scheduler",
            ranks=SpawnRanks(world_rank=spawn_world_rank(server_args, tp_rank=0, pp_rank=0), gpu_id=0))
    _init_process_global_configs()
    model_config = ModelConfig.from_server_args(server_args)
    bootstrap.init_parallel_runtime(server_args=server_args, device=get_device().device,
                                    dist_port=port_args.nccl_port)
    bootstrap.init_layer_runtime(model_config=model_config)
    runner = ModelRunner(model_config=model_config,
                         mem_fraction_static=resolving_view(server_args).mem_fraction_static,
                         gpu_id=0, nccl_port=port_args.nccl_port, server_args=server_args)
    runner.alloc_memory_pool()
    runner.init_attention_backends()
    runner.init_cuda_graphs()  # a no-op with graphs disabled; keeps the runner's state complete
    return runner
