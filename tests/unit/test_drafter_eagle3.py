"""Eagle3 drafters (DeepSpec `Qwen3Eagle3Model`, SpecForge `LlamaForCausalLMEagle3`) against the
reference tensors the reference implementations produced (tests/fixtures/drafters/README.md §3, §5),
plus cache, batching, sampling and checkpoint-validation properties.

Pairing reminder: feature row p goes with the token at p+1, so with context positions 0..i and the
anchor S[i+1] at position i+1, step 0 of the chain is the reference's prefill row i.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dspark_sglang.drafters.checkpoint import read_checkpoint
from dspark_sglang.drafters.eagle3 import Eagle3Drafter, build_eagle3
from dspark_sglang.drafters.errors import DrafterConfigError, DrafterWeightsError, TargetMismatchError
from dspark_sglang.drafters.interface import Drafter, TargetSpec
from dspark_sglang.drafters.loader import load_drafter
from dspark_sglang.sampling import SamplingBatch, process_logits

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "drafters"
DEEPSPEC, SPECFORGE = FIXTURES / "deepspec_eagle3", FIXTURES / "specforge_eagle3"
ATOL = 1e-5


def tiny_target(with_embed: bool = True, **overrides) -> TargetSpec:
    """The fixtures' tiny Qwen3 target (H 64, 8 layers, V 512), with its input embedding."""
    embed = load_file(str(SPECFORGE / "target_embeddings.safetensors"))["embed_tokens.weight"] if with_embed else None
    spec = dict(hidden_size=64, vocab_size=512, num_hidden_layers=8, embed_tokens=embed)
    spec.update(overrides)
    return TargetSpec(**spec)


@pytest.fixture(scope="module")
def refs():
    return {d.name: load_file(str(d / "reference.safetensors")) for d in (DEEPSPEC, SPECFORGE)}


@pytest.fixture(scope="module")
def checkpoints():
    return {d.name: read_checkpoint(d) for d in (DEEPSPEC, SPECFORGE)}


def load(folder: Path, **kw) -> Eagle3Drafter:
    return load_drafter(folder, tiny_target(), **kw)


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def feed_prefixes(drafter, ref, ends: list[int]) -> list[int]:
    """Slot r gets context positions 0..ends[r]-1 (one batched append); returns the slots."""
    S, C = ref["token_ids"], ref["context_features"]
    slots = list(range(len(ends)))
    drafter.append_context(slots, [C[:n] for n in ends], [torch.arange(n) for n in ends], [S[:n] for n in ends])
    return slots


def mixed_sampling(kinds: list[int]) -> SamplingBatch:
    """One row per entry: 0 greedy, 1 top-k + top-p, 2 min-p, 3 plain temperature."""
    pick = lambda values: torch.tensor([values[k] for k in kinds])  # noqa: E731
    return SamplingBatch(
        temperatures=pick([0.0, 0.7, 1.0, 1.3]).float(), top_ks=pick([-1, 20, -1, -1]),
        top_ps=pick([1.0, 0.9, 1.0, 1.0]).float(), min_ps=pick([0.0, 0.0, 0.05, 0.0]).float(),
    )


# ---- reference tensors -----------------------------------------------------------------------


def test_deepspec_prefill_rows(refs):
    """prefill row i = step 0 of the chain after context 0..i; 12 ragged requests in one batch."""
    ref, drafter = refs["deepspec_eagle3"], load(DEEPSPEC)
    S = ref["token_ids"]
    ends = list(range(1, 13))
    slots = feed_prefixes(drafter, ref, ends)
    assert torch.equal(ref["prefill.input_ids"], S[1:13])
    logits, hidden = drafter.score_chain(slots, S[1:13], torch.tensor(ends), torch.zeros(12, 0, dtype=torch.int64))
    assert err(hidden[:, 0], ref["prefill.hidden"]) <= ATOL
    assert err(logits[:, 0], ref["prefill.logits"]) <= ATOL


