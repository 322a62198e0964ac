"""Resumable training state (examples/training/train_state.py): a save/load round trip continues
exactly as an uninterrupted run."""

from __future__ import annotations

import random

import torch

from examples.training import train_state


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model[0].bias.requires_grad_(False)  # frozen parameters are not part of the state
    return model


def _steps(model, opt, gen, rng, n):
    for _ in range(n):
        x = torch.randn(16, 4, generator=gen) * rng.random()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_resume_continues_bit_for_bit(tmp_path):
    straight = _model()
    opt = torch.optim.AdamW([p for p in straight.parameters() if p.requires_grad], lr=1e-2)
    gen, rng = torch.Generator().manual_seed(1), random.Random(2)
    _steps(straight, opt, gen, rng, 10)

    first = _model()
    opt1 = torch.optim.AdamW([p for p in first.parameters() if p.requires_grad], lr=1e-2)
    gen1, rng1 = torch.Generator().manual_seed(1), random.Random(2)
    _steps(first, opt1, gen1, rng1, 4)
    train_state.save(tmp_path / "state", first, opt1, {"data": gen1}, rng1, {"step": 4, "note": "x"})
    train_state.save(tmp_path / "state", first, opt1, {"data": gen1}, rng1, {"step": 4, "note": "y"})  # overwrite

    second = _model()
    opt2 = torch.optim.AdamW([p for p in second.parameters() if p.requires_grad], lr=1e-2)
    gen2, rng2 = torch.Generator().manual_seed(99), random.Random(99)
    extra = train_state.load(tmp_path / "state", second, opt2, {"data": gen2}, rng2)
    assert extra == {"step": 4, "note": "y"}
    _steps(second, opt2, gen2, rng2, 6)
    for a, b in zip(straight.parameters(), second.parameters()):
        assert torch.equal(a, b)
