"""Shared helpers for the DSpark / DFlash drafter tests (fixtures in tests/fixtures/drafters)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from dspark_sglang.drafters.interface import TargetSpec
from dspark_sglang.drafters.loader import load_drafter
from dspark_sglang.sampling import SamplingBatch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "drafters"
ATOL = 1e-5
# round -> anchor position; the context rows fed before it are in reference.safetensors.
ROUNDS = {"round1": 12, "round2": 16}


def tiny_target(with_embeddings: bool = True) -> TargetSpec:
    """The shared tiny Qwen3 target (H 64, 8 layers, V 512), optionally with its embed / lm_head."""
    if not with_embeddings:
        return TargetSpec(hidden_size=64, vocab_size=512, num_hidden_layers=8)
    weights = load_file(str(FIXTURES / "zlab_dflash" / "target_embeddings.safetensors"))
    return TargetSpec(64, 512, 8, weights["embed_tokens.weight"], weights["lm_head.weight"])


def load_fixture(name: str):
    """(drafter, reference tensors) for a fixture folder."""
    return load_drafter(FIXTURES / name, tiny_target()), load_file(str(FIXTURES / name / "reference.safetensors"))


def feed_context(drafter, slot: int, ref: dict, start: int, stop: int) -> None:
    """Append context rows start..stop-1 of the fixture sequence to `slot`."""
    rows = torch.arange(start, stop)
    drafter.append_context([slot], [ref["context_features"][rows]], [rows], [ref["token_ids"][rows]])


def anchor(ref: dict, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([S[position]], [position]) as the [1]-shaped anchor tensors propose expects."""
    return ref["token_ids"][position : position + 1], torch.tensor([position])


def sampling(temps, top_k: int = -1, top_p: float = 1.0) -> SamplingBatch:
    temps = torch.tensor(temps, dtype=torch.float32)
    n = temps.numel()
    return SamplingBatch(
        temperatures=temps,
        top_ks=torch.full((n,), top_k, dtype=torch.int64),
        top_ps=torch.full((n,), top_p),
        min_ps=torch.zeros(n),
    )


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()
