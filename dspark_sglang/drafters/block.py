"""The block-parallel backbone shared by DSpark and DFlash (DeepSpec and z-lab checkpoints).

One block forward, for R requests at once (README §1 "Backbone", drafters-and-paper.md §4):

    context features c_p (p < anchor) --fc--> --hidden_norm--> C_p      (never layer-normed again)
    block ids [anchor, MASK x (B-1)] at positions a..a+B-1 --embed--> X
    each layer:  h = input_layernorm(X)
                 Q = RoPE(q_norm(h Wq))                 at block positions
                 K = RoPE(k_norm([C ; h] Wk))            at [context positions ; block positions]
                 V = [C ; h] Wv                          (context and block share k/v projections)
                 X += attn(Q, K, V) Wo    (no mask: bidirectional in the block, all of the context)
                 X += MLP(post_attention_layernorm(X))
    h = norm(X)                                        -> [R, B, H]

Context K/V depend only on (c_p, p), so each layer's projected, normed and rotated context K and V
are cached per request (`ContextCache`) and extended as positions are committed; a block's own K/V
are transient. Ragged contexts are right-padded and masked, which keeps one forward per round.

Module attribute names equal the checkpoint tensor names (`fc`, `hidden_norm`, `layers.{i}.self_attn.
q_proj`, ..., `norm`), so the backbone loads with `checkpoint.load_weights({"": backbone}, ...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dspark_sglang.cpu_linear import Linear
from dspark_sglang.drafters.config import BlockDrafterConfig, DecoderDims
from dspark_sglang.drafters.layers import Attention, RMSNorm, SwiGLU, apply_rope, rope_cos_sin

_MIN_GEMM_ROWS = 16  # see BlockDrafterBase.append_context


def _rotate(
    x: torch.Tensor,  # [..., T, heads, head_dim]
    positions: torch.Tensor,  # [..., T] int64
    theta: float,
) -> torch.Tensor:
    """RoPE for any leading batch shape (flattens onto layers.apply_rope's [T, heads, d])."""
    flat = x.reshape(-1, *x.shape[-2:])
    cos, sin = rope_cos_sin(positions.reshape(-1), x.shape[-1], theta, dtype=x.dtype)
    return apply_rope(flat, cos, sin).view(x.shape)


class BlockDecoderLayer(nn.Module):
    """A Qwen3 pre-norm decoder layer whose attention also reads injected context K/V."""

    def __init__(self, dims: DecoderDims):
        super().__init__()
        h = dims.hidden_size
        self.self_attn = Attention(h, h, dims.num_heads, dims.num_kv_heads, dims.head_dim, qk_norm=True, eps=dims.rms_norm_eps)
        self.mlp = SwiGLU(h, dims.intermediate_size)
        self.input_layernorm = RMSNorm(h, dims.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, dims.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [R, B, H] block residual stream
        positions: torch.Tensor,  # [R, B] int64 block positions
        attend,  # (q [R, B, heads, d], k [R, B, kv_heads, d], v, scale) -> [R, B, heads, d]: over [context ; block]
        theta: float,
    ) -> torch.Tensor:
        attn = self.self_attn
        num_reqs, block, _ = x.shape
        h = self.input_layernorm(x).reshape(num_reqs * block, -1)
        q = attn.project_q(h).view(num_reqs, block, attn.num_heads, attn.head_dim)
        k, v = attn.project_kv(h)
        k = k.view(num_reqs, block, attn.num_kv_heads, attn.head_dim)
        v = v.view(num_reqs, block, attn.num_kv_heads, attn.head_dim)
        q, k = _rotate(q, positions, theta), _rotate(k, positions, theta)
        out = attend(q, k, v, attn.head_dim**-0.5)
        x = x + attn.o_proj(out.reshape(num_reqs, block, -1))
        return x + self.mlp(self.post_attention_layernorm(x))


def context_block_attention(
    q: torch.Tensor,  # [R, B, heads, d] block queries (normed, rotated)
    ctx_k: torch.Tensor,  # [R, N, kv_heads, d] context keys (normed, rotated), right-padded
    ctx_v: torch.Tensor,  # [R, N, kv_heads, d]
    ctx_mask: torch.Tensor | None,  # [R, N] bool, True = a real context row; None = all real
    k: torch.Tensor,  # [R, B, kv_heads, d] block keys (normed, rotated)
    v: torch.Tensor,  # [R, B, kv_heads, d]
    scale: float,
) -> torch.Tensor:  # [R, B, heads, d]
    """The block's queries over [context ; block] K/V: all of the (unpadded) context, and the block
    bidirectionally; query head j reads KV head j // group. The torch reference of
    kernels/block_attention.py."""
    num_reqs, block = q.shape[:2]
    keys = torch.cat([ctx_k, k], dim=1).transpose(1, 2)  # [R, kv_heads, N + B, d]
    values = torch.cat([ctx_v, v], dim=1).transpose(1, 2)
    mask = None
    if ctx_mask is not None:
        # Padding rows of shorter contexts are hidden; the block's own rows are always visible.
        visible = torch.ones(num_reqs, block, dtype=torch.bool, device=q.device)
        mask = torch.cat([ctx_mask, visible], dim=1)[:, None, None, :]  # [R, 1, 1, N + B]
    # enable_gqa: query head j reads KV head j // group without materialising repeated K/V.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # [R, heads, B, d]
        keys,
        values,
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )  # [R, heads, B, d]
    return out.transpose(1, 2)


