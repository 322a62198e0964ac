"""Training-time forwards built from the product's drafter modules (no second implementation of
the weights: every projection, norm, MLP and head called here is a submodule of the product's
`DSparkDrafter` / `Eagle3Drafter`, and `tests/unit/test_train_forward.py` checks that these batched
forwards equal the modules' own inference paths).

Block drafters (DSpark, DFlash), many anchors per sequence in one dense forward (DeepSpec's
training mask): S sequences of T positions, A anchors each, block size G, Q = A * G query rows.
- context: C = hidden_norm(fc(c_t)) for every position t (no input_layernorm), K/V at position t;
- queries: block i = [anchor_i, MASK x (G - 1)] at positions a_i .. a_i + G - 1;
- keys: [context (T) ; all blocks (Q)]; block i sees context positions < a_i (strictly before its
  anchor: exactly the committed context an inference round has) and its own G rows (bidirectional),
  never another block.

Eagle3, training-time test (TTT) unrolling over every row at once: row t pairs g_t = fc(c_t) with
the token at t + 1 at RoPE position t (step 0, causal over rows); step k feeds row t the token at
t + k + 1 with the hidden input = step k-1's pre-norm output, at position t + k, attending step 0's
keys of rows 0..t plus its own row's keys from steps 1..k. Step k of row t is the k-th step of the
inference chain whose anchor sits at position t + 1, and predicts the token at t + k + 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dspark_sglang.drafters.block import _rotate
from dspark_sglang.drafters.dspark import DSparkDrafter
from dspark_sglang.drafters.eagle3 import Eagle3Drafter
from dspark_sglang.drafters.heads import teacher_forced_scores


def block_hidden_train(
    drafter: DSparkDrafter,
    features: torch.Tensor,  # [S, T, F] target features (F = len(target_layer_ids) * H)
    ctx_valid: torch.Tensor,  # [S, T] bool, False on right padding
    tokens: torch.Tensor,  # [S, T] int64
    anchors: torch.Tensor,  # [S, A] int64 anchor positions (>= 1)
) -> torch.Tensor:
    """Final-normed block hidden states h [S, A, G, H] for every anchor of every sequence."""
    bb, cfg = drafter.backbone, drafter.config
    dims, G = bb.dims, cfg.block_size
    S, T = tokens.shape
    A = anchors.shape[1]
    Q, H = A * G, dims.hidden_size
    dev = tokens.device
    ctx_pos = torch.arange(T, device=dev).expand(S, T)  # [S, T]
    fused = bb.hidden_norm(bb.fc(features.to(bb.fc.weight.dtype)))  # [S, T, H]
    ids = torch.full((S, A, G), cfg.mask_token_id, dtype=torch.int64, device=dev)
    ids[:, :, 0] = tokens.gather(1, anchors)
    x = drafter.embed(ids).reshape(S, Q, H)
    q_pos = (anchors[:, :, None] + torch.arange(G, device=dev)).reshape(S, Q)  # [S, Q]
    q_anchor = anchors.repeat_interleave(G, dim=1)  # [S, Q]
    block_id = torch.arange(A, device=dev).repeat_interleave(G)  # [Q]
    ctx_mask = (ctx_pos[:, None, :] < q_anchor[:, :, None]) & ctx_valid[:, None, :]  # [S, Q, T]
    blk_mask = (block_id[:, None] == block_id[None, :]).expand(S, Q, Q)  # [S, Q, Q]
    mask = torch.cat([ctx_mask, blk_mask], dim=-1)[:, None]  # [S, 1, Q, T + Q]
    theta = dims.rope_theta
    for layer in bb.layers:
        attn = layer.self_attn
        nh, nkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        h = layer.input_layernorm(x).reshape(S * Q, H)
        q = _rotate(attn.project_q(h).view(S, Q, nh, d), q_pos, theta)
        kb, vb = attn.project_kv(h)
        kb = _rotate(kb.view(S, Q, nkv, d), q_pos, theta)
        kc, vc = attn.project_kv(fused.reshape(S * T, H))  # the context skips input_layernorm
        kc = _rotate(kc.view(S, T, nkv, d), ctx_pos, theta)
        keys = torch.cat([kc, kb], dim=1).transpose(1, 2)  # [S, kv, T + Q, d]
        values = torch.cat([vc.view(S, T, nkv, d), vb.view(S, Q, nkv, d)], dim=1).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, scale=d**-0.5, enable_gqa=nh != nkv
        )  # [S, nh, Q, d]
        x = x + attn.o_proj(out.transpose(1, 2).reshape(S, Q, nh * d))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return bb.norm(x).view(S, A, G, H)


def block_scores(
    drafter: DSparkDrafter,
    hidden: torch.Tensor,  # [N, G, H] block hidden states
    prev_tokens: torch.Tensor,  # [N, G] int64 [anchor, gt_1 .. gt_{G-1}]
    lm_head_weight: torch.Tensor | None = None,  # [V, H] a lower-precision copy of lm_head (speed), or None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced draft logits U + B [N, G, V] (float32) and confidence logits [N, G] (or None),
    through the product's `heads.teacher_forced_scores`."""
    if lm_head_weight is None:
        base = drafter.lm_head(hidden).float()
    else:
        base = F.linear(hidden.to(lm_head_weight.dtype), lm_head_weight).float()
    return teacher_forced_scores(base, hidden, prev_tokens, drafter.markov_head, drafter.confidence_head)


