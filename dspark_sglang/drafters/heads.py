"""DSpark's sequential stage: Markov heads, the confidence head, and block sampling.

Markov heads add a bias B_k to slot k's base logits U_k, conditioned on the previous token p_k
(p_0 = the anchor, p_k = x_k after that), so the draft distribution is the exact softmax
q_k ∝ exp(U_k + B_k) and standard rejection sampling stays lossless (paper §6):

- vanilla: B_k = W2 · W1[p_k]
- gated:   g = σ(gate_proj([h_k ; W1[p_k]])),  B_k = W2 · (g ⊙ W1[p_k])
- rnn:     [γ ; c ; o] = joint_proj([s_{k-1} ; W1[p_k] ; h_k]),  s_{-1} = 0,
           s_k = σ(γ) ⊙ s_{k-1} + (1 - σ(γ)) ⊙ tanh(c),  B_k = W2 · tanh(o)

The confidence head returns a logit c_k = proj([h_k ; W1[p_k]]) (or proj(h_k) without Markov
features); every head type uses the plain W1 row there (no gate, no RNN state). c_k reads p_k =
x_{k-1}, so it is known before x_k is drawn: the scheduler may use it without peeking at x_k.

Attribute names equal the checkpoint's (`markov_w1`, `markov_w2`, `gate_proj`, `joint_proj`,
`proj`), loaded under the prefixes `markov_head.` and `confidence_head.`.
"""

from __future__ import annotations

import torch
from torch import nn

from dspark_sglang.cpu_linear import Linear, linear
from dspark_sglang.drafters.interface import DraftBlock
from dspark_sglang.sampling import SamplingBatch, draw, top1_of_logits