def test_deepspec_greedy_steps_then_update(refs):
    ref, drafter = refs["deepspec_eagle3"], load(DEEPSPEC)
    S, C = ref["token_ids"], ref["context_features"]
    feed_prefixes(drafter, ref, [12])
    block, logits, hidden = drafter.draft_chain([0], S[12:13], torch.tensor([12]), SamplingBatch.greedy(1))
    assert torch.equal(block.tokens[0, :3], ref["steps.tokens"])
    assert err(logits[0, :3], ref["steps.logits"]) <= ATOL  # row 0 = prefill.logits[-1]
    assert err(hidden[0, 1:3], ref["steps.hidden"]) <= ATOL
    assert torch.equal(ref["steps.position_ids"], torch.tensor([12, 13]))  # step j at n + j - 1
    assert torch.equal(block.token_probs, torch.ones(1, 7))  # greedy q is one-hot
    assert drafter.context_length(0) == 12  # the draft steps left nothing in the cache

    # Verification committed [S13, S14]; the worker appends the features of positions 12, 13 (the
    # anchor S12 and S13) with their tokens, and the next anchor is S14 at position 14.
    committed = ref["update.committed_tokens"]
    assert torch.equal(committed, S[13:15]) and torch.equal(ref["update.position_ids"], torch.tensor([12, 13]))
    drafter.append_context([0], [C[12:14]], [torch.arange(12, 14)], [S[12:14]])
    _, logits, hidden = drafter.draft_chain([0], committed[1:], torch.tensor([14]), SamplingBatch.greedy(1))
    assert err(hidden[0, :1], ref["update.hidden_last"]) <= ATOL
    assert err(logits[0, :1], ref["update.logits"]) <= ATOL


def test_specforge_ttt_steps(refs):
    """TTT step k, row t = teacher-forced chain after context 0..t, fed S[t+k+1]; 21 requests."""
    ref, drafter = refs["specforge_eagle3"], load(SPECFORGE)
    S, rows = ref["token_ids"], torch.arange(21)
    for k in range(3):
        assert torch.equal(ref[f"ttt.step{k}.input_ids"], S[rows + k + 1])
    slots = feed_prefixes(drafter, ref, (rows + 1).tolist())
    forced = torch.stack([S[rows + 2], S[rows + 3]], dim=1)  # [21, 2] target ids for steps 1, 2
    logits, hidden = drafter.score_chain(slots, S[rows + 1], rows + 1, forced)
    for k in range(3):
        assert err(hidden[:, k], ref[f"ttt.step{k}.hidden"]) <= ATOL, k
        assert err(logits[:, k], ref[f"ttt.step{k}.logits"]) <= ATOL, k


def test_specforge_greedy_chain(refs):
    ref, drafter = refs["specforge_eagle3"], load(SPECFORGE)
    S = ref["token_ids"]
    feed_prefixes(drafter, ref, [21])
    block, logits, _ = drafter.draft_chain([0], S[21:22], torch.tensor([21]), SamplingBatch.greedy(1))
    assert err(logits[0, :3], ref["chain.logits"]) <= ATOL
    assert torch.equal(logits[0, :3].argmax(-1), ref["chain.draft_tokens"])
    # Drafts are target ids: d + d2t[d], and that id is what the next step was fed.
    assert torch.equal(ref["chain.draft_tokens"] + ref["d2t"][ref["chain.draft_tokens"]], ref["chain.target_tokens"])
    assert torch.equal(block.tokens[0, :3], ref["chain.target_tokens"])
    # q over the target vocabulary: one-hot at the drafted target id.
    assert block.probs.shape == (1, 7, 512)
    assert torch.equal(block.probs[0].argmax(-1), block.tokens[0])
    assert torch.equal(block.probs.sum(-1), torch.ones(1, 7))


def test_info_and_protocol(refs):
    deepspec, specforge = load(DEEPSPEC), load(SPECFORGE)
    for drafter, fmt, layers in ((deepspec, "deepspec", (1, 2, 3, 4, 5)), (specforge, "specforge", (1, 3, 4))):
        assert isinstance(drafter, Drafter)
        info = drafter.info
        assert (info.family, info.format, info.gamma, info.vocab_size, info.target_hidden_size) == ("eagle3", fmt, 7, 512, 64)
        # Layer ids are decoder-layer outputs: the fixtures' context_features = hidden_states[l + 1].
        assert info.target_layer_ids == layers
        assert not info.has_confidence_head and not info.has_markov_head
    ref = refs["specforge_eagle3"]
    hs = ref["target_all_hidden_states"]
    assert torch.equal(ref["context_features"], torch.cat([hs[l + 1] for l in specforge.info.target_layer_ids], -1))
    config, tensors = read_checkpoint(SPECFORGE)
    drafter = build_eagle3(config, tensors, "specforge", tiny_target(), str(SPECFORGE), gamma=3)
    assert drafter.info.gamma == 3
    # Strict: every state_dict entry is the checkpoint's tensor.
    for name, value in drafter.model.state_dict().items():
        assert torch.equal(value, tensors[name]), name


