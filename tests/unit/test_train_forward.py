"""The batched training forwards of examples/training equal the product drafters' inference paths.

Training runs many anchors per sequence through one dense forward (DeepSpec's block mask) and
Eagle3's training-time test over every row at once; serving runs `append_context` + `score_block`
/ `score_chain` per request. They must compute the same function (float32, <= 1e-5), or the saved
checkpoint would not be the model that was trained.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dspark_sglang.drafters.interface import TargetSpec  # noqa: E402
from examples.training.export import build_modules, drafter_config, state_dict_for_checkpoint  # noqa: E402
from examples.training.forward import block_hidden_train, block_scores, eagle3_logits, eagle3_ttt_train  # noqa: E402

ATOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """|a - b| <= 1e-5, relative to the scale for quantities of magnitude > 1 (logits are O(10):
    float32 rounding alone is ~1e-6 of them)."""
    a, b = a.detach(), b.detach()
    return bool((a - b).abs().max() <= ATOL * max(1.0, float(b.abs().max())))
V, H, L = 96, 32, 6


class _TinyTargetConfig:
    """The attributes drafter_config reads from a transformers config (a Llama-like target)."""

    hidden_size, num_attention_heads, num_key_value_heads, head_dim = H, 4, 2, 8
    num_hidden_layers, vocab_size, rms_norm_eps, max_position_embeddings = L, V, 1e-5, 256
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    bos_token_id, eos_token_id, pad_token_id, model_type = 1, 2, 2, "llama"


def _target() -> TargetSpec:
    g = torch.Generator().manual_seed(0)
    return TargetSpec(H, V, L, torch.randn(V, H, generator=g), torch.randn(V, H, generator=g))


def _build(family: str, head: str = "vanilla", layers: int = 2):
    cfg = drafter_config(family, _TinyTargetConfig, num_layers=layers if family != "eagle3" else 1,
                         intermediate_size=48, layer_ids=[0, 2, 4], block_size=5, mask_token_id=V - 1,
                         markov_rank=8, markov_head_type=head, ttt_length=4, target_name="tiny")
    drafter = build_modules(family, cfg, _target(), seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # move every weight off its init (norms 1, biases 0) so each one matters
        for p in drafter.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return drafter


def _data(S: int, T: int, width: int):
    g = torch.Generator().manual_seed(3)
    return torch.randn(S, T, width, generator=g), torch.randint(0, V - 1, (S, T), generator=g)


@pytest.mark.parametrize("family,head", [("dspark", "vanilla"), ("dspark", "gated"), ("dspark", "rnn"), ("dflash", None)])
def test_block_training_forward_equals_score_block(family, head):
    drafter = _build(family, head or "vanilla").eval()
    G = drafter.config.block_size
    S, T = 2, 24
    feats, tokens = _data(S, T, drafter.config.context_width)
    valid = torch.ones(S, T, dtype=torch.bool)
    valid[1, 18:] = False  # the second sequence is right-padded
    anchors = torch.tensor([[1, 7, 12, 19], [3, 4, 9, 13]])
    hidden = block_hidden_train(drafter, feats, valid, tokens, anchors)  # [S, A, G, H]
    prev = torch.stack([tokens[s, a : a + G] for s in range(S) for a in anchors[s].tolist()])  # [S*A, G]
    logits, conf = block_scores(drafter, hidden.reshape(-1, G, H), prev)
    for s in range(S):
        for i, a in enumerate(anchors[s].tolist()):
            slot = 10 * s + i
            drafter.append_context([slot], [feats[s, :a]], [torch.arange(a)], [tokens[s, :a]])
            ref_hidden = drafter.block_hidden([slot], tokens[s, a : a + 1], torch.tensor([a]))
            ref_logits, ref_conf = drafter.score_block([slot], tokens[s, a : a + 1], torch.tensor([a]), prev[None, s * 4 + i])
            drafter.release(slot)
            assert close(hidden[s, i], ref_hidden[0])
            assert close(logits[s * 4 + i], ref_logits[0])
            if conf is None:
                assert ref_conf is None
            else:
                assert close(conf[s * 4 + i], ref_conf[0])


def test_eagle3_ttt_equals_score_chain():
    drafter = _build("eagle3").eval()
    steps, T = 4, 20
    feats, tokens = _data(1, T, len(drafter.info.target_layer_ids) * H)
    anchors = (1, 2, 7, 15)  # anchor position a <-> training row t = a - 1
    outs = eagle3_ttt_train(drafter, feats, tokens, steps)  # all rows: steps x [1, T-1, H]
    some = eagle3_ttt_train(drafter, feats, tokens, steps, rows=torch.tensor([[a - 1 for a in anchors]]))
    for k in range(steps):  # unrolling only the selected rows changes nothing
        assert close(some[k][0], outs[k][0, [a - 1 for a in anchors]])
    logits = [eagle3_logits(drafter, x)[0] for x in outs]  # steps x [T-1, V]
    for a in anchors:
        drafter.append_context([0], [feats[0, :a]], [torch.arange(a)], [tokens[0, :a]])
        ref_logits, ref_hidden = drafter.score_chain([0], tokens[0, a : a + 1], torch.tensor([a]),
                                                     tokens[None, 0, a + 1 : a + steps])
        drafter.release(0)
        for k in range(steps):
            assert close(outs[k][0, a - 1], ref_hidden[0, k])
            assert close(logits[k][a - 1], ref_logits[0, k])


@pytest.mark.parametrize("family", ["dspark", "dflash", "eagle3"])
def test_checkpoint_omits_the_borrowed_copies(family):
    sd = state_dict_for_checkpoint(family, _build(family))
    assert "embed_tokens.weight" not in sd and "lm_head.weight" not in sd
    assert all(t.dtype == torch.bfloat16 for t in sd.values())


def test_fused_distill_loss_matches_autograd():
    """The hand-written backward of the training loss equals autograd through log_softmax/gather."""
    from examples.training.losses import distill_terms, fused_distill

    g = torch.Generator().manual_seed(5)
    N, vocab, K = 12, 300, 16
    logits = (3 * torch.randn(N, vocab, generator=g)).requires_grad_()
    labels = torch.randint(0, vocab, (N,), generator=g)
    labels[0] = 7  # a label inside the top-K set, too
    topk_ids = torch.stack([torch.randperm(vocab, generator=g)[:K] for _ in range(N)])
    topk_ids[0, 3] = 7
    topk_logp = torch.log_softmax(torch.randn(N, vocab, generator=g), -1).gather(-1, topk_ids)
    w_ce, w_l1, w_kl = torch.rand(N, generator=g), torch.rand(N, generator=g), torch.rand(N, generator=g)
    total, ce, l1, kl = fused_distill(logits, labels, topk_ids, topk_logp, w_ce, w_l1, w_kl)
    (grad,) = torch.autograd.grad(total, logits)
    ref = distill_terms(logits, labels, topk_ids, topk_logp)
    ref_total = (w_ce * ref["ce"] + w_l1 * ref["l1"] + w_kl * ref["kl"]).sum()
    (ref_grad,) = torch.autograd.grad(ref_total, logits)
    assert torch.allclose(total, ref_total, atol=1e-5) and torch.allclose(ce, ref["ce"], atol=1e-5)
    assert torch.allclose(l1, ref["l1"], atol=1e-6) and torch.allclose(kl, ref["kl"], atol=1e-5)
    assert (kl >= -1e-6).all()
    assert torch.allclose(grad, ref_grad, atol=1e-6)


def test_lm_head_dtype_auto_follows_the_hardware(tmp_path):
    """bf16 only where it is fast: ~20x slower than float32 on a CPU without AVX512-BF16/AMX."""
    from examples.train_drafter import fast_bf16_matmul, parse_args

    assert fast_bf16_matmul("fpu sse4_2 avx2 avx512f avx512_bf16")
    assert fast_bf16_matmul("avx2 amx_bf16 amx_tile")
    assert not fast_bf16_matmul("fpu sse4_2 avx2 avx512f avx512bw")
    want = "bfloat16" if fast_bf16_matmul() else "float32"
    assert parse_args(["--family", "dspark", "--out", str(tmp_path)]).lm_head_dtype == want
    assert parse_args(["--family", "dspark", "--out", str(tmp_path), "--lm-head-dtype", "bfloat16"]).lm_head_dtype == "bfloat16"


@pytest.mark.parametrize("family", ["dspark", "dflash"])
def test_sampled_vocabulary_is_exact_when_nothing_is_dropped(family):
    """--vocab-sample with N >= the rest of the vocabulary: the same logits (on the kept columns)
    and the same loss as the full-vocabulary path."""
    from examples.training.losses import dspark_loss
    from examples.training.sampled_vocab import sample_vocabulary, sampled_block_scores

    drafter = _build(family)
    G, g = drafter.config.block_size, torch.Generator().manual_seed(6)
    hidden = torch.randn(3, G, H, generator=g)
    prev = torch.randint(0, V, (3, G), generator=g)
    labels = torch.randint(0, V, (3, G), generator=g)
    tk_ids = torch.stack([torch.randperm(V, generator=g)[:8] for _ in range(3 * G)]).view(3, G, 8)
    tk_lp = torch.log_softmax(torch.randn(3, G, 8, generator=g), -1) - 0.5
    valid = torch.ones(3, G, dtype=torch.bool)
    full, conf = block_scores(drafter, hidden, prev)
    ids, log_w, lookup = sample_vocabulary(torch.cat([tk_ids.reshape(-1), labels.reshape(-1)]), V, V, g)
    assert sorted(ids.tolist()) == list(range(V)) and (log_w == 0).all()
    part, part_conf = sampled_block_scores(drafter, hidden, prev, ids, log_w)
    assert close(part, full[..., ids])
    if conf is not None:
        assert close(part_conf, conf)
    ref = dspark_loss(full, conf, labels, valid, tk_ids, tk_lp, fused=True)[0]
    got = dspark_loss(part, part_conf, lookup[labels], valid, lookup[tk_ids], tk_lp, fused=True)[0]
    assert torch.allclose(got, ref, atol=1e-5)


def test_sampled_vocabulary_estimates_the_normaliser_without_bias():
    """Needed tokens are always kept, exactly; the importance weights make the sampled rest's
    exp-sum an unbiased estimate of the dropped tokens' share of the softmax normaliser."""
    from examples.training.sampled_vocab import sample_vocabulary

    g = torch.Generator().manual_seed(7)
    vocab, needed = 400, torch.tensor([3, 3, 17, 250, 399])
    z = torch.randn(vocab, generator=g)
    estimates = []
    for _ in range(2000):
        ids, log_w, lookup = sample_vocabulary(needed, vocab, 40, g)
        assert ids[:4].tolist() == [3, 17, 250, 399] and (log_w[:4] == 0).all() and ids.numel() == 44
        assert torch.equal(lookup[ids], torch.arange(44)) and (lookup >= 0).sum() == 44
        estimates.append(float((z[ids] + log_w).exp().sum()))
    mean = sum(estimates) / len(estimates)
    assert abs(mean / float(z.exp().sum()) - 1) < 0.01
    # negative control: without the weights the same draws miss ~90 % of the rest's mass
    assert float((z[ids]).exp().sum()) < 0.3 * float(z.exp().sum())


