"""The confidence-head refit (examples/training/confidence_refit.py, examples/refit_confidence.py).

It must supervise exactly what training supervised (same rows, same 1 - TV targets), reach the
weighted-BCE optimum (a convex problem: one answer from any start), change nothing but the head's two
tensors in a checkpoint, and refuse drafters and checkpoints without a confidence head.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dspark_sglang.drafters.interface import TargetSpec  # noqa: E402
from examples.refit_confidence import SECTION, parse_args, update_training_md  # noqa: E402
from examples.train_drafter import block_step  # noqa: E402
from examples.training.batches import collate  # noqa: E402
from examples.training.confidence_refit import (  # noqa: E402
    collect_rows, fit_head, head_logits, head_report, require_confidence_head, slot_weights, write_confidence_head)
from examples.training.export import build_modules, drafter_config, save_checkpoint  # noqa: E402
from examples.training.features import FeatureSet  # noqa: E402

V, H, L, G, K = 96, 32, 6, 5, 8
DECAY = 4.0


class _TinyTargetConfig:
    hidden_size, num_attention_heads, num_key_value_heads, head_dim = H, 4, 2, 8
    num_hidden_layers, vocab_size, rms_norm_eps, max_position_embeddings = L, V, 1e-5, 256
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    bos_token_id, eos_token_id, pad_token_id, model_type = 1, 2, 2, "llama"


def _config(family: str) -> dict:
    return drafter_config(family, _TinyTargetConfig, num_layers=1, intermediate_size=48, layer_ids=[0, 2, 4],
                          block_size=G, mask_token_id=V - 1, markov_rank=8, markov_head_type="vanilla",
                          ttt_length=4, target_name="tiny")


def _build(family: str = "dspark"):
    g = torch.Generator().manual_seed(0)
    target = TargetSpec(H, V, L, torch.randn(V, H, generator=g), torch.randn(V, H, generator=g))
    drafter = build_modules(family, _config(family), target, seed=1)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return drafter.eval()


def _features(num_seqs: int = 6, seed: int = 3) -> FeatureSet:
    """Random sequences with a target whose top-K log-probs are a real (random) distribution."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(14, 30, (num_seqs,), generator=g)
    n = int(lengths.sum())
    logp = torch.log_softmax(2 * torch.randn(n, V, generator=g), -1)
    topk_logp, topk_ids = logp.topk(K, -1)
    return FeatureSet(tokens=torch.randint(0, V - 1, (n,), generator=g),
                      offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
                      prompt_lens=torch.randint(2, 6, (num_seqs,), generator=g),
                      features=torch.randn(n, 3 * H, generator=g).half(), topk_ids=topk_ids, topk_logp=topk_logp)


def _rows(drafter, fs, ids=None, max_anchors=8):
    return collect_rows(drafter, fs, ids if ids is not None else list(range(fs.num_seqs)), max_anchors=max_anchors)


def test_rows_are_what_training_supervises():
    drafter, fs = _build(), _features()
    rows = _rows(drafter, fs, [0, 1], max_anchors=8)
    # the same anchors (same seeded rng, same order) through train_drafter's loss path: same targets
    rng = random.Random(1234)
    args = SimpleNamespace(vocab_sample=0, loss_decay=DECAY, kl_alpha=0.0)
    accept = []
    for s in (0, 1):
        b = collate(fs, [s], rng, 8)
        with torch.no_grad():
            (_, _, t), valid = block_step(drafter, b, None, args)
        accept.append(t["accept"][valid])
    assert len(rows) == sum(a.numel() for a in accept) > 0
    assert torch.allclose(rows.accept, torch.cat(accept), atol=1e-6)
    assert ((rows.accept >= 0) & (rows.accept <= 1)).all()
    assert set(rows.slot.tolist()) <= set(range(G))


