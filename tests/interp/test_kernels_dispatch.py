"""kernels/dispatch.py: the DSPARK_KERNELS switch (read per call), the argument override, each op's
two routes agreeing, and the layering rule (the core never imports kernels)."""

import pathlib
import re

import pytest
import torch

from dspark_sglang.acceptance import chain_accept as chain_accept_ref
from dspark_sglang.kernels import dispatch

pytestmark = pytest.mark.interp
ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_env_var_is_read_at_call_time(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve_backend(cpu) == "torch"  # auto: CPU tensors take the reference
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.resolve_backend(cpu) == "triton"  # allowed here: TRITON_INTERPRET=1
    monkeypatch.setenv(dispatch.ENV_VAR, " Torch ")
    assert dispatch.resolve_backend(cpu) == "torch"
    assert dispatch.resolve_backend(cpu, "triton") == "triton"  # the argument wins over the variable
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="DSPARK_KERNELS"):
        dispatch.resolve_backend(cpu)
    with pytest.raises(ValueError, match="backend argument"):
        dispatch.resolve_backend(cpu, "fast")


def test_forcing_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        dispatch.resolve_backend(torch.zeros(1), "triton")


def test_the_env_var_routes_a_real_call(monkeypatch):
    g = torch.Generator().manual_seed(0)
    target = torch.softmax(torch.randn(2, 3, 30, generator=g), -1)
    draft = torch.softmax(torch.randn(2, 2, 30, generator=g), -1)
    args = (target, torch.randint(0, 30, (2, 2), generator=g), draft, torch.tensor([2, 1]),
            torch.tensor([False, True]), torch.rand(2, 2, generator=g), torch.rand(2, generator=g))
    calls = []
    import dspark_sglang.kernels.chain_accept as kernel_module

    monkeypatch.setattr(kernel_module, "chain_accept", lambda *a, **k: calls.append(1) or chain_accept_ref(*a))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    dispatch.chain_accept(*args)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    dispatch.chain_accept(*args)
    assert calls == [1]


def test_topk_budget_routes_agree():
    g = torch.Generator().manual_seed(1)
    surv = torch.cumprod(torch.rand(6, 5, generator=g).clamp(0.3, 1.0), dim=1)
    for count in (0, 7, 30):
        assert torch.equal(dispatch.topk_budget(surv, count, backend="triton"),
                           dispatch.topk_budget(surv, count, backend="torch"))


def test_core_never_imports_kernels():
    """DESIGN.md layering: dspark_sglang/ (core, drafters) must not import dspark_sglang.kernels."""
    pattern = re.compile(r"^\s*(from|import)\s+(dspark_sglang\.kernels|kernels)\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "dspark_sglang").rglob("*.py")
                 if p.parts[-2] != "sglang" and pattern.search(p.read_text())]
    assert offenders == []