class MarkovHead(nn.Module):
    def __init__(self, kind: str, vocab_size: int, hidden_size: int, rank: int, draft_vocab_size: int | None = None):
        super().__init__()
        if kind not in ("vanilla", "gated", "rnn"):
            raise ValueError(f"unknown markov_head_type {kind!r}")
        self.kind, self.rank = kind, rank
        self.markov_w1 = nn.Embedding(vocab_size, rank)  # indexed by the previous TARGET id
        # W2 projects onto the logits' vocabulary: a checkpoint's own draft vocabulary when it has one.
        self.markov_w2 = Linear(rank, draft_vocab_size or vocab_size, bias=False)
        if kind == "gated":
            self.gate_proj = Linear(hidden_size + rank, rank)
        elif kind == "rnn":
            self.joint_proj = Linear(2 * rank + hidden_size, 3 * rank)

    def initial_state(self, num_reqs: int, like: torch.Tensor) -> torch.Tensor | None:
        """s_{-1} = 0 for the RNN head ([R, rank]); None for the stateless heads."""
        return like.new_zeros(num_reqs, self.rank) if self.kind == "rnn" else None

    def step(
        self,
        hidden: torch.Tensor,  # [R, H] h_k
        prev_rows: torch.Tensor,  # [R, rank] W1[p_k]
        state: torch.Tensor | None,  # [R, rank] s_{k-1} (rnn only)
        w2_rows: torch.Tensor | None = None,  # [Vd, rank] W2's rows of a reduced draft vocabulary
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bias B_k [R, V] (or [R, Vd] with `w2_rows`) for one slot, and the next RNN state."""
        project = self.markov_w2 if w2_rows is None else (lambda x: linear(x, w2_rows))
        if self.kind == "vanilla":
            return project(prev_rows), None
        if self.kind == "gated":
            gate = torch.sigmoid(self.gate_proj(torch.cat([hidden, prev_rows], dim=-1)))
            return project(gate * prev_rows), None
        state, out_in = self._recur(hidden, prev_rows, state)
        return project(torch.tanh(out_in)), state

    def _recur(self, hidden, prev_rows, state) -> tuple[torch.Tensor, torch.Tensor]:
        """RNN: (s_k [R, rank], the output pre-activation o [R, rank]) from s_{k-1}."""
        gate_in, cell_in, out_in = self.joint_proj(torch.cat([state, prev_rows, hidden], dim=-1)).chunk(3, dim=-1)
        gate = torch.sigmoid(gate_in)
        return gate * state + (1 - gate) * torch.tanh(cell_in), out_in

    def advance(
        self,
        hidden: torch.Tensor,  # [R, H] h of a slot that drafts nothing
        prev_rows: torch.Tensor,  # [R, rank] W1 of its previous token
        state: torch.Tensor,  # [R, rank]
    ) -> torch.Tensor:
        """The RNN state after a slot whose bias is not needed (no W2 projection)."""
        return self._recur(hidden, prev_rows, state)[0]

    def teacher_forced(
        self,
        hidden: torch.Tensor,  # [R, G, H]
        prev_tokens: torch.Tensor,  # [R, G] int64, [anchor, gt_1 .. gt_{G-1}]
        state: torch.Tensor | None = None,  # [R, rank] s_{-1} (rnn); None: zeros
    ) -> torch.Tensor:
        """Biases [R, G, V] for given previous tokens (the training path)."""
        rows = self.markov_w1(prev_tokens)  # [R, G, rank]
        if self.kind != "rnn":  # stateless: all slots at once
            return self.step(hidden, rows, None)[0]
        if state is None:
            state = self.initial_state(hidden.shape[0], hidden)
        biases = []
        for k in range(hidden.shape[1]):  # the recurrence is inherently sequential over slots
            bias, state = self.step(hidden[:, k], rows[:, k], state)
            biases.append(bias)
        return torch.stack(biases, dim=1)


class ConfidenceHead(nn.Module):
    def __init__(self, hidden_size: int, markov_rank: int):
        super().__init__()
        self.with_markov = markov_rank > 0  # features [h ; W1[prev]] rather than [h]
        self.proj = Linear(hidden_size + markov_rank, 1)

    def forward(
        self,
        hidden: torch.Tensor,  # [..., H]
        prev_rows: torch.Tensor | None,  # [..., rank] W1[p_k]; ignored without Markov features
    ) -> torch.Tensor:
        """Confidence logits [...] (apply a sigmoid for P(accept x_k | prefix accepted))."""
        feats = torch.cat([hidden, prev_rows], dim=-1) if self.with_markov else hidden
        return self.proj(feats).squeeze(-1)


def _uniforms(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=like.device, dtype=torch.float32)


def _repeat(values: torch.Tensor, times: int) -> torch.Tensor:
    return values.repeat_interleave(times) if times > 1 else values


def sample_independent(
    logits: torch.Tensor,  # [R, G, V] draft logits, one independent distribution per slot
    sampling: SamplingBatch,  # R requests
    generator: torch.Generator | None,
) -> DraftBlock:
    """DFlash: every slot sampled on its own from process_logits(U_k) (no sequential head)."""
    num_reqs, gamma, vocab = logits.shape
    slots = SamplingBatch(  # one row per (request, slot)
        _repeat(sampling.temperatures, gamma), _repeat(sampling.top_ks, gamma), _repeat(sampling.top_ps, gamma),
        _repeat(sampling.min_ps, gamma), filtering=sampling.filtering, all_greedy=sampling.all_greedy,
    )
    probs, tokens = draw(slots, logits.reshape(num_reqs * gamma, vocab), _uniforms((num_reqs * gamma,), logits, generator))
    token_probs = probs.gather(-1, tokens[:, None]).squeeze(-1)
    return DraftBlock(
        tokens=tokens.view(num_reqs, gamma),
        probs=probs.view(num_reqs, gamma, vocab),
        token_probs=token_probs.view(num_reqs, gamma),
        confidence_logits=None,
        top1_probs=top1_of_logits(logits),  # no head: the estimator's feature
    )


def sample_sequential(
    base_logits: torch.Tensor,  # [R, G, V] U_k
    hidden: torch.Tensor,  # [R, G, H] h_k
    anchors: torch.Tensor,  # [R] int64, p_0
    markov: MarkovHead | None,
    confidence: ConfidenceHead | None,
    sampling: SamplingBatch,  # R requests
    generator: torch.Generator | None,
) -> tuple[DraftBlock, torch.Tensor]:
    """Left-to-right DSpark sampling, vectorised over requests.

    For k = 0..G-1: confidence c_k from (h_k, p_k); bias B_k from p_k; q_k = process_logits(U_k + B_k)
    with each request's parameters; x_{k+1} ~ q_k by inverse CDF (one uniform per request and slot,
    drawn from `generator`); p_{k+1} = x_{k+1}. Greedy rows take the argmax.

    Returns the DraftBlock and the corrected logits U + B [R, G, V] (before temperature).
    """
    num_reqs, gamma, _ = base_logits.shape
    uniforms = _uniforms((num_reqs, gamma), base_logits, generator)  # drawn up front: [R, G]
    return sample_sequential_with_uniforms(
        base_logits, hidden, anchors, markov, confidence, sampling, uniforms
    )


def sample_sequential_with_uniforms(
    base_logits: torch.Tensor,  # [R, G, V] U_k
    hidden: torch.Tensor,  # [R, G, H] h_k
    anchors: torch.Tensor,  # [R] int64, p_0
    markov: MarkovHead | None,
    confidence: ConfidenceHead | None,
    sampling: SamplingBatch,  # R requests
    uniforms: torch.Tensor,  # [R, G] U(0,1): uniforms[:, k] draws x_{k+1}
    vocab=None,  # DraftVocab: base_logits are over its Vd ids (see below)
    w2_rows: torch.Tensor | None = None,  # [Vd, rank] the Markov W2 rows of `vocab`
    initial_state: torch.Tensor | None = None,  # [R, rank] the RNN state entering slot 0; None: zeros
) -> tuple[DraftBlock, torch.Tensor]:
    """`sample_sequential` with its randomness given as a tensor (the reference the fused
    kernel in kernels/sequential_head.py is tested against); same returns.

    With a reduced draft vocabulary (`vocab`, draft_vocab.py) the logits and q_k live on its Vd ids:
    each sampled index is mapped to its target id before it feeds W1 (the Markov rows and the
    confidence read target ids), and the block's probs are scattered back to the target vocabulary
    (0 outside the subset); the returned logits stay [R, G, Vd]."""
    num_reqs, gamma, _ = base_logits.shape
    if uniforms.shape != (num_reqs, gamma):
        raise ValueError(f"uniforms must be [{num_reqs}, {gamma}], got {tuple(uniforms.shape)}")
    state = initial_state
    if state is None and markov is not None:
        state = markov.initial_state(num_reqs, hidden)
    prev = anchors.to(base_logits.device)
    tokens, indices, probs, logits, conf = [], [], [], [], []
    for k in range(gamma):
        rows = markov.markov_w1(prev) if markov is not None else None  # [R, rank]
        if confidence is not None:
            conf.append(confidence(hidden[:, k], rows))
        step_logits = base_logits[:, k]
        if markov is not None:
            bias, state = markov.step(hidden[:, k], rows, state, w2_rows)
            step_logits = step_logits + bias
        q, index = draw(sampling, step_logits, uniforms[:, k])  # [R, V or Vd], [R] over the scored vocabulary
        prev = index if vocab is None else vocab.to_target(index)
        tokens.append(prev)
        indices.append(index)
        probs.append(q)
        logits.append(step_logits)
    tokens_t = torch.stack(tokens, dim=1)  # [R, G] target ids
    probs_t = torch.stack(probs, dim=1)  # [R, G, V or Vd]
    block = DraftBlock(
        tokens=tokens_t,
        probs=probs_t if vocab is None else vocab.expand(probs_t),
        token_probs=probs_t.gather(-1, torch.stack(indices, dim=1)[..., None]).squeeze(-1),
        confidence_logits=torch.stack(conf, dim=1).float() if conf else None,
    )
    return block, torch.stack(logits, dim=1)


def teacher_forced_scores(
    base_logits: torch.Tensor,  # [R, G, V]
    hidden: torch.Tensor,  # [R, G, H]
    prev_tokens: torch.Tensor,  # [R, G] int64, [anchor, gt_1 .. gt_{G-1}]
    markov: MarkovHead | None,
    confidence: ConfidenceHead | None,
    initial_state: torch.Tensor | None = None,  # [R, rank] the RNN state entering slot 0; None: zeros
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Corrected logits U + B [R, G, V] and confidence logits [R, G] (or None) for given prefixes."""
    rows = markov.markov_w1(prev_tokens) if markov is not None else None
    logits = base_logits if markov is None else base_logits + markov.teacher_forced(hidden, prev_tokens, initial_state)
    conf = None
    if confidence is not None:
        conf = confidence(hidden, rows)
    return logits, conf