def test_fit_reaches_the_weighted_bce_optimum_from_any_start():
    drafter, fs = _build(), _features()
    rows = _rows(drafter, fs)
    w = slot_weights(rows.slot, DECAY)

    def mean_gap(head):  # at the optimum of a logistic fit with an intercept, sum w (sigmoid(c) - y) = 0
        with torch.no_grad():
            return float(((torch.sigmoid(head_logits(head, rows)) - rows.accept) * w).sum() / w.sum())

    biased = drafter.confidence_head
    with torch.no_grad():
        biased.proj.bias.add_(3.0)  # over-confident, like a head fitted on text the backbone memorised
    before = head_report(biased, rows, DECAY)
    assert mean_gap(biased) > 0.1  # negative control: the check below can fail
    other = _build().confidence_head
    with torch.no_grad():
        other.proj.weight.zero_()
        other.proj.bias.fill_(-2.0)
    trace = fit_head(biased, rows, DECAY)
    fit_head(other, rows, DECAY)
    after = head_report(biased, rows, DECAY)
    assert abs(mean_gap(biased)) < 1e-4 and abs(mean_gap(other)) < 1e-4
    assert after["bce"] < before["bce"] and trace["bce_end"] < trace["bce_start"]
    # convex: both starts reach the same loss and (up to L-BFGS's tolerance) the same head
    assert abs(after["bce"] - head_report(other, rows, DECAY)["bce"]) < 1e-5
    with torch.no_grad():
        assert torch.allclose(head_logits(biased, rows), head_logits(other, rows), atol=1e-2)
    assert not any(p.requires_grad for p in biased.parameters())


def test_writing_the_head_changes_only_its_tensors(tmp_path):
    drafter = _build()
    save_checkpoint(tmp_path, "dspark", _config("dspark"), drafter)
    file = tmp_path / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        old = {k: f.get_tensor(k) for k in f.keys()}
        old_meta = f.metadata()
    head = drafter.confidence_head
    with torch.no_grad():
        head.proj.weight.mul_(-0.5)
        head.proj.bias.fill_(-1.25)
    file.chmod(0o644)
    write_confidence_head(tmp_path, head)
    assert file.stat().st_mode & 0o777 == 0o644
    with safe_open(str(file), "pt") as f:
        new = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata() == old_meta
    assert new.keys() == old.keys()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed == {"confidence_head.proj.weight", "confidence_head.proj.bias"}
    assert torch.equal(new["confidence_head.proj.bias"], torch.tensor([-1.25], dtype=torch.bfloat16))
    assert torch.equal(new["confidence_head.proj.weight"], head.proj.weight.detach().to(torch.bfloat16))
    assert not (tmp_path / "model.safetensors.tmp").exists()


def test_drafters_without_a_confidence_head_are_refused(tmp_path):
    dflash = _build("dflash")
    with pytest.raises(ValueError, match="no confidence head"):
        require_confidence_head(dflash)
    with pytest.raises(ValueError, match="no confidence head"):
        _rows(dflash, _features())
    save_checkpoint(tmp_path, "dflash", _config("dflash"), dflash)
    before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="not a DSpark checkpoint with a confidence head"):
        write_confidence_head(tmp_path, _build().confidence_head)
    assert (tmp_path / "model.safetensors").read_bytes() == before  # nothing lost


def test_training_md_keeps_one_refit_section(tmp_path):
    (tmp_path / "TRAINING.md").write_text("# d\n\n## Training\n\ntrained.\n")
    update_training_md(tmp_path, f"{SECTION}\n\nfirst\n")
    update_training_md(tmp_path, f"{SECTION}\n\nsecond\n")
    text = (tmp_path / "TRAINING.md").read_text()
    assert text.count(SECTION) == 1 and "second" in text and "first" not in text
    assert text.startswith("# d\n\n## Training\n\ntrained.\n")


def test_cli_refuses_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--drafter", str(tmp_path)])
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        parse_args(["--drafter", str(tmp_path), "--fit-fraction", "1"])
    assert "held out" in capsys.readouterr().err
    assert parse_args(["--drafter", str(tmp_path)]).num_prompts == 96
    with pytest.raises(SystemExit):  # checked before any generation, not after
        parse_args(["--drafter", str(tmp_path), "--out", str(tmp_path)])
    assert "exists" in capsys.readouterr().err
    (tmp_path / "confidence_refit.json").write_text("{}")  # refitting a refitted head is refused
    with pytest.raises(SystemExit):
        parse_args(["--drafter", str(tmp_path)])
    assert "already refitted" in capsys.readouterr().err
