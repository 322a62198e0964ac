"""Eagle3 drafters (DeepSpec `Qwen3Eagle3Model`, SpecForge/SafeAILab `LlamaForCausalLMEagle3`),
drafting a chain (top-1, no tree) behind the `Drafter` protocol.

The layer (fixture README §3, §5), for a token embedding e and a hidden state g (both [*, H]):

    u = [input_layernorm(e) ; hidden_norm(g)]              (embedding half first, width 2H)
    Q = RoPE(q_norm(u Wq)), K = RoPE(k_norm(u Wk)), V = u Wv     (q/k norms: DeepSpec only)
    x = g + attn(Q, [cached K ; K], [cached V ; V]) Wo       (the residual is g, not u)
    x = x + MLP(post_attention_layernorm(x))               -> logits = lm_head(norm(x))

Pairing. Row p pairs g_p = fc(c_p) (the target features of position p) with the token at p+1, at
RoPE position p, causally; its logits predict position p+2. The feature of the last committed
position therefore waits for the next token: `append_context` completes rows as their next tokens
arrive, and the one pending row is paired with the anchor at `propose` time. A row's K/V depend
only on (g_p, token p+1, p), so completing a row is two projections, no attention.

A block, anchor x_0 at position a (context positions 0..a-1, row a-1 pending):
    step 0:   e = embed(x_0),  g = g_{a-1},   position a-1  -> x^0, d_1 (position a+1)
    step j>0: e = embed(d_j),  g = x^{j-1},   position a-1+j -> x^j, d_{j+1}   (no fc)
Every step attends to the completed rows and to steps 0..j. The steps' K/V are transient: the
per-request cache keeps completed rows only (DeepSpec crops its cache back after drafting).
`d_j` is fed back as a TARGET id: SpecForge draft index d maps to d + d2t[d].

Per-request cache (eagle3_cache.py): K/V of completed rows, plus fc(c_p) of every row, so
`truncate_context` can re-open any row as the pending one (H + 2 * kv_heads * head_dim values per position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dspark_sglang.cpu_linear import Linear, linear
from dspark_sglang.drafters.checkpoint import check_target_tensor, load_weights
from dspark_sglang.drafters.config import DecoderDims
from dspark_sglang.drafters.dspark import empty_block
from dspark_sglang.drafters.eagle3_cache import Eagle3Cache
from dspark_sglang.drafters.eagle3_config import Eagle3Layout, check_vocab_map, parse_layout
from dspark_sglang.drafters.interface import DraftBlock, DrafterInfo, TargetSpec
from dspark_sglang.drafters.layers import Attention, RMSNorm, SwiGLU, apply_rope, rope_cos_sin
from dspark_sglang.sampling import SamplingBatch, draw, top1_of_logits


class Eagle3Layer(nn.Module):
    """The single Eagle3 decoder layer; attribute names equal the checkpoint's."""

    def __init__(self, dims: DecoderDims, qk_norm: bool, norm_before_residual: bool = False):
        super().__init__()
        h = dims.hidden_size
        self.dims = dims
        self.norm_before_residual = norm_before_residual  # speculators: the residual is hidden_norm(g)
        self.hidden_norm = RMSNorm(h, dims.rms_norm_eps)
        self.input_layernorm = RMSNorm(h, dims.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, dims.rms_norm_eps)
        self.self_attn = Attention(2 * h, h, dims.num_heads, dims.num_kv_heads, dims.head_dim, qk_norm, dims.rms_norm_eps)
        self.mlp = SwiGLU(h, dims.intermediate_size)

    def _input(self, emb: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # [T, H] x2 -> [T, 2H]
        return torch.cat([self.input_layernorm(emb), self.hidden_norm(g)], dim=-1)

    def _rope(self, positions: torch.Tensor, like: torch.Tensor):  # [T] -> cos, sin [T, head_dim]
        return rope_cos_sin(positions, self.dims.head_dim, self.dims.rope_theta, dtype=like.dtype)

    def row_kv(
        self,
        emb: torch.Tensor,  # [T, H] embedding of the token paired with each row
        g: torch.Tensor,  # [T, H] the rows' hidden inputs
        positions: torch.Tensor,  # [T] int64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache entries of rows: K (normed, rotated) and V, each [T, kv_heads, head_dim]."""
        k, v = self.self_attn.project_kv(self._input(emb, g))
        cos, sin = self._rope(positions, k)
        return apply_rope(k, cos, sin), v

    def step(
        self,
        emb: torch.Tensor,  # [R, H] embedding of each request's input token
        g: torch.Tensor,  # [R, H] hidden input
        positions: torch.Tensor,  # [R] int64 RoPE positions
        keys: torch.Tensor,  # [R, kv_heads, S_max, head_dim] cache; this step writes column `col`
        values: torch.Tensor,  # [R, kv_heads, S_max, head_dim]
        col: int,
        mask: torch.Tensor | None,  # [R, S_max] bool, True = attend; None = every column < col+1
    ) -> torch.Tensor:
        """One query row per request; returns the pre-norm output x [R, H]."""
        attn = self.self_attn
        num_reqs = emb.shape[0]
        u = self._input(emb, g)
        q = attn.project_q(u)  # [R, heads, d]
        k, v = attn.project_kv(u)  # [R, kv_heads, d]
        cos, sin = self._rope(positions, q)
        keys[:, :, col] = apply_rope(k, cos, sin)
        values[:, :, col] = v
        # One query per request, so the query heads sharing a KV head can sit in SDPA's query-length
        # axis: [R, kv_heads, group, d] against [R, kv_heads, S, d], with no repeat of the keys.
        # Head j reads KV head j // group, which is exactly this view's order.
        group = attn.num_heads // attn.num_kv_heads
        q = apply_rope(q, cos, sin).view(num_reqs, attn.num_kv_heads, group, attn.head_dim)
        visible = None if mask is None else mask[:, None, None, : col + 1]  # [R, 1, 1, S]
        out = F.scaled_dot_product_attention(
            q, keys[:, :, : col + 1], values[:, :, : col + 1], attn_mask=visible, scale=attn.head_dim**-0.5
        )  # [R, kv_heads, group, d]
        residual = self.hidden_norm(g) if self.norm_before_residual else g
        x = residual + attn.o_proj(out.reshape(num_reqs, -1))
        return x + self.mlp(self.post_attention_layernorm(x))


class Eagle3Model(nn.Module):
    """Weights of one checkpoint; `state_dict()` keys equal the checkpoint's tensor names."""

    def __init__(self, layout: Eagle3Layout):
        super().__init__()
        cfg, dims = layout.config, layout.config.dims
        h = dims.hidden_size
        n = len(cfg.target_layer_ids)
        self.fc = Linear(n * h, h, bias=False)
        self.fc_input_norm = cfg.fc_input_norm
        if cfg.fc_input_norm == "concat":  # speculators norm_before_fc
            self.input_norm = RMSNorm(n * h, dims.rms_norm_eps)
        elif cfg.fc_input_norm == "per_layer":  # speculators fc_norm
            self.fc_norm = nn.ModuleList(RMSNorm(h, dims.rms_norm_eps) for _ in range(n))
        layer = Eagle3Layer(dims, qk_norm=cfg.qk_norm, norm_before_residual=cfg.norm_before_residual)
        if layout.layer_prefix == "midlayer.":
            self.midlayer = layer
        else:
            self.layers = nn.ModuleList([layer])
        self.norm = RMSNorm(h, dims.rms_norm_eps)
        self.lm_head = Linear(h, cfg.draft_vocab_size, bias=False)
        if layout.embed_in_checkpoint:
            self.embed_tokens = nn.Embedding(dims.vocab_size, h)
        if layout.has_vocab_map:
            self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
            self.register_buffer("t2d", torch.zeros(dims.vocab_size, dtype=torch.bool))

    @property
    def layer(self) -> Eagle3Layer:
        return self.midlayer if hasattr(self, "midlayer") else self.layers[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., draft_vocab]
        return self.lm_head(self.norm(x))

    def fuse(self, features: torch.Tensor) -> torch.Tensor:  # [n, len(ids) * H] -> [n, H]
        """fc of the target features, after the input norms of the speculators variants that have them."""
        if self.fc_input_norm == "concat":
            features = self.input_norm(features)
        elif self.fc_input_norm == "per_layer":
            chunks = features.chunk(len(self.fc_norm), dim=-1)
            features = torch.cat([norm(c) for norm, c in zip(self.fc_norm, chunks)], dim=-1)
        return self.fc(features)


class Eagle3Drafter(nn.Module):
    """Implements `interface.Drafter` for the `deepspec_eagle3` and `specforge_eagle3` formats.

    Build with `build_eagle3` (strict weights), or directly for a randomly initialised model
    (`meta=True` builds shapes only, to be filled by `checkpoint.load_weights`).
    """

    def __init__(
        self,
        layout: Eagle3Layout,
        target_embed: torch.Tensor | None = None,  # [V, H] when the checkpoint has no embed_tokens
        gamma: int | None = None,  # drafts per block; default the config's ttt_length, else 7
        dtype: torch.dtype = torch.float32,
        device="cpu",
        meta: bool = False,
    ):
        super().__init__()
        cfg, dims = layout.config, layout.config.dims
        self.layout, self.config = layout, cfg
        self.dtype, self.device = dtype, torch.device(device)
        with torch.device("meta" if meta else device):
            self.model = Eagle3Model(layout)
        if not meta:
            self.model.to(dtype)
        if not layout.embed_in_checkpoint:
            if target_embed is None:
                raise ValueError("this Eagle3 layout borrows the target's embed_tokens; pass target_embed [V, H]")
            # Non-persistent: it belongs to the target and never appears in the drafter's state_dict.
            self.register_buffer("target_embed", target_embed.to(device=device, dtype=dtype), persistent=False)
        self.draft_ids: torch.Tensor | None = None  # [Vd] target id of each draft index; None = identity
        self._head_rows: torch.Tensor | None = None  # [Vd, H] lm_head rows of an external reduced vocabulary
        gamma = cfg.gamma if gamma is None else gamma
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        self.cache = Eagle3Cache(dims.hidden_size, dims.num_kv_heads, dims.head_dim, dtype, device)
        self.info = DrafterInfo(
            family="eagle3",
            format=layout.source,
            gamma=gamma,
            # Decoder-layer outputs (HF hidden_states[l + 1]) in both formats; see eagle3_config.py.
            target_layer_ids=tuple(cfg.target_layer_ids),
            target_hidden_size=dims.hidden_size,
            vocab_size=dims.vocab_size,
            has_confidence_head=False,
            has_markov_head=False,
        )

    def finish_vocab_map(self, path: str) -> None:
        """Check d2t/t2d after loading and cache the draft -> target id table."""
        if self.layout.has_vocab_map:
            self.draft_ids = check_vocab_map(self.model.d2t, self.model.t2d, self.info.vocab_size, path)

    # ---- vocabulary ----------------------------------------------------------------------------

    def restrict_vocab(self, vocab) -> None:
        """Draft over a reduced vocabulary (`draft_vocab.DraftVocab`; None: the full one again), for a
        full-vocabulary checkpoint (DeepSpec); a SpecForge checkpoint already has its own (d2t)."""
        if self.layout.has_vocab_map:
            raise ValueError("this Eagle3 checkpoint already drafts over its own reduced vocabulary (d2t/t2d)")
        if vocab is not None and vocab.vocab_size != self.info.vocab_size:
            raise ValueError(f"draft vocabulary over {vocab.vocab_size} tokens, drafter vocabulary {self.info.vocab_size}")
        self.draft_ids = None if vocab is None else vocab.ids.to(self.device)
        self._head_rows = None if vocab is None else vocab.rows(self.model.lm_head.weight)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., Vd]
        if self._head_rows is None:
            return self.model.logits(x)
        return linear(self.model.norm(x), self._head_rows)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # [...] int64 TARGET ids -> [..., H]
        weight = self.model.embed_tokens.weight if self.layout.embed_in_checkpoint else self.target_embed
        return F.embedding(ids, weight)

    def to_target(self, draft_idx: torch.Tensor) -> torch.Tensor:  # [...] draft indices -> target ids
        return draft_idx if self.draft_ids is None else self.draft_ids[draft_idx]

    def to_target_probs(self, probs: torch.Tensor) -> torch.Tensor:  # [..., Vd] -> [..., V]
        """Scatter a draft-vocabulary distribution into target positions (0 outside the draft vocab)."""
        if self.draft_ids is None:
            return probs
        full = probs.new_zeros(*probs.shape[:-1], self.info.vocab_size)
        return full.index_copy_(-1, self.draft_ids, probs)

    # ---- context cache -------------------------------------------------------------------------

    def context_length(self, slot: int) -> int:
        return self.cache.length(slot)

    def truncate_context(self, slot: int, length: int) -> None:
        self.cache.truncate(slot, length)

    def release(self, slot: int) -> None:
        self.cache.release(slot)

    def _check_append(self, slots, features, positions, tokens) -> list[int]:
        """Validate shapes and contiguity; return each request's start position."""
        if not len(slots) == len(features) == len(positions) == len(tokens):
            raise ValueError("append_context: slots, features, positions and tokens differ in length")
        width = len(self.info.target_layer_ids) * self.info.target_hidden_size
        starts, pending = [], {}
        for slot, feats, pos, toks in zip(slots, features, positions, tokens):
            n = feats.shape[0] if feats.ndim == 2 else -1
            if n < 0 or feats.shape[1] != width:
                raise ValueError(f"slot {slot}: features must be [n, {width}], got {tuple(feats.shape)}")
            if pos.shape != (n,) or toks.shape != (n,):
                raise ValueError(f"slot {slot}: positions {tuple(pos.shape)} and tokens {tuple(toks.shape)} must be [{n}]")
            start = pending.get(slot, self.cache.length(slot))
            # Host-side check only: on an accelerator it would cost a sync per call.
            if pos.device.type == "cpu" and n and not torch.equal(pos, torch.arange(start, start + n, dtype=pos.dtype)):
                raise ValueError(f"slot {slot}: positions must continue the cache from {start}, got {pos[:4].tolist()}...")
            starts.append(start)
            pending[slot] = start + n
        return starts

    @torch.no_grad()
    def append_context(
        self,
        slots: list[int],
        features: list[torch.Tensor],  # per request [n_i, len(target_layer_ids) * H]
        positions: list[torch.Tensor],  # per request [n_i] int64, continuing the cache
        tokens: list[torch.Tensor],  # per request [n_i] int64, the committed token at each position
    ) -> None:
        """fc the new rows of all requests in one pass; complete every row whose next token is now
        known (the previous pending row and all new rows but the last) in one K/V projection."""
        starts = self._check_append(slots, features, positions, tokens)
        counts = [f.shape[0] for f in features]
        if not sum(counts):
            return
        fused = self.model.fuse(torch.cat(features).to(self.device, self.dtype)).split(counts)  # [n_i, H] each
        rows_g, rows_tok, rows_pos, done = [], [], [], []
        pending: dict[int, torch.Tensor | None] = {}  # slots seen earlier in this call
        for slot, g, toks, start in zip(slots, fused, tokens, starts):
            prev = pending[slot] if slot in pending else self.cache.pending(slot)
            if g.shape[0]:
                toks = toks.to(self.device)
                if prev is None:  # first rows of a request: the token at position 0 pairs with nothing
                    g_rows, toks, first = g[:-1], toks[1:], start
                else:  # the old pending row start-1 pairs with the token at start
                    g_rows, first = torch.cat([prev, g[:-1]]), start - 1
                rows_g.append(g_rows)
                rows_tok.append(toks)
                rows_pos.append(torch.arange(first, first + g_rows.shape[0], device=self.device))
                pending[slot] = g[-1:]
            done.append(rows_g[-1].shape[0] if g.shape[0] else 0)
        keys, values = self.model.layer.row_kv(self.embed(torch.cat(rows_tok)), torch.cat(rows_g), torch.cat(rows_pos))
        for slot, g, k, v in zip(slots, fused, keys.split(done), values.split(done)):
            if g.shape[0]:
                self.cache.append(slot, g, k, v)

    # ---- drafting ------------------------------------------------------------------------------

    def _unroll(self, slots, anchor_tokens, anchor_positions, num_steps: int, pick):
        """Run the chain; `pick(j, logits [R, Vd])` returns the target ids [R] fed to step j+1.

        Returns logits [R, S, Vd] and the hidden states fed forward [R, S, H] (pre-norm x; norm(x) with norm_output).
        """
        num_reqs = len(slots)
        if anchor_tokens.shape != (num_reqs,) or anchor_positions.shape != (num_reqs,):
            raise ValueError(f"anchor_tokens and anchor_positions must be [{num_reqs}]")
        lengths = [self.cache.length(s) for s in slots]
        empty = [s for s, n in zip(slots, lengths) if n == 0]
        if empty:
            raise ValueError(f"slots {empty} have no context: append the prompt's features before proposing")
        if anchor_positions.device.type == "cpu" and anchor_positions.tolist() != lengths:
            # The anchor is the token right after the last feature row; anything else means the
            # worker and the cache disagree about what is committed.
            raise ValueError(f"anchor_positions {anchor_positions.tolist()} != context lengths {lengths}")
        keys, values, mask, g, n_max = self.cache.gather(slots, num_steps)
        positions = torch.tensor(lengths, device=self.device) - 1  # [R] the pending rows' positions
        tokens = anchor_tokens.to(self.device)
        layer, logits, hidden = self.model.layer, [], []
        for j in range(num_steps):
            g = layer.step(self.embed(tokens), g, positions + j, keys, values, n_max + j, mask)
            if self.config.norm_output:  # speculators Eagle 3.1: the next step reads norm(x); logits = head(norm(x))
                g = self.model.norm(g)
                logits.append(self.model.lm_head(g) if self._head_rows is None else linear(g, self._head_rows))
            else:
                logits.append(self._logits(g))
            hidden.append(g)
            tokens = pick(j, logits[-1])
        return torch.stack(logits, dim=1), torch.stack(hidden, dim=1)

    @torch.no_grad()
    def draft_chain(
        self,
        slots: list[int],
        anchor_tokens: torch.Tensor,  # [R] int64
        anchor_positions: torch.Tensor,  # [R] int64, == context_length(slot)
        sampling: SamplingBatch,
        generator: torch.Generator | None = None,
        uniforms: torch.Tensor | None = None,  # [R, gamma] U(0,1); drawn from `generator` when None
    ) -> tuple[DraftBlock, torch.Tensor, torch.Tensor]:
        """`propose`, plus the draft-vocabulary logits [R, gamma, Vd] and hidden x [R, gamma, H]."""
        num_reqs, gamma = len(slots), self.info.gamma
        if not num_reqs:
            raise ValueError("draft_chain needs at least one slot (propose handles an empty batch)")
        if uniforms is None:
            uniforms = torch.rand((num_reqs, gamma), generator=generator, device=self.device)
        if uniforms.shape != (num_reqs, gamma):
            raise ValueError(f"uniforms must be [{num_reqs}, {gamma}], got {tuple(uniforms.shape)}")
        probs, indices, tokens = [], [], []

        def pick(j: int, logits: torch.Tensor) -> torch.Tensor:
            q, idx = draw(sampling, logits, uniforms[:, j].to(logits.device))  # inverse CDF; greedy rows: argmax
            probs.append(q)
            indices.append(idx)
            tokens.append(self.to_target(idx))
            return tokens[-1]

        logits, hidden = self._unroll(slots, anchor_tokens, anchor_positions, gamma, pick)
        q = torch.stack(probs, dim=1)  # [R, gamma, Vd]
        block = DraftBlock(
            tokens=torch.stack(tokens, dim=1),
            # Acceptance needs q over the target vocabulary: tokens outside the draft vocab get 0.
            probs=self.to_target_probs(q),
            token_probs=q.gather(-1, torch.stack(indices, dim=1)[..., None]).squeeze(-1),
            confidence_logits=None,
            top1_probs=top1_of_logits(logits),  # [R, gamma] over the draft vocabulary
        )
        return block, logits, hidden

    def propose_with_logits(
        self,
        slots: list[int],
        anchor_tokens: torch.Tensor,  # [R] int64
        anchor_positions: torch.Tensor,  # [R] int64
        sampling: SamplingBatch,
        generator: torch.Generator | None = None,
    ) -> tuple[DraftBlock, torch.Tensor]:
        """`propose`, plus the draft-vocabulary logits [R, gamma, Vd] each q_k was processed from
        (Vd = draft_vocab_size; map indices with `to_target`, distributions with `to_target_probs`)."""
        if not slots:
            block = empty_block(self.info.gamma, self.info.vocab_size, False, self.device)
            return block, block.probs[..., : self.config.draft_vocab_size]
        return self.draft_chain(slots, anchor_tokens, anchor_positions, sampling, generator)[:2]

    def propose(
        self,
        slots: list[int],
        anchor_tokens: torch.Tensor,  # [R] int64
        anchor_positions: torch.Tensor,  # [R] int64
        sampling: SamplingBatch,
        generator: torch.Generator | None = None,
    ) -> DraftBlock:
        """Draft gamma tokens per request as a chain; q over the target vocabulary; no confidence."""
        return self.propose_with_logits(slots, anchor_tokens, anchor_positions, sampling, generator)[0]

    def score_chain(
        self,
        slots: list[int],
        anchor_tokens: torch.Tensor,  # [R] int64
        anchor_positions: torch.Tensor,  # [R] int64
        next_tokens: torch.Tensor,  # [R, S-1] int64 TARGET ids fed to steps 1..S-1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced chain of S steps (SpecForge's training-time test): logits [R, S, Vd] and
        hidden x [R, S, H]. Runs under the caller's grad mode (cached K/V carry no grad)."""
        if next_tokens.ndim != 2 or next_tokens.shape[0] != len(slots):
            raise ValueError(f"next_tokens must be [{len(slots)}, S-1], got {tuple(next_tokens.shape)}")
        forced = next_tokens.to(self.device)
        pick = lambda j, _: forced[:, j] if j < forced.shape[1] else None  # noqa: E731
        return self._unroll(slots, anchor_tokens, anchor_positions, forced.shape[1] + 1, pick)


def build_eagle3(
    config: dict,
    tensors: dict[str, torch.Tensor],
    fmt: str,  # "deepspec" | "specforge" (or "deepspec_eagle3" | "specforge_eagle3")
    target: TargetSpec,
    path: str,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    *,
    gamma: int | None = None,  # drafts per block; default ttt_length (DeepSpec), else 7
) -> Eagle3Drafter:
    """An Eagle3 drafter from a parsed checkpoint, strictly: every weight comes from `tensors`
    (or, for a SpecForge export without `embed_tokens`, from `target.embed_tokens`)."""
    path = str(path)
    layout = parse_layout(config, fmt, tensors, target, path)
    dims = layout.config.dims
    embed = None
    if not layout.embed_in_checkpoint:
        embed = check_target_tensor(target.embed_tokens, "embed_tokens", (dims.vocab_size, dims.hidden_size), path, dtype, device)
    drafter = Eagle3Drafter(layout, embed, gamma, dtype, device, meta=True)
    load_weights({"": drafter.model}, tensors, path, dtype, device)
    drafter.finish_vocab_map(path)
    return drafter.eval()
