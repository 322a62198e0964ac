"""Verifying draft chains as one ordinary EXTEND forward of the target, and reading its outputs.

A tree-free chain verification is a causal extend: request r appends its window
[anchor, x_1 .. x_len_r] (W_r = 1 + len_r tokens, ragged across requests) after its committed
prefix of seq_len_r tokens, at positions seq_len_r .. seq_len_r + W_r - 1. SGLang's TARGET_VERIFY
mode is built for trees (custom masks, fixed widths) and on CPU only the Triton interpreter serves
it; an EXTEND batch is served by every backend, `torch_native` included (reference §14).

KV slots: SGLang's scheduler already reserved `req_to_token[req_pool_idx, seq_len : seq_len + 2*N]`
(N = speculative_num_draft_tokens) in `eagle_prepare_for_decode` before calling the worker. The
verify writes the first W_r of them; the scheduler commits `accept_len` of them afterwards, and
slots of rejected drafts are overwritten next round. The worker allocates nothing.

Outputs: with `CaptureHiddenMode.FULL` and the drafter's layers captured, the logits processor
returns the packed aux features of every position in `hidden_states`; inside
`every_position_logits` it computes the logits of every position (not only the last) in its one
LM-head pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang.srt.model_executor.forward_batch_info import ForwardMode


@dataclass
class VerifyLayout:
    """Where each request's window sits in the flat verify batch. The lengths are host tensors (the
    round reads them off the device once); the tokens stay where the drafts are."""

    widths: torch.Tensor  # [R] int64 on the host, W_r = 1 + verify_len_r
    starts: torch.Tensor  # [R] int64 on the host, first flat row of request r
    seq_lens: torch.Tensor  # [R] int64 on the host, committed length (= anchor position)
    tokens: torch.Tensor  # [T] int64 flat window tokens, T = sum(W_r), on the drafts' device
    owner: torch.Tensor  # [T] int64 on the host, the request of flat row t
    offsets: torch.Tensor  # [T] int64 on the host, row t's place in its window (0 = the anchor)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def layout_windows(
    anchors: torch.Tensor,  # [R] int64, on the drafts' device
    drafts: torch.Tensor,  # [R, gamma] int64
    verify_lens: torch.Tensor,  # [R] int64 on the host, 0..gamma
    seq_lens: torch.Tensor,  # [R] int64 on the host
    width: int | None = None,  # every window this wide (a verify tier, `verify_tiers`); None: ragged
) -> VerifyLayout:
    """Request r's window [anchor, x_1 .. x_len_r], or with ``width`` W the first W cells of
    [anchor, x_1 .. x_gamma] for every request: rows past len_r are computed, and acceptance never
    reads them (it stops at ``verify_lens``). Their tokens are 0, a valid id whatever the drafter
    left there (a no-draft round's block, a guarded garbage draft)."""
    widths = verify_lens + 1
    full = torch.cat([anchors[:, None].to(drafts.device), drafts], dim=1)  # [R, gamma+1]
    if width is not None:
        longest = int(widths.max()) if len(widths) else 1
        if not longest <= width <= full.shape[1]:
            raise ValueError(f"verify width {width} must hold every window ({longest} rows) and be at most "
                             f"gamma + 1 = {full.shape[1]}")
        cols = torch.arange(full.shape[1], device=full.device)[None, :]  # [1, gamma+1]
        full = torch.where(cols < widths.to(full.device)[:, None], full, 0)  # padding rows: token 0
        widths = torch.full_like(widths, width)
    starts = torch.cumsum(widths, 0) - widths
    # Flat positions of the kept cells, from host lengths: a gather, not a data-dependent mask.
    owner = torch.repeat_interleave(torch.arange(len(widths)), widths)  # [T]
    offsets = torch.arange(int(widths.sum())) - starts[owner]  # [T]
    cells = owner * full.shape[1] + offsets  # [T]
    return VerifyLayout(widths, starts, seq_lens, full.reshape(-1)[cells.to(full.device)], owner, offsets)


def turn_into_verify_extend(batch, layout: VerifyLayout, pool_rows: torch.Tensor) -> None:
    """Rewrite the scheduler's DECODE batch in place into the EXTEND batch of the windows.

    `pool_rows` [R] int64: the requests' rows of `req_to_token`, on the host (SGLang's host copy).

    When no request verifies a draft (every window is its anchor alone) the batch stays a plain
    DECODE batch over the anchors: the same positions, KV slots and outputs, through SGLang's
    decode path, which is cheaper than an extend (on CPU, torch_native's decode attention).

    The scheduler runs the worker inside `_forward_isolation`, which restores every field of the
    batch afterwards, so in-place field rebinding is safe; tensors are never mutated in place.
    """
    device = batch.seq_lens.device
    req_to_token = batch.req_to_token_pool.req_to_token  # [max_reqs, row_width]
    widths_list = layout.widths.tolist()
    prefix_list = layout.seq_lens.tolist()
    max_w = max(widths_list)
    cols = layout.seq_lens[layout.owner] + layout.offsets  # [T] positions
    rows = pool_rows.to(torch.int64)[layout.owner]  # [T]
    out_cache_loc = req_to_token[rows.to(req_to_token.device), cols.to(req_to_token.device)]  # [T]
    new_lens = layout.seq_lens + layout.widths  # [R] total length after the extend

    batch.input_ids = layout.tokens.to(device)
    batch.out_cache_loc = out_cache_loc.to(device=device, dtype=torch.int64)
    if max_w == 1:
        batch.forward_mode = ForwardMode.DECODE  # positions = seq_lens - 1: the anchors'
    else:
        batch.forward_mode = ForwardMode.EXTEND
        batch.prefix_lens = prefix_list
        batch.extend_lens = widths_list
        batch.extend_num_tokens = layout.num_tokens
        batch.extend_logprob_start_lens = widths_list  # no input logprobs
        batch.extend_input_logprob_token_ids = None
    batch.seq_lens = new_lens.to(device=device, dtype=batch.seq_lens.dtype)
    batch.seq_lens_cpu = new_lens.to(torch.int64)
    batch.seq_lens_sum = int(new_lens.sum())
    batch.orig_seq_lens = new_lens.to(device=device, dtype=torch.int32)
    batch.req_pool_indices_cpu = pool_rows.to(torch.int64)
    batch.return_logprob = False
    batch.return_hidden_states = False
    batch.spec_info = None


def capture_target_layers(model, layer_ids: tuple[int, ...]) -> None:
    """Make the target return the outputs of decoder layers `layer_ids` (ours and DeepSpec's
    convention: id l = output of layer l, -1 = the embeddings).

    SGLang's `set_dflash_layers_to_capture(ids)` captures the input of layer id+1, i.e. the output
    of layer id: the same convention, no shift. (`set_eagle3_layers_to_capture` also adds 1.)
    The last layer's output is not capturable (it would be the input of layer L); drafters never
    use it (DeepSpec asserts it away).
    """
    num_layers = model.config.num_hidden_layers
    if any(not -1 <= l < num_layers - 1 for l in layer_ids):
        raise ValueError(f"target_layer_ids {list(layer_ids)} must lie in [-1, {num_layers - 2}] for this target")
    if hasattr(model, "set_dflash_layers_to_capture"):
        model.set_dflash_layers_to_capture(list(layer_ids))
    elif hasattr(model, "set_eagle3_layers_to_capture"):
        model.set_eagle3_layers_to_capture(list(layer_ids))
    else:
        raise ValueError(f"{type(model).__name__} cannot capture intermediate layers for the drafter")


def lm_head_weight(model) -> torch.Tensor:
    """[V_padded, H] output embedding of the target (tied or not)."""
    head = getattr(model, "lm_head", None)
    if head is None or not hasattr(head, "weight"):
        head = model.model.embed_tokens
    return head.weight


def _every_position(self, hidden_states, hidden_states_before_norm, aux_hidden_states, logits_metadata):
    """`LogitsProcessor._get_pruned_states` for a chain verify: keep every position, as SGLang prunes
    its own TARGET_VERIFY batches (no sample or input-logprob indices)."""
    return hidden_states, hidden_states_before_norm, aux_hidden_states, None, None, []


class _instance_override:
    """Within this context `obj.<name>` is `fn` bound to `obj` (an instance attribute shadows the
    class's method); nothing happens when `active` is False."""

    def __init__(self, obj, name: str, fn, active: bool = True):
        self.obj, self.name, self.fn, self.active = obj, name, fn, active

    def __enter__(self):
        if self.active:
            setattr(self.obj, self.name, self.fn.__get__(self.obj))
        return self

    def __exit__(self, *exc):
        if self.active:
            delattr(self.obj, self.name)
        return False


def every_position_logits(model, active: bool = True) -> _instance_override:
    """Within this context an EXTEND forward's logits cover every position ([T, V]), computed by the
    model's own LogitsProcessor in one LM-head pass (logit scale, soft-capping and the TP gather
    included). Without it an EXTEND keeps only each request's last position, and all-position
    logits would need a second pass over the LM head: on a CPU at batch 1 that is a fifth of a
    decode step's weight traffic (SmolLM2: 113 of 540 MB)."""
    return _instance_override(model.logits_processor, "_get_pruned_states", _every_position, active)


class plain_hidden_states(_instance_override):
    """Within this context the forward also keeps, in `.rows`, the `hidden_states` a plain forward of the
    same batch would return ([T, H]: the final hidden states of every position, or SGLang's
    before-norm states where the server asks for those), although the drafter's captured layers take
    the output's `hidden_states` field. SGLang's own `_get_hidden_states_to_store` computes both; only
    requests that ask for `return_hidden_states` pay for it (`active`)."""

    def __init__(self, model, active: bool = True):
        self.rows: torch.Tensor | None = None
        holder = self

        def store_both(lp, hidden, before_norm, aux, pruned, pruned_before_norm, aux_pruned, sample_indices, meta):
            method = type(lp)._get_hidden_states_to_store
            holder.rows = method(lp, hidden, before_norm, None, pruned, pruned_before_norm, None, sample_indices, meta)
            return method(lp, hidden, before_norm, aux, pruned, pruned_before_norm, aux_pruned, sample_indices, meta)

        super().__init__(model.logits_processor, "_get_hidden_states_to_store", store_both, active)


def _sdpa_extend_new_queries_only(
    self,
    query: torch.Tensor,  # [T, heads, d]
    output: torch.Tensor,  # [T, heads, d]
    k_cache: torch.Tensor,  # [slots, kv_heads, d]
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,  # [max_reqs, row_width]
    req_pool_indices: torch.Tensor,  # [R]
    seq_lens: torch.Tensor,  # [R] prefix + new
    extend_prefix_lens: torch.Tensor,  # [R]
    extend_seq_lens: torch.Tensor,  # [R]
    encoder_lens=None,
    scaling=None,
    enable_gqa=False,
    causal=False,
    is_cross_attn=False,
    sliding_window_size=None,
):
    """torch_native's extend attention without its O(context^2) padding.

    The stock version pads each request's queries to the full sequence length and throws the
    prefix rows away, so a few verify tokens over a long context cost a full-context prefill per
    layer. Here only the new queries attend, with the causal mask written out over [prefix; new].
    """
    if encoder_lens is not None or not causal or (sliding_window_size is not None and sliding_window_size > -1):
        return type(self)._run_sdpa_forward_extend(
            self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
            extend_prefix_lens, extend_seq_lens, encoder_lens, scaling, enable_gqa, causal,
            is_cross_attn, sliding_window_size,
        )
    query = query.movedim(0, -2)  # [heads, T, d]
    start = 0
    for i, (n_new, prefix, kv_len) in enumerate(
        zip(extend_seq_lens.tolist(), extend_prefix_lens.tolist(), seq_lens.tolist())
    ):
        tokens = req_to_token[req_pool_indices[i], :kv_len]
        keys = k_cache[tokens].movedim(0, -2)  # [kv_heads, kv_len, d]
        values = v_cache[tokens].movedim(0, -2)
        q = query[:, start : start + n_new]  # [heads, n_new, d]
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        visible = torch.arange(kv_len, device=q.device)[None, :] <= (
            prefix + torch.arange(n_new, device=q.device)
        )[:, None]  # [n_new, kv_len]
        out = torch.nn.functional.scaled_dot_product_attention(
            q[None], keys[None], values[None], attn_mask=visible, scale=scaling, enable_gqa=enable_gqa
        )  # [1, heads, n_new, d]
        output[start : start + n_new] = out[0].movedim(-2, 0)
        start += n_new
    return output


def fast_verify_attention(backend) -> _instance_override:
    """Within this context, a torch_native backend serves extends with `_sdpa_extend_new_queries_only`
    (other backends are left alone)."""
    return _instance_override(backend, "_run_sdpa_forward_extend", _sdpa_extend_new_queries_only,
                              active=type(backend).__name__ == "TorchNativeAttnBackend")