def test_specforge_embedding_in_checkpoint_equals_borrowed(refs, checkpoints):
    """SafeAILab-style checkpoints ship embed_tokens: then no target embedding is needed."""
    config, tensors = checkpoints["specforge_eagle3"]
    embed = tiny_target().embed_tokens
    own = build_eagle3(config, {**tensors, "embed_tokens.weight": embed}, "specforge", tiny_target(with_embed=False), "ckpt")
    borrowed = load(SPECFORGE)
    for drafter in (own, borrowed):
        feed_prefixes(drafter, refs["specforge_eagle3"], [21])
    S = refs["specforge_eagle3"]["token_ids"]
    a = own.draft_chain([0], S[21:22], torch.tensor([21]), SamplingBatch.greedy(1))[1]
    b = borrowed.draft_chain([0], S[21:22], torch.tensor([21]), SamplingBatch.greedy(1))[1]
    assert torch.equal(a, b)


# ---- cache and batching ----------------------------------------------------------------------


@pytest.mark.parametrize("folder", [DEEPSPEC, SPECFORGE], ids=["deepspec", "specforge"])
def test_incremental_context_equals_scratch(folder, refs):
    ref, drafter = refs[folder.name], load(folder)
    S, C = ref["token_ids"], ref["context_features"]
    feed_prefixes(drafter, ref, [12])  # slot 0: from scratch
    # Slot 1 in pieces: a single first row (nothing completed yet), an empty chunk, and one call
    # that names slot 1 twice (the second chunk completes the first chunk's pending row).
    for pieces in ([(0, 1)], [(1, 1), (1, 5)], [(5, 6), (6, 12)]):
        drafter.append_context(
            [1] * len(pieces), [C[a:b] for a, b in pieces], [torch.arange(a, b) for a, b in pieces], [S[a:b] for a, b in pieces]
        )
    assert drafter.context_length(1) == 12
    uniforms = torch.rand(1, 7, generator=torch.Generator().manual_seed(0)).expand(2, 7)
    block, _, hidden = drafter.draft_chain([0, 1], S[[12, 12]], torch.tensor([12, 12]), mixed_sampling([1, 1]), uniforms=uniforms)
    assert torch.equal(block.tokens[0], block.tokens[1])
    # Different row batching changes float32 rounding only (hidden magnitudes ~10).
    assert err(hidden[0], hidden[1]) <= ATOL and err(block.probs[0], block.probs[1]) <= ATOL


@pytest.mark.parametrize("folder", [DEEPSPEC, SPECFORGE], ids=["deepspec", "specforge"])
def test_truncate_reopens_the_pending_row(folder, refs):
    """Truncating to n equals a context of n positions: row n-1 is pending again."""
    ref, drafter = refs[folder.name], load(folder)
    S = ref["token_ids"]
    feed_prefixes(drafter, ref, [16, 12])
    drafter.truncate_context(0, 12)
    assert drafter.context_length(0) == 12
    logits, hidden = drafter.score_chain([0, 1], S[[12, 12]], torch.tensor([12, 12]), S[[13, 13]][:, None])
    assert err(hidden[0], hidden[1]) <= ATOL and err(logits[0], logits[1]) <= ATOL
    drafter.release(0)
    assert drafter.context_length(0) == 0


@pytest.mark.parametrize("folder", [DEEPSPEC, SPECFORGE], ids=["deepspec", "specforge"])
def test_batched_propose_equals_one_at_a_time(folder, refs):
    """Ragged contexts (1, 5, 12, 20 positions, padded and masked) and per-request sampling
    parameters in one batch give each request's solo result, with the same uniforms."""
    ref, drafter = refs[folder.name], load(folder)
    S = ref["token_ids"]
    ends = [1, 5, 12, 20]
    slots = feed_prefixes(drafter, ref, ends)
    kinds = [0, 1, 2, 3]
    uniforms = torch.rand(4, 7, generator=torch.Generator().manual_seed(1))
    batch, logits, _ = drafter.draft_chain(slots, S[ends], torch.tensor(ends), mixed_sampling(kinds), uniforms=uniforms)
    for r, n in enumerate(ends):
        solo, solo_logits, _ = drafter.draft_chain(
            [r], S[[n]], torch.tensor([n]), mixed_sampling([kinds[r]]), uniforms=uniforms[r : r + 1]
        )
        assert torch.equal(batch.tokens[r], solo.tokens[0]), r
        assert err(batch.probs[r], solo.probs[0]) <= ATOL and err(logits[r], solo_logits[0]) <= ATOL


