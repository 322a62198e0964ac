"""The engine-free speculative loop (used by dspark-eval) is lossless at T=0 for every drafter
family: its greedy output equals the target's own greedy decoding, whatever the drafter proposes.

The target is a tiny random Qwen3 with the fixture drafters' dimensions (H 64, 8 layers, V 512),
so the fixture checkpoints load against it; the drafters are random, so most drafts are rejected
and both the rejection and the acceptance paths run."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from dspark_sglang.benchmarks.hf_target import HFTarget
from dspark_sglang.benchmarks.spec_loop import speculative_generate
from dspark_sglang.drafters.interface import TargetSpec
from dspark_sglang.drafters.loader import describe_drafter, load_drafter
from dspark_sglang.sampling import SamplingBatch

from _block_drafter_helpers import FIXTURES

FAMILIES = ["deepspec_dspark_vanilla", "deepspec_dspark_rnn", "deepspec_dflash", "zlab_dflash",
            "deepspec_eagle3", "specforge_eagle3"]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=512, rope_theta=1e6)
    return Qwen3ForCausalLM(config).eval()


def greedy_reference(model, prompt: torch.Tensor, n: int) -> list[int]:
    out = model.generate(prompt[None], max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, prompt.numel():].tolist()


@pytest.mark.parametrize("fixture", FAMILIES)
def test_greedy_equals_target_greedy(tiny_model, fixture):
    path = FIXTURES / fixture
    target = HFTarget.from_model(tiny_model, describe_drafter(path).target_layer_ids)
    spec = TargetSpec(64, 512, 8, tiny_model.get_input_embeddings().weight.detach(),
                      tiny_model.get_output_embeddings().weight.detach())
    drafter = load_drafter(path, spec)
    gamma = drafter.info.gamma
    prompt = torch.randint(0, 511, (11,), generator=torch.Generator().manual_seed(3))
    expected = greedy_reference(tiny_model, prompt, 24)
    for verify_len in (gamma, 2, 0):  # all drafts, a shortened chain, no speculation
        trace = speculative_generate(
            target, drafter, prompt, 24, SamplingBatch.greedy(1),
            lambda conf, probs, n=verify_len: torch.tensor([n]), torch.Generator().manual_seed(0),
        )
        assert trace.output_ids == expected, (fixture, verify_len)
        assert all(r.verify_len == verify_len for r in trace.rounds)
        # Every round commits its accepted drafts plus exactly one target token.
        assert sum(r.num_accepted + 1 for r in trace.rounds) + 1 >= len(expected)


def test_sampled_run_is_seed_deterministic(tiny_model):
    path = FIXTURES / "deepspec_dspark_vanilla"
    target = HFTarget.from_model(tiny_model, describe_drafter(path).target_layer_ids)
    drafter = load_drafter(path, TargetSpec(64, 512, 8))
    prompt = torch.arange(5, 17)
    sampling = SamplingBatch.greedy(1)
    sampling.temperatures.fill_(1.0)
    runs = [
        speculative_generate(target, drafter, prompt, 20, sampling, lambda c, p: torch.tensor([7]),
                             torch.Generator().manual_seed(11)).output_ids
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(runs[0]) == 20