def test_a_deeper_drafter_warm_started_from_a_shallower_one_computes_the_same_function(tmp_path):
    """--init-from a 1-layer checkpoint into a 2-layer drafter: the extra layer starts as an identity
    (its output projections zero), so the depth ablation starts from the very model it is compared with."""
    from examples.train_drafter import warm_start
    from examples.training.export import save_checkpoint

    one = _build("dspark", layers=1)
    cfg = drafter_config("dspark", _TinyTargetConfig, num_layers=1, intermediate_size=48, layer_ids=[0, 2, 4],
                         block_size=5, mask_token_id=V - 1, markov_rank=8, markov_head_type="vanilla", ttt_length=4,
                         target_name="tiny")
    save_checkpoint(tmp_path / "one", "dspark", cfg, one)
    two = _build("dspark", layers=2)
    warm_start(two, tmp_path / "one", _target())
    feats, tokens = _data(2, 20, one.config.context_width)
    valid = torch.ones(2, 20, dtype=torch.bool)
    anchors = torch.tensor([[2, 9], [5, 11]])
    from dspark_sglang.drafters.loader import load_drafter

    saved = load_drafter(tmp_path / "one", _target(), dtype=torch.float32, device="cpu", draft_vocab=None)
    want = block_hidden_train(saved.eval(), feats, valid, tokens, anchors)  # the function the checkpoint defines
    save_checkpoint(tmp_path / "two", "dspark", dict(cfg, num_hidden_layers=2, layer_types=["full_attention"] * 2), two)
    grown = load_drafter(tmp_path / "two", _target(), dtype=torch.float32, device="cpu", draft_vocab=None)
    assert len(grown.backbone.layers) == 2
    got = block_hidden_train(grown.eval(), feats, valid, tokens, anchors)
    assert close(got, want)
    assert float(two.backbone.layers[1].mlp.down_proj.weight.abs().sum()) == 0.0  # the identity start
    assert torch.equal(two.backbone.layers[1].mlp.up_proj.weight, saved.backbone.layers[0].mlp.up_proj.weight)