def paged_context_block_attention(
    q: torch.Tensor,  # [R, B, heads, d] block queries (normed, rotated)
    pool_k: torch.Tensor,  # [P, kv_heads, d] one layer's context keys, indexed by KV slot
    pool_v: torch.Tensor,  # [P, kv_heads, d]
    rows: torch.Tensor,  # [R, N] int64 KV slots of each request's context positions (right-padded)
    lens: list[int],  # [R] context rows per request (<= N)
    k: torch.Tensor,  # [R, B, kv_heads, d] block keys (normed, rotated)
    v: torch.Tensor,  # [R, B, kv_heads, d]
    scale: float,
) -> torch.Tensor:  # [R, B, heads, d]
    """`context_block_attention` with the context read from a KV-slot pool (`KvSlotContext`): each
    request attends to its own `lens[r]` rows, so no request is padded to the longest. The torch
    reference of kernels/block_attention.py's paged kernel (which reads the rows in place)."""
    out = torch.empty_like(q)
    group = q.shape[2] != k.shape[2]
    for r, n in enumerate(lens):
        slots = rows[r, :n]
        keys = torch.cat([pool_k.index_select(0, slots), k[r]]).transpose(0, 1)  # [kv_heads, n + B, d]
        values = torch.cat([pool_v.index_select(0, slots), v[r]]).transpose(0, 1)
        out[r] = F.scaled_dot_product_attention(
            q[r].transpose(0, 1), keys, values, scale=scale, enable_gqa=group
        ).transpose(0, 1)  # [B, heads, d]
    return out


def windowed_block_attention(
    q: torch.Tensor,  # [R, B, heads, d] block queries (normed, rotated)
    contexts: list[torch.Tensor],  # per request (keys [n_r, kv_heads, d], values [n_r, kv_heads, d]) pairs
    k: torch.Tensor,  # [R, B, kv_heads, d] block keys (normed, rotated)
    v: torch.Tensor,  # [R, B, kv_heads, d]
    scale: float,
    causal_block: bool,  # True: block row i sees block rows <= i only
) -> torch.Tensor:  # [R, B, heads, d]
    """A sliding-window layer (speculators `layer_types: sliding_attention`): each request's queries
    see only the context rows its caller passed (the `sliding_window` positions before the anchor),
    and the block bidirectionally, or causally unless `sliding_window_non_causal`. Torch only: the
    fused kernels serve full-attention layers."""
    out = torch.empty_like(q)
    block = q.shape[1]
    group = q.shape[2] != k.shape[2]
    lower = torch.ones(block, block, dtype=torch.bool, device=q.device).tril()  # [B, B]
    for r, (ctx_k, ctx_v) in enumerate(contexts):
        keys = torch.cat([ctx_k, k[r]]).transpose(0, 1)  # [kv_heads, n + B, d]
        values = torch.cat([ctx_v, v[r]]).transpose(0, 1)
        mask = None
        if causal_block:  # [B, n + B]: all of the window, the block up to the query's own row
            mask = torch.cat([lower.new_ones(block, ctx_k.shape[0]), lower], dim=1)
        out[r] = F.scaled_dot_product_attention(
            q[r].transpose(0, 1), keys, values, attn_mask=mask, scale=scale, enable_gqa=group
        ).transpose(0, 1)  # [B, heads, d]
    return out