def test_sampled_block_is_a_consistent_distribution(refs):
    """SpecForge: q is process_logits(draft logits) scattered to target ids, 0 outside the draft
    vocab; tokens are drawn from it; the same generator seed repeats the block."""
    ref, drafter = refs["specforge_eagle3"], load(SPECFORGE)
    S = ref["token_ids"]
    ends = [6, 12, 20]
    slots = feed_prefixes(drafter, ref, ends)
    sampling = mixed_sampling([1, 2, 3])
    run = lambda: drafter.draft_chain(slots, S[ends], torch.tensor(ends), sampling, torch.Generator().manual_seed(7))  # noqa: E731
    block, logits, _ = run()
    again, _, _ = run()
    assert torch.equal(block.tokens, again.tokens) and torch.equal(block.probs, again.probs)
    t2d = ref["d2t"] + torch.arange(256)
    outside = torch.ones(512, dtype=torch.bool)
    outside[t2d] = False
    assert block.probs[..., outside].abs().max() == 0
    assert torch.allclose(block.probs.sum(-1), torch.ones(3, 7), atol=1e-5)
    for k in range(7):
        q = process_logits(logits[:, k], sampling.temperatures, sampling.top_ks, sampling.top_ps, sampling.min_ps)
        assert err(block.probs[:, k][:, t2d], q) == 0
    assert torch.isin(block.tokens, t2d).all()
    assert torch.equal(block.token_probs, block.probs.gather(-1, block.tokens[..., None]).squeeze(-1))
    assert (block.token_probs > 0).all() and block.confidence_logits is None


def test_propose_and_append_validation(refs):
    ref, drafter = refs["deepspec_eagle3"], load(DEEPSPEC)
    S, C = ref["token_ids"], ref["context_features"]
    greedy = SamplingBatch.greedy(1)
    with pytest.raises(ValueError, match="no context"):
        drafter.propose([0], S[:1], torch.tensor([0]), greedy)
    feed_prefixes(drafter, ref, [12])
    with pytest.raises(ValueError, match="anchor_positions"):
        drafter.propose([0], S[13:14], torch.tensor([13]), greedy)
    with pytest.raises(ValueError, match="continue the cache from 12"):
        drafter.append_context([0], [C[13:14]], [torch.tensor([13])], [S[13:14]])
    with pytest.raises(ValueError, match="features must be"):
        drafter.append_context([0], [C[12:13, :64]], [torch.tensor([12])], [S[12:13]])
    empty = drafter.propose([], S[:0], torch.zeros(0, dtype=torch.int64), SamplingBatch.greedy(0))
    assert empty.tokens.shape == (0, 7) and empty.probs.shape == (0, 7, 512)


# ---- checkpoint validation: one corruption per test ------------------------------------------


def _build(checkpoints, name, fmt, mutate_tensors=None, mutate_config=None, target=None):
    config, tensors = checkpoints[name]
    config, tensors = dict(config), dict(tensors)
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_config:
        mutate_config(config)
    return build_eagle3(config, tensors, fmt, target or tiny_target(), f"/ckpt/{name}")


def test_missing_tensor(checkpoints):
    with pytest.raises(DrafterWeightsError, match=r"layers\.0\.self_attn\.q_norm\.weight") as info:
        _build(checkpoints, "deepspec_eagle3", "deepspec", lambda t: t.pop("layers.0.self_attn.q_norm.weight"))
    assert "/ckpt/deepspec_eagle3" in str(info.value) and "missing" in str(info.value)


def test_unexpected_tensor(checkpoints):
    def add(t):
        t["layers.0.self_attn.bogus.weight"] = torch.zeros(1)
    with pytest.raises(DrafterWeightsError, match="unexpected tensors"):
        _build(checkpoints, "deepspec_eagle3", "deepspec", add)


def test_wrong_shape(checkpoints):
    def cut(t):
        t["midlayer.mlp.up_proj.weight"] = t["midlayer.mlp.up_proj.weight"][:-1]
    with pytest.raises(DrafterWeightsError, match=r"midlayer\.mlp\.up_proj\.weight.*\[127, 64\]"):
        _build(checkpoints, "specforge_eagle3", "specforge", cut)


