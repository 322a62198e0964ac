"""The validation drafter (target at another temperature): what it proposes, and its config errors."""

import json

import pytest
import torch

from dspark_sglang.benchmarks.server_distribution import build_tempered_drafter, build_tiny_target
from dspark_sglang.drafters.errors import DrafterConfigError
from dspark_sglang.drafters.interface import TargetSpec
from dspark_sglang.drafters.loader import describe_drafter, load_drafter
from dspark_sglang.sampling import SamplingBatch, process_logits
from dspark_sglang.sglang.test_breaks import break_residual
from dspark_sglang.acceptance import chain_accept


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    target = build_tiny_target(root / "target")
    return target, build_tempered_drafter(root / "drafter", target, temperature_ratio=2.0, gamma=3)


def spec(vocab=256):
    return TargetSpec(hidden_size=64, vocab_size=vocab, num_hidden_layers=2)


def test_proposals_follow_the_tempered_target(tiny):
    from transformers import AutoModelForCausalLM

    target, drafter_dir = tiny
    assert describe_drafter(drafter_dir).gamma == 3
    drafter = load_drafter(drafter_dir, spec())
    prompt = [1, 5, 9, 77]
    drafter.append_context([4], [torch.zeros(4, 1)], [torch.arange(4)], [torch.tensor(prompt)])
    sampling = SamplingBatch(temperatures=torch.tensor([0.8]), top_ks=torch.tensor([-1]),
                             top_ps=torch.tensor([1.0]), min_ps=torch.tensor([0.0]))
    block = drafter.propose([4], torch.tensor([12]), torch.tensor([4]), sampling, torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(target).eval()
    seq = prompt + [12] + block.tokens[0].tolist()
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, 4:7]  # the rows that predicted x_1..x_3
    want = process_logits(logits, torch.full((3,), 1.6), torch.full((3,), -1), torch.ones(3), torch.zeros(3))
    assert torch.allclose(block.probs[0], want, atol=1e-5)  # q = p at 2 x 0.8
    assert torch.allclose(block.token_probs[0], want.gather(1, block.tokens[0][:, None]).squeeze(1))


@pytest.mark.parametrize("field, value, message", [
    ("temperature_ratio", 0, "temperature_ratio"),
    ("gamma", 0, "gamma"),
    ("target_path", "/nonexistent", "target_path"),
    ("kind", "other", "kind"),
])
def test_bad_config_names_the_field(tiny, tmp_path, field, value, message):
    target, drafter_dir = tiny
    config = json.loads((drafter_dir / "config.json").read_text())
    config["dspark_test_drafter"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DrafterConfigError, match=message):
        load_drafter(tmp_path, spec())


def test_vocabulary_mismatch_is_refused(tiny):
    with pytest.raises(DrafterConfigError, match="vocabulary"):
        load_drafter(tiny[1], spec(vocab=300))


def test_broken_residual_only_touches_rejected_sampled_rows():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(3, 3, 8) * 2, -1)
    q = torch.softmax(torch.randn(3, 2, 8), -1)
    drafts = torch.tensor([[1, 2], [3, 4], [5, 6]])
    lens, greedy = torch.tensor([2, 2, 0]), torch.tensor([False, True, False])
    uniforms, sample_u = torch.tensor([[0.99, 0.99], [0.5, 0.5], [0.5, 0.5]]), torch.tensor([0.3, 0.3, 0.3])
    right = chain_accept(p, drafts, q, lens, greedy, uniforms, sample_u)
    wrong = break_residual("residual_from_p", right, p, lens, greedy, sample_u)
    assert torch.equal(wrong.num_accepted, right.num_accepted)
    assert torch.equal(wrong.output_tokens[1:], right.output_tokens[1:])  # greedy, and no draft verified
    assert break_residual(None, right, p, lens, greedy, sample_u) is right
