"""Speculative generation for one request against a transformers target (batch size 1).

The same drafter, confidence, scheduler and acceptance code the SGLang worker runs; only the target
forward differs (transformers with a KV cache instead of the engine). Used by `dspark-eval`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dspark_sglang.acceptance import chain_accept
from dspark_sglang.confidence import head_less_feature
from dspark_sglang.drafters.interface import Drafter, SamplingBatch
from dspark_sglang.sampling import process_logits


@dataclass
class RoundRecord:
    verify_len: int
    num_accepted: int
    conf_logits: torch.Tensor | None  # [gamma] raw confidence logits (None without a head)
    top1_probs: torch.Tensor  # [gamma] max_v q_k(v): the head-less confidence feature (reads x_<k only)
    context_len: int = 0  # the anchor's position: committed tokens (prompt + output) before this round


@dataclass
class GenerationTrace:
    prompt_len: int
    output_ids: list[int] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)


def _sample_first(logits: torch.Tensor, sampling: SamplingBatch, generator: torch.Generator) -> int:
    probs = process_logits(logits[None], sampling.temperatures, sampling.top_ks, sampling.top_ps, sampling.min_ps)
    u = torch.rand(1, generator=generator)
    cdf = probs[0].cumsum(0)
    return int(torch.searchsorted(cdf, u * cdf[-1]).clamp(max=probs.shape[-1] - 1))


@torch.inference_mode()
def speculative_generate(
    target,  # benchmarks.hf_target.HFTarget
    drafter: Drafter,
    prompt_ids: torch.Tensor,  # [n] int64
    max_new_tokens: int,
    sampling: SamplingBatch,  # one request
    choose_verify_len,  # callable (conf_logits [1,g] | None, draft_probs [1,g,V]) -> verify_lens [1]
    generator: torch.Generator,
    eos_token_id: int | None = None,
    slot: int = 0,
) -> GenerationTrace:
    target.reset()
    drafter.release(slot)
    trace = GenerationTrace(prompt_len=prompt_ids.numel())
    logits, features = target.extend(prompt_ids)
    drafter.append_context([slot], [features], [torch.arange(prompt_ids.numel())], [prompt_ids])
    anchor = _sample_first(logits[-1], sampling, generator)
    trace.output_ids.append(anchor)
    position = prompt_ids.numel()
    greedy = sampling.is_greedy()
    gamma = drafter.info.gamma
    while len(trace.output_ids) < max_new_tokens and anchor != eos_token_id:
        block = drafter.propose(
            [slot], torch.tensor([anchor]), torch.tensor([position]), sampling, generator=generator
        )
        verify_len = int(choose_verify_len(block.confidence_logits, block.probs)[0])
        chain = torch.cat([torch.tensor([anchor]), block.tokens[0, :verify_len]])
        logits, features = target.extend(chain)
        target_probs = torch.zeros(1, gamma + 1, logits.shape[-1])
        num_rows = verify_len + 1
        target_probs[0, :num_rows] = process_logits(
            logits,
            sampling.temperatures.expand(num_rows), sampling.top_ks.expand(num_rows),
            sampling.top_ps.expand(num_rows), sampling.min_ps.expand(num_rows),
        )
        result = chain_accept(
            target_probs, block.tokens, block.probs, torch.tensor([verify_len]), greedy,
            torch.rand(1, gamma, generator=generator), torch.rand(1, generator=generator),
        )
        accepted = int(result.num_accepted[0])
        committed = chain[: accepted + 1]
        target.truncate(position + accepted + 1)
        drafter.append_context(
            [slot], [features[: accepted + 1]], [torch.arange(position, position + accepted + 1)], [committed]
        )
        new_tokens = block.tokens[0, :accepted].tolist() + [int(result.next_tokens[0])]
        trace.rounds.append(
            RoundRecord(
                verify_len, accepted,
                None if block.confidence_logits is None else block.confidence_logits[0].clone(),
                head_less_feature(block)[0],
                context_len=position,
            )
        )
        for token in new_tokens:
            trace.output_ids.append(token)
            if token == eos_token_id or len(trace.output_ids) >= max_new_tokens:
                break
        anchor = trace.output_ids[-1]
        position += accepted + 1
    drafter.release(slot)
    return trace
