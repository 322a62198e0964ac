"""The opt-in few-row float32 GEMM kernels (dspark_sglang/cpu_linear.py), the drafters' `linear`, and the hooks
that hand SGLang's own linear layers and LM head to them (dspark_sglang/sglang/cpu_gemm.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dspark_sglang import cpu_linear
from dspark_sglang.sglang import cpu_gemm


@pytest.fixture
def select_kernel():
    """Select a kernel for the test (as `install` does from DSPARK_CPU_GEMM), then the stock path again."""
    yield cpu_linear.select
    cpu_linear.select(None)


def _operands(rows: int, k: int = 48, n: int = 80, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    weight = torch.randn(n, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return x, weight, bias


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("with_bias", [False, True])
def test_few_row_linear_matches_f_linear(rows, with_bias):
    x, weight, bias = _operands(rows)
    bias = bias if with_bias else None
    got = cpu_linear.few_row_linear(x, weight, bias)
    want = torch.nn.functional.linear(x, weight, bias)
    assert got.shape == want.shape == (rows, weight.shape[0])
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_row_mixup_would_be_caught():
    """Negative control: the tolerance above tells rows apart (a transposed or shuffled result fails)."""
    x, weight, _ = _operands(3)
    got = cpu_linear.few_row_linear(x, weight)
    assert (got - torch.nn.functional.linear(x.flip(0), weight)).abs().max().item() > 1e-2


class _Layer(torch.nn.Module):
    def __init__(self, weight, amx=False):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.use_intel_amx_backend = amx


def _route(x, layer, bias=None):
    """Which path `_linear_apply` takes: ('few', result) or ('stock', None)."""
    calls = []

    def original(self, layer, x, bias=None):
        calls.append(1)
        return torch.nn.functional.linear(x, layer.weight, bias)

    out = cpu_gemm._linear_apply(original, None, layer, x, bias)
    return ("stock" if calls else "few"), out


def test_linear_hook_serves_few_float32_rows_and_hands_back_the_rest(select_kernel):
    select_kernel("few-rows")
    x, weight, bias = _operands(cpu_linear.MAX_ROWS_LINEAR)
    path, out = _route(x, _Layer(weight), bias)
    assert path == "few"
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    wide, _, _ = _operands(cpu_linear.MAX_ROWS_LINEAR + 1)
    assert _route(wide, _Layer(weight))[0] == "stock"  # more rows: the stock GEMM is as fast
    assert _route(x.bfloat16(), _Layer(weight.bfloat16()))[0] == "stock"  # bf16: the stock path is faster
    assert _route(x[None], _Layer(weight))[0] == "stock"  # 3-D input
    assert _route(x, _Layer(weight, amx=True))[0] == "stock"  # AMX-packed weights
    assert _route(x[:0], _Layer(weight))[0] == "stock"  # no rows


def _processor():
    # The fields SGLang's `_compute_lm_head` reads on a CPU, for an unquantized float32 head.
    return SimpleNamespace(use_fp32_lm_head=False, use_fp32_lm_head_output=False, rl_on_policy_target=None)


def test_lm_head_hook_matches_sglangs_own(select_kernel):
    select_kernel("few-rows")
    from sglang.srt.layers.logits_processor import LogitsProcessor

    original = LogitsProcessor._compute_lm_head
    hidden, weight, _ = _operands(cpu_linear.MAX_ROWS_LM_HEAD, n=300)
    head = _Layer(weight)
    want = original(_processor(), hidden, head)
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    got = cpu_gemm._compute_lm_head(counting, _processor(), hidden, head)
    assert not calls
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    wide, _, _ = _operands(cpu_linear.MAX_ROWS_LM_HEAD + 1)
    cpu_gemm._compute_lm_head(counting, _processor(), wide, head)
    on_policy = SimpleNamespace(**{**vars(_processor()), "rl_on_policy_target": "fsdp"})
    cpu_gemm._compute_lm_head(counting, on_policy, hidden, head)
    assert len(calls) == 2  # too many rows, an on-policy cast: SGLang's own path


@pytest.mark.parametrize("value,expected", [("", None), ("stock", None), ("0", None), ("few-rows", "few-rows"),
                                            ("FEW-ROWS", "few-rows"), ("Row-Dot", "row-dot")])
def test_requested_kernel(value, expected):
    assert cpu_gemm.requested_kernel({cpu_gemm.ENV: value}) == expected


def test_the_hooks_run_the_chosen_kernel(select_kernel):
    x, weight, bias = _operands(3, k=200, n=40)
    select_kernel("row-dot")
    route, out = _route(x, _Layer(weight), bias)
    assert route == "few" and torch.equal(out, cpu_linear.row_dot_linear(x, weight, bias))


def test_row_dot_serves_its_own_row_range_in_the_layers(select_kernel):
    select_kernel("row-dot")
    x, weight, _ = _operands(cpu_linear.ROW_DOT_MAX_ROWS)
    assert _route(x, _Layer(weight))[0] == "few"
    assert _route(_operands(cpu_linear.ROW_DOT_MAX_ROWS + 1)[0], _Layer(weight))[0] == "stock"


@pytest.mark.parametrize("rows,blocks", [(1, [1]), (5, [5]), (6, [3, 3]), (7, [4, 3]), (11, [4, 4, 3]),
                                         (16, [4, 4, 4, 4])])
def test_row_blocks_split_rows_into_near_equal_blocks(rows, blocks):
    assert cpu_linear.row_blocks(rows) == blocks


def test_row_block_kernels_refuse_blocks_past_the_limit():
    with pytest.raises(ValueError, match="row block"):
        cpu_linear.row_block_kernel(cpu_linear.ROW_BLOCK_MAX + 1)


def test_requested_refuses_unknown_values():
    with pytest.raises(ValueError, match="DSPARK_CPU_GEMM"):
        cpu_gemm.requested_kernel({cpu_gemm.ENV: "fast"})


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 8, 13])
@pytest.mark.parametrize("with_bias", [False, True])
def test_row_dot_linear_matches_f_linear(rows, with_bias):
    x, weight, bias = _operands(rows, seed=rows)
    bias = bias if with_bias else None
    got = cpu_linear.row_dot_linear(x, weight, bias)
    want = torch.nn.functional.linear(x, weight, bias)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [300, 576, 1536])  # 576 and 1536: SmolLM2-135M's inner dimensions
def test_row_dot_rows_do_not_depend_on_the_batch(k):
    """Every block size reduces each row the same way: a row's result is the same bit for bit whether it
    comes alone (a decode step) or with up to 15 others (a verify), in whichever block slot."""
    x, weight, _ = _operands(16, k=k, n=70)
    alone = torch.cat([cpu_linear.row_dot_linear(x[m:m + 1], weight) for m in range(16)])
    for rows in range(2, 17):
        assert torch.equal(cpu_linear.row_dot_linear(x[:rows], weight), alone[:rows]), rows
    shifted = cpu_linear.row_dot_linear(x[3:8], weight)  # the same rows in other block slots
    assert torch.equal(shifted, alone[3:8])
    strided = cpu_linear.row_dot_linear(x.t().contiguous().t(), weight)  # a non-contiguous input
    assert torch.equal(strided, alone)


def test_the_batch_independence_check_can_fail():
    """Negative control: a reduction in another order (torch's GEMM) differs in the last bits, so the
    bit-for-bit check above would see a block kernel that summed differently."""
    x, weight, _ = _operands(16, k=1536, n=70)
    alone = torch.cat([cpu_linear.row_dot_linear(x[m:m + 1], weight) for m in range(16)])
    assert not torch.equal(torch.nn.functional.linear(x, weight), alone)


def test_the_gemm_benchmark_measures_every_method(tmp_path):
    import json

    from dspark_sglang.benchmarks import cpu_gemm as bench

    target = tmp_path / "tiny"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({
        "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
        "vocab_size": 100, "num_hidden_layers": 2}))
    assert bench.main(["--target", str(target), "--rows", "1,3", "--repeats", "1", "--out", str(tmp_path / "out")]) == 0
    points = json.loads((tmp_path / "out" / "results.json").read_text())["points"]
    assert [p["rows"] for p in points] == [1, 3]
    for point in points:
        for method in ("stock", "few_rows", "row_dot"):
            assert point[f"{method}_layers_ms"] > 0 and point[f"{method}_lm_head_ms"] > 0


def test_the_hooks_hand_everything_back_until_a_kernel_is_selected():
    x, weight, bias = _operands(3)
    assert cpu_linear.selection() is None
    assert _route(x, _Layer(weight), bias)[0] == "stock"


def test_select_refuses_unknown_kernels():
    with pytest.raises(ValueError, match="unknown CPU GEMM kernel"):
        cpu_linear.select("fast")


@pytest.mark.parametrize("shape", [(7, 48), (2, 7, 48), (1, 1, 48)])
def test_linear_takes_the_selected_kernel_for_few_rows_of_any_leading_shape(select_kernel, shape):
    """The drafters' matmuls: [R, G, K] activations are R * G rows."""
    g = torch.Generator().manual_seed(1)
    x, layer = torch.randn(*shape, generator=g), cpu_linear.Linear(48, 30, bias=True)
    with torch.no_grad():
        stock = layer(x)  # nothing selected: F.linear
        select_kernel("row-dot")
        got = layer(x)
        rows = x.reshape(-1, 48)
        want = cpu_linear.row_dot_linear(rows, layer.weight, layer.bias).reshape(got.shape)
    assert got.shape == stock.shape == (*shape[:-1], 30)
    assert torch.equal(got, want)
    torch.testing.assert_close(got, stock, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, stock) or rows.shape[0] == 1  # really the other kernel (last bits differ)


def test_linear_keeps_autograd_and_large_batches_on_the_stock_path(select_kernel):
    select_kernel("row-dot")
    layer = cpu_linear.Linear(48, 30)
    x = torch.randn(4, 48, requires_grad=True)
    out = layer(x)
    out.sum().backward()  # training: F.linear, with gradients
    assert x.grad is not None and layer.weight.grad is not None
    with torch.no_grad():
        wide = torch.randn(cpu_linear.ROW_DOT_MAX_ROWS + 1, 48)
        assert torch.equal(layer(wide), torch.nn.functional.linear(wide, layer.weight, layer.bias))


def test_linear_is_a_drop_in_nn_linear():
    """Same parameters, same state dict keys: checkpoints load as before."""
    ours, theirs = cpu_linear.Linear(8, 4), torch.nn.Linear(8, 4)
    assert isinstance(ours, torch.nn.Linear)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
