"""DeepSpec checkpoints without their copies of the target's embed_tokens / lm_head borrow them.

The zoo drafters (dspark_sglang/zoo/) omit both copies to stay small; `load_drafter` fills them in
from the TargetSpec, and refuses (naming the tensor) when the TargetSpec lacks them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark_sglang.drafters.errors import TargetMismatchError
from dspark_sglang.drafters.interface import TargetSpec
from dspark_sglang.drafters.loader import describe_drafter, load_drafter

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "drafters"


def _strip(tmp_path: Path, name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    out = tmp_path / name
    out.mkdir()
    shutil.copy(FIXTURES / name / "config.json", out / "config.json")
    tensors = load_file(str(FIXTURES / name / "model.safetensors"))
    copies = {k: tensors.pop(k) for k in ("embed_tokens.weight", "lm_head.weight")}
    save_file(tensors, str(out / "model.safetensors"))
    return out, copies


@pytest.mark.parametrize("name", ["deepspec_dspark_vanilla", "deepspec_dflash", "deepspec_eagle3"])
def test_borrowed_copies_give_the_same_drafter(tmp_path, name):
    stripped, copies = _strip(tmp_path, name)
    assert describe_drafter(stripped).borrows_from_target == ("embed_tokens", "lm_head")
    full = load_drafter(FIXTURES / name, TargetSpec(64, 512, 8))
    borrowed = load_drafter(stripped, TargetSpec(64, 512, 8, copies["embed_tokens.weight"], copies["lm_head.weight"]))
    ref = dict(full.named_parameters())
    got = dict(borrowed.named_parameters())
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key


def test_missing_copy_without_target_weights_is_an_error(tmp_path):
    stripped, copies = _strip(tmp_path, "deepspec_dspark_vanilla")
    with pytest.raises(TargetMismatchError, match="lm_head: this drafter borrows"):
        load_drafter(stripped, TargetSpec(64, 512, 8, copies["embed_tokens.weight"], None))