class BlockBackbone(nn.Module):
    """fc + hidden_norm (context fusion), the decoder layers and the final norm."""

    def __init__(self, dims: DecoderDims, num_context_layers: int):
        super().__init__()
        self.dims = dims
        h = dims.hidden_size
        self.fc = Linear(num_context_layers * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, dims.rms_norm_eps)
        self.layers = nn.ModuleList(BlockDecoderLayer(dims) for _ in range(dims.num_layers))
        self.norm = RMSNorm(h, dims.rms_norm_eps)

    def context_kv(
        self,
        features: torch.Tensor,  # [n, len(target_layer_ids) * H] committed target features
        positions: torch.Tensor,  # [n] int64 their positions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer context keys and values, each [num_layers, n, kv_heads, head_dim].

        Differentiable (training may call it directly); rows are independent, so the rows of many
        requests can be stacked into one call.
        """
        fused = self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))  # [n, H]
        keys, values = [], []
        for layer in self.layers:
            k, v = layer.self_attn.project_kv(fused)  # context skips input_layernorm by design
            keys.append(_rotate(k, positions, self.dims.rope_theta))
            values.append(v)
        return torch.stack(keys), torch.stack(values)

    def forward(
        self,
        x: torch.Tensor,  # [R, B, H] block embeddings
        positions: torch.Tensor,  # [R, B] int64
        attends: list,  # per layer: (q, k, v, scale) -> out, attention over [its context ; the block]
    ) -> torch.Tensor:
        """Final-normed block hidden states h, [R, B, H]."""
        for layer, attend in zip(self.layers, attends):
            x = layer(x, positions, attend, self.dims.rope_theta)
        return self.norm(x)


@dataclass
class _SlotCache:
    keys: torch.Tensor  # [num_layers, capacity, kv_heads, head_dim]
    values: torch.Tensor  # [num_layers, capacity, kv_heads, head_dim]
    length: int = 0


class ContextCache:
    """Per-request context K/V for every layer, in growable buffers (amortised O(1) append)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self._slots: dict[int, _SlotCache] = {}

    def length(self, slot: int) -> int:
        entry = self._slots.get(slot)
        return 0 if entry is None else entry.length

    def append(
        self,
        slot: int,
        keys: torch.Tensor,  # [num_layers, n, kv_heads, head_dim]
        values: torch.Tensor,  # [num_layers, n, kv_heads, head_dim]
    ) -> None:
        layers, heads, dim = self.shape
        n = keys.shape[1]
        entry = self._slots.get(slot)
        need = (0 if entry is None else entry.length) + n
        if entry is None or need > entry.keys.shape[1]:
            capacity = max(need, 2 * (0 if entry is None else entry.keys.shape[1]), 64)
            grown = _SlotCache(
                torch.empty(layers, capacity, heads, dim, dtype=self.dtype, device=self.device),
                torch.empty(layers, capacity, heads, dim, dtype=self.dtype, device=self.device),
            )
            if entry is not None:
                grown.keys[:, : entry.length] = entry.keys[:, : entry.length]
                grown.values[:, : entry.length] = entry.values[:, : entry.length]
                grown.length = entry.length
            entry = self._slots[slot] = grown
        entry.keys[:, entry.length : need] = keys
        entry.values[:, entry.length : need] = values
        entry.length = need

    def truncate(self, slot: int, length: int) -> None:
        if length < 0:
            raise ValueError(f"cannot truncate slot {slot} to a negative length {length}")
        entry = self._slots.get(slot)
        if entry is not None:
            entry.length = min(entry.length, length)

    def release(self, slot: int) -> None:
        self._slots.pop(slot, None)

    def gather(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Right-padded K, V [num_layers, R, N_max, kv_heads, head_dim] and mask [R, N_max] bool.

        The mask is None when every context has the same length (no padding to hide).
        """
        layers, heads, dim = self.shape
        lengths = [self.length(s) for s in slots]
        n_max = max(lengths, default=0)
        if len(slots) == 1 and n_max > 0:  # the common single-request case: views, no copy
            entry = self._slots[slots[0]]
            return entry.keys[:, None, :n_max], entry.values[:, None, :n_max], None
        keys = torch.zeros(layers, len(slots), n_max, heads, dim, dtype=self.dtype, device=self.device)
        values = torch.zeros_like(keys)
        for r, (slot, n) in enumerate(zip(slots, lengths)):
            if n:
                keys[:, r, :n] = self._slots[slot].keys[:, :n]
                values[:, r, :n] = self._slots[slot].values[:, :n]
        if len(set(lengths)) <= 1:
            return keys, values, None
        mask = torch.arange(n_max, device=self.device)[None, :] < torch.tensor(lengths, device=self.device)[:, None]
        return keys, values, mask


class KvSlotContext:
    """Context K/V in a pool indexed by the serving engine's KV slots, not per request.

    SGLang keeps the target's K/V of position p of request `slot` (its req_pool_idx) at KV slot
    `req_to_token[slot, p]`; the drafter's context K/V of that position live at the same index here.
    So nothing is copied or padded per round (attention reads each request's rows through
    `req_to_token`), a forward writes the rows of every token it computed in one batched store
    (rejected drafts included: their slots are overwritten when reused, as the target's are), and a
    radix-cache hit finds the cached prefix's rows already in place (`set_length`). Memory:
    num_layers x 2 x kv_heads x head_dim values per KV slot, allocated with the engine's pool.
    `length(slot)` is how many leading positions of the request hold valid rows.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device,
                 num_kv_slots: int, req_to_token: torch.Tensor):
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.keys = torch.zeros(num_layers, num_kv_slots, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.req_to_token = req_to_token  # [max_reqs, row_width], the engine's live table
        self._lengths: dict[int, int] = {}

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    @property
    def bytes_per_slot(self) -> int:
        layers, heads, dim = self.shape
        return 2 * layers * heads * dim * self.keys.element_size()

    def length(self, slot: int) -> int:
        return self._lengths.get(slot, 0)

    def set_length(self, slot: int, length: int) -> None:
        """Positions 0..length-1 of `slot` hold valid rows (written, or found by a radix-cache hit)."""
        if length < 0:
            raise ValueError(f"slot {slot}: negative context length {length}")
        self._lengths[slot] = length

    def truncate(self, slot: int, length: int) -> None:
        if length < 0:
            raise ValueError(f"cannot truncate slot {slot} to a negative length {length}")
        if slot in self._lengths:
            self._lengths[slot] = min(self._lengths[slot], length)

    def release(self, slot: int) -> None:
        self._lengths.pop(slot, None)

    def write_rows(
        self,
        kv_slots: torch.Tensor,  # [T] int KV slots
        keys: torch.Tensor,  # [num_layers, T, kv_heads, head_dim]
        values: torch.Tensor,  # [num_layers, T, kv_heads, head_dim]
    ) -> None:
        index = kv_slots.to(self.device, torch.int64)
        self.keys.index_copy_(1, index, keys.to(self.dtype))
        self.values.index_copy_(1, index, values.to(self.dtype))

    def append(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """ContextCache's interface: rows for positions length(slot) .. length(slot) + n - 1."""
        start, n = self.length(slot), keys.shape[1]
        self.write_rows(self.req_to_token[slot, start : start + n], keys, values)
        self._lengths[slot] = start + n

    def index(self, slots: list[int]) -> tuple[torch.Tensor, list[int]]:
        """([R, N_max] int64 KV slots of each request's context, right-padded with 0; [R] lengths)."""
        lens = [self.length(s) for s in slots]
        n_max = max(lens, default=0)
        rows = self.req_to_token[torch.as_tensor(slots, device=self.req_to_token.device), :n_max]
        return rows.to(self.device, torch.int64), lens


class BlockDrafterBase:
    """Context-cache plumbing and the block forward shared by DeepSpec and z-lab drafters.

    Subclasses set `info`, `config`, `backbone` and implement `embed(ids)`; they add the output
    side (which slots draft, which heads run).
    """

    config: BlockDrafterConfig
    backbone: BlockBackbone

    def _init_cache(self, dtype: torch.dtype, device) -> None:
        dims = self.config.dims
        self.dtype, self.device = dtype, torch.device(device)
        self.cache = ContextCache(dims.num_layers, dims.num_kv_heads, dims.head_dim, dtype, device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # [R, B] int64 -> [R, B, H]
        raise NotImplementedError

    def context_length(self, slot: int) -> int:
        return self.cache.length(slot)

    def truncate_context(self, slot: int, length: int) -> None:
        self.cache.truncate(slot, length)

    def release(self, slot: int) -> None:
        self.cache.release(slot)

    def _check_append(self, slots, features, positions, tokens) -> None:
        if not len(slots) == len(features) == len(positions) == len(tokens):
            raise ValueError("append_context: slots, features, positions and tokens differ in length")
        width = self.config.context_width
        pending: dict[int, int] = {}
        for slot, feats, pos, toks in zip(slots, features, positions, tokens):
            if feats.ndim != 2 or feats.shape[1] != width:
                raise ValueError(f"slot {slot}: features must be [n, {width}], got {tuple(feats.shape)}")
            if pos.shape != (feats.shape[0],) or toks.shape != (feats.shape[0],):
                raise ValueError(
                    f"slot {slot}: positions {tuple(pos.shape)} / tokens {tuple(toks.shape)} do not match "
                    f"{feats.shape[0]} feature rows"
                )
            start = pending.get(slot, self.cache.length(slot))
            # Host-side check only: on an accelerator it would cost a sync per call.
            if pos.device.type == "cpu" and pos.numel() and not torch.equal(
                pos, torch.arange(start, start + pos.numel(), dtype=pos.dtype)
            ):
                raise ValueError(
                    f"slot {slot}: context positions must continue the cache contiguously from {start}, "
                    f"got {pos[:4].tolist()}..."
                )
            pending[slot] = start + pos.numel()

    @torch.no_grad()
    def append_context(
        self,
        slots: list[int],
        features: list[torch.Tensor],  # per request [n_i, len(target_layer_ids) * H]
        positions: list[torch.Tensor],  # per request [n_i] int64, continuing the cache
        tokens: list[torch.Tensor],  # per request [n_i] int64 (unused: block drafters read features only)
    ) -> None:
        """Project the new rows of all requests in one pass and append them per slot."""
        self._check_append(slots, features, positions, tokens)
        counts = [f.shape[0] for f in features]
        total = sum(counts)
        if not total:
            return
        keys, values = self.context_rows(torch.cat(features), torch.cat(positions))  # [L, sum n_i, kv_heads, d]
        for slot, k, v in zip(slots, keys.split(counts, dim=1), values.split(counts, dim=1)):
            if k.shape[1]:
                self.cache.append(slot, k, v)

    def block_hidden(
        self,
        slots: list[int],
        anchor_tokens: torch.Tensor,  # [R] int64
        anchor_positions: torch.Tensor,  # [R] int64
    ) -> torch.Tensor:
        """h for the blocks [anchor, MASK x (B-1)] at positions anchor .. anchor+B-1: [R, B, H]."""
        num_reqs, block = len(slots), self.config.block_size
        if anchor_tokens.shape != (num_reqs,) or anchor_positions.shape != (num_reqs,):
            raise ValueError(f"anchor_tokens and anchor_positions must be [{num_reqs}]")
        ids = torch.full((num_reqs, block), self.config.mask_token_id, dtype=torch.int64, device=self.device)
        ids[:, 0] = anchor_tokens.to(self.device)
        offsets = torch.arange(block, device=self.device)
        positions = anchor_positions.to(self.device)[:, None] + offsets[None, :]  # [R, B]
        if isinstance(self.cache, KvSlotContext):
            rows, lens = self.cache.index(slots)
            paged = getattr(self, "paged_attention_fn", paged_context_block_attention)
            attends = [
                (lambda q, k, v, scale, i=i: paged(q, self.cache.keys[i], self.cache.values[i], rows, lens, k, v, scale))
                for i in range(len(self.backbone.layers))
            ]
            # [R] per request: (layer -> (K, V) of its context rows, given the row range)
            context_rows = lambda i, r, lo, hi: (self.cache.keys[i].index_select(0, rows[r, lo:hi]),  # noqa: E731
                                                 self.cache.values[i].index_select(0, rows[r, lo:hi]))
        else:
            ctx_k, ctx_v, ctx_mask = self.cache.gather(slots)
            lens = [self.cache.length(s) for s in slots] if self.config.sliding_layers else None
            # `attention_fn` is context_block_attention unless the adapter installed the fused kernel's
            # dispatcher (`DSparkDrafter.use_kernels`); the drafters never import kernels themselves.
            padded = getattr(self, "attention_fn", context_block_attention)
            attends = [
                (lambda q, k, v, scale, i=i: padded(q, ctx_k[i], ctx_v[i], ctx_mask, k, v, scale))
                for i in range(len(self.backbone.layers))
            ]
            context_rows = lambda i, r, lo, hi: (ctx_k[i, r, lo:hi], ctx_v[i, r, lo:hi])  # noqa: E731
        if self.config.sliding_layers:
            # A sliding layer sees positions anchor - window .. anchor - 1: the last `window` context
            # rows, since a request's context always ends right before its anchor (row p = position
            # p). Host-side lengths, so no device sync.
            starts = [max(0, n - self.config.sliding_window) for n in lens]
            for i in self.config.sliding_layers:
                attends[i] = (lambda q, k, v, scale, i=i: windowed_block_attention(
                    q, [context_rows(i, r, lo, n) for r, (lo, n) in enumerate(zip(starts, lens))], k, v, scale,
                    causal_block=not self.config.sliding_non_causal))
        return self.backbone(self.embed(ids), positions, attends)

    def use_kv_slot_context(self, num_kv_slots: int, req_to_token: torch.Tensor) -> KvSlotContext:
        """Keep the context in a pool indexed by the engine's KV slots from now on (the serving path);
        every request starts empty."""
        dims = self.config.dims
        self.cache = KvSlotContext(dims.num_layers, dims.num_kv_heads, dims.head_dim, self.dtype, self.device,
                                   num_kv_slots, req_to_token)
        return self.cache

    @torch.no_grad()
    def context_rows(
        self,
        features: torch.Tensor,  # [T, len(target_layer_ids) * H] target features of T tokens
        positions: torch.Tensor,  # [T] int64 their positions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context K and V of T tokens, each [num_layers, T, kv_heads, head_dim], for `KvSlotContext.write_rows`."""
        total = features.shape[0]
        feats = features.to(self.device, self.dtype)
        pos = positions.to(self.device)
        if total < _MIN_GEMM_ROWS:
            # CPU BLAS takes a different (gemv-like) path for a handful of rows, whose rounding
            # differs from the prefill GEMM's; zero rows keep a 1-4 row append on the same path,
            # so an incrementally built cache matches one built from scratch (measured: exactly).
            feats = torch.cat([feats, feats.new_zeros(_MIN_GEMM_ROWS - total, feats.shape[1])])
            pos = torch.cat([pos, pos.new_zeros(_MIN_GEMM_ROWS - total)])
        keys, values = self.backbone.context_kv(feats, pos)
        return keys[:, :total], values[:, :total]