def test_fc_width_disagrees_with_layer_ids(checkpoints):
    def two_layers(c):
        c["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [1, 3]}
    with pytest.raises(DrafterWeightsError, match=r"fc\.weight.*2 target layers"):
        _build(checkpoints, "specforge_eagle3", "specforge", mutate_config=two_layers)


def test_lm_head_rows_disagree_with_draft_vocab(checkpoints):
    def vocab(c):
        c["draft_vocab_size"] = 300
    with pytest.raises(DrafterWeightsError, match=r"lm_head\.weight.*draft_vocab_size=300"):
        _build(checkpoints, "specforge_eagle3", "specforge", mutate_config=vocab)


def test_bad_d2t(checkpoints):
    def shift(t):
        t["d2t"] = t["d2t"].clone()
        t["d2t"][10] += 1  # draft index 10 now maps one target id too far
    with pytest.raises(DrafterWeightsError, match=r"d2t: inconsistent with t2d at draft index 10"):
        _build(checkpoints, "specforge_eagle3", "specforge", shift)


def test_t2d_count_mismatch(checkpoints):
    def extra(t):
        t2d = t["t2d"] = t["t2d"].clone()
        t2d[int((~t2d).nonzero()[0])] = True  # one target token too many in the draft vocab
    with pytest.raises(DrafterWeightsError, match=r"t2d: marks 257 target tokens"):
        _build(checkpoints, "specforge_eagle3", "specforge", extra)


def test_missing_d2t_with_reduced_vocab(checkpoints):
    with pytest.raises(DrafterWeightsError, match=r"missing tensors \[d2t\]"):
        _build(checkpoints, "specforge_eagle3", "specforge", lambda t: t.pop("d2t"))


def test_target_hidden_mismatch(checkpoints):
    with pytest.raises(TargetMismatchError, match=r"config\.json: hidden_size: drafter has 64, target has 128"):
        _build(checkpoints, "deepspec_eagle3", "deepspec", target=tiny_target(hidden_size=128))


def test_target_vocab_mismatch(checkpoints):
    with pytest.raises(TargetMismatchError, match=r"vocab_size"):
        _build(checkpoints, "specforge_eagle3", "specforge", target=tiny_target(vocab_size=1024))


def test_layer_id_beyond_target(checkpoints):
    with pytest.raises(TargetMismatchError, match=r"target_layer_ids.*\[8\]"):
        _build(checkpoints, "deepspec_eagle3", "deepspec", mutate_config=lambda c: c.update(target_layer_ids=[1, 2, 3, 4, 8]))


def test_missing_target_embeddings_for_specforge(checkpoints):
    with pytest.raises(TargetMismatchError, match=r"specforge_eagle3: embed_tokens: .*TargetSpec has none"):
        load_drafter(SPECFORGE, tiny_target(with_embed=False))


def test_deepspec_needs_no_target_embeddings(checkpoints):
    drafter = load_drafter(DEEPSPEC, tiny_target(with_embed=False))  # the checkpoint has its own copy
    assert drafter.info.format == "deepspec"


def test_more_than_one_layer_is_refused(checkpoints):
    with pytest.raises(DrafterConfigError, match=r"num_hidden_layers.*exactly 1"):
        _build(checkpoints, "specforge_eagle3", "specforge", mutate_config=lambda c: c.update(num_hidden_layers=2))


def test_unknown_format_name(checkpoints):
    with pytest.raises(DrafterConfigError, match=r"format.*not an Eagle3 format"):
        _build(checkpoints, "deepspec_eagle3", "zlab")


def test_head_less_feature_is_the_temperature_one_top1(refs):
    """The estimator's feature: max softmax(z_k) of the draft logits, the same for a greedy and a
    sampled request (q_k itself is one-hot when greedy, so its maximum says nothing)."""
    from dspark_sglang.confidence import head_less_feature

    ref, drafter = refs["specforge_eagle3"], load(SPECFORGE)
    S = ref["token_ids"]
    feed_prefixes(drafter, ref, [21])
    greedy, logits, _ = drafter.draft_chain([0], S[21:22], torch.tensor([21]), SamplingBatch.greedy(1))
    assert torch.equal(greedy.probs.amax(-1), torch.ones(1, 7))
    expected = torch.softmax(logits, -1).amax(-1)
    assert torch.allclose(head_less_feature(greedy), expected, atol=1e-6)
    assert (head_less_feature(greedy) < 1).all()
    sampled = SamplingBatch.greedy(1)
    sampled.temperatures.fill_(1.0)
    block, logits_t1, _ = drafter.draft_chain([0], S[21:22], torch.tensor([21]), sampled,
                                              uniforms=torch.full((1, 7), 0.5))
    # step 0 reads x_<0 only: its feature does not depend on the request's sampling
    assert torch.allclose(head_less_feature(block)[:, 0], expected[:, 0], atol=1e-6)