def _heads(x: torch.Tensor, groups: int) -> torch.Tensor:  # [S, R, kv, d] -> [S, kv*groups, R, d]
    return x.repeat_interleave(groups, dim=2).transpose(1, 2)


def eagle3_ttt_train(
    drafter: Eagle3Drafter,
    features: torch.Tensor,  # [S, T, F]
    tokens: torch.Tensor,  # [S, T] int64 (right padding allowed: rows only look left)
    steps: int,
    rows: torch.Tensor | None = None,  # [S, A] int64 rows t (0 <= t <= T-2) to unroll; None = all T-1 rows
) -> list[torch.Tensor]:
    """Pre-norm outputs x_k [S, A, H] of the selected rows at steps k = 0..steps-1 (see module doc).

    Step 0 runs over every row (each row's step-0 K/V is context for the later rows); steps >= 1 of a
    row depend only on step 0's K/V of rows <= t and on that row's own earlier steps, so they run for
    the selected rows only. Row t at step k is fed the token at t + k + 1; beyond the end the pad id 0
    is fed (those rows are never supervised)."""
    model = drafter.model
    layer, dims = model.layer, model.layer.dims
    attn = layer.self_attn
    nh, nkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    groups = nh // nkv
    S, T = tokens.shape
    R = T - 1
    dev = tokens.device
    scale = d**-0.5
    if rows is None:
        rows = torch.arange(R, device=dev).expand(S, R)
    A = rows.shape[1]
    padded = torch.cat([tokens, tokens.new_zeros(S, steps)], dim=1)

    def project(emb, g, pos):  # [S, n, H] x2, [S, n] -> q [S, nh, n, d], k, v [S, nh, n, d]
        n = emb.shape[1]
        u = layer._input(emb, g).reshape(S * n, -1)  # [S*n, 2H]
        q = _rotate(attn.project_q(u).view(S, n, nh, d), pos, dims.rope_theta)
        k, v = attn.project_kv(u)
        k = _rotate(k.view(S, n, nkv, d), pos, dims.rope_theta)
        return q.transpose(1, 2), _heads(k, groups), _heads(v.view(S, n, nkv, d), groups)

    def finish(g, out):  # out [S, nh, n, d] -> pre-norm x [S, n, H]
        x = g + attn.o_proj(out.transpose(1, 2).reshape(S, out.shape[2], nh * d))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    # step 0: every row, causal over rows
    g0 = model.fc(features[:, :R].to(model.fc.weight.dtype))  # [S, R, H]
    q, k0, v0 = project(drafter.embed(padded[:, 1 : 1 + R]), g0, torch.arange(R, device=dev).expand(S, R))
    causal = torch.ones(R, R, dtype=torch.bool, device=dev).tril()
    s0 = (q @ k0.transpose(-1, -2)) * scale
    x0 = finish(g0, torch.softmax(s0.masked_fill(~causal, float("-inf")), dim=-1) @ v0)  # [S, R, H]
    H = x0.shape[-1]
    g = x0.gather(1, rows[:, :, None].expand(S, A, H))  # [S, A, H]
    outs = [g]
    visible = torch.arange(R, device=dev)[None, None, :] <= rows[:, :, None]  # [S, A, R] step-0 keys <= t
    diag_k, diag_v = [], []
    for k in range(1, steps):
        emb = drafter.embed(padded.gather(1, rows + k + 1))  # token at t + k + 1
        q, kk, vv = project(emb, g, rows + k)  # [S, nh, A, d]
        diag_k.append(kk)
        diag_v.append(vv)
        sc = ((q @ k0.transpose(-1, -2)) * scale).masked_fill(~visible[:, None], float("-inf"))  # [S, nh, A, R]
        sd = torch.stack([(q * kj).sum(-1) for kj in diag_k], dim=-1) * scale  # [S, nh, A, k]
        probs = torch.softmax(torch.cat([sc, sd], dim=-1), dim=-1)
        out = probs[..., :R] @ v0 + (probs[..., R:, None] * torch.stack(diag_v, dim=-2)).sum(-2)
        g = finish(g, out)
        outs.append(g)
    return outs


def eagle3_logits(drafter: Eagle3Drafter, x: torch.Tensor, lm_head_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Draft logits [..., V] (float32) of pre-norm outputs x [..., H]: lm_head(norm(x))."""
    h = drafter.model.norm(x)
    if lm_head_weight is None:
        return drafter.model.lm_head(h).float()
    return F.linear(h.to(lm_head_weight.dtype), lm_head_weight).float()
