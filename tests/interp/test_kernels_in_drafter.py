"""The fused kernels wired into a real drafter: `DSparkDrafter.use_kernels` with the dispatcher
forced to Triton (under the interpreter) proposes exactly what the torch path proposes."""

import functools
import sys
from pathlib import Path

import pytest
import torch

from dspark_sglang.kernels import dispatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from _block_drafter_helpers import FIXTURES, sampling, tiny_target  # noqa: E402

from dspark_sglang.drafters.loader import load_drafter  # noqa: E402

pytestmark = pytest.mark.interp


# speculators: anchor sampling (the same kernel path), without it (the kernel drafts rows 1..B-1), and a
# sliding-window layer 0 (torch) before a full-attention layer 1 (kernel).
@pytest.mark.parametrize("fixture", ["deepspec_dspark_vanilla", "deepspec_dspark_gated", "deepspec_dspark_rnn",
                                     "speculators_dspark_vanilla", "speculators_dspark_gated", "speculators_dspark_swa"])
def test_kernel_path_equals_torch_path(fixture):
    from safetensors.torch import load_file

    ref = load_file(str(FIXTURES / fixture / "reference.safetensors"))
    drafters = [load_drafter(FIXTURES / fixture, tiny_target()) for _ in range(2)]
    drafters[1].use_kernels(functools.partial(dispatch.block_attention, backend="triton"),
                            functools.partial(dispatch.sample_sequential, backend="triton"))
    blocks = []
    for drafter in drafters:
        for slot, n in ((0, 12), (1, 16)):  # two requests with different context lengths
            rows = torch.arange(n)
            drafter.append_context([slot], [ref["context_features"][rows]], [rows], [ref["token_ids"][rows]])
        anchors = ref["token_ids"][[12, 16]]
        blocks.append(drafter.propose([0, 1], anchors, torch.tensor([12, 16]), sampling([0.0, 1.0]),
                                      generator=torch.Generator().manual_seed(5)))
    torch_block, kernel_block = blocks
    assert torch.equal(torch_block.tokens, kernel_block.tokens)
    torch.testing.assert_close(kernel_block.probs, torch_block.probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kernel_block.confidence_logits, torch_block.confidence_logits, atol=1e-5, rtol=1e-4)
