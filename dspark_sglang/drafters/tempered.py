"""A validation drafter: the target itself, drafting at another temperature. Never for serving.

Losslessness tests need drafts that are accepted often but not always: a trained drafter accepts too
few on CPU-sized targets to give a distribution test power, and a perfect one never exercises the
residual. This drafter runs a Hugging Face copy of the target over each request's committed tokens and
proposes x_k from the request's own sampling distribution with its temperature multiplied by
`temperature_ratio` (q = process_logits(logits, T * ratio, top-k, top-p, min-p)): close to the
target's p, with an acceptance set by the ratio. It recomputes every sequence in full for each of its
gamma steps, which only a tiny target makes affordable (benchmarks/server_distribution.py).

Checkpoint: a folder whose config.json is the target's config plus

    "dspark_test_drafter": {"kind": "tempered_target", "target_path": "...",
                            "temperature_ratio": 1.5, "gamma": 3}
"""

from __future__ import annotations

from pathlib import Path

import torch

from dspark_sglang.drafters.errors import DrafterConfigError
from dspark_sglang.drafters.interface import DraftBlock, DrafterInfo, TargetSpec
from dspark_sglang.sampling import SamplingBatch, process_logits

CONFIG_KEY = "dspark_test_drafter"
KIND = "tempered_target"


class TemperedTargetDrafter:
    def __init__(self, model, target_path: str, temperature_ratio: float, gamma: int, target: TargetSpec, device):
        self.model = model
        self.ratio = temperature_ratio
        self.device = torch.device(device)
        self.info = DrafterInfo(
            family="tempered", format="test", gamma=gamma, target_layer_ids=(0,),
            target_hidden_size=target.hidden_size, vocab_size=target.vocab_size,
            has_confidence_head=False, has_markov_head=False,
        )
        self._tokens: dict[int, list[int]] = {}  # slot -> committed tokens

    # ---- context: the committed tokens only (target features are not needed) ----------------------
    def append_context(self, slots, features, positions, tokens) -> None:
        for slot, pos, toks in zip(slots, positions, tokens):
            seq = self._tokens.setdefault(slot, [])
            start = int(pos[0]) if len(pos) else len(seq)
            del seq[start:]
            seq.extend(int(t) for t in toks.tolist())

    def context_length(self, slot: int) -> int:
        return len(self._tokens.get(slot, ()))

    def truncate_context(self, slot: int, length: int) -> None:
        del self._tokens.setdefault(slot, [])[length:]

    def release(self, slot: int) -> None:
        self._tokens.pop(slot, None)

    # ---- drafting ------------------------------------------------------------------------------
    @torch.no_grad()
    def propose(self, slots, anchor_tokens, anchor_positions, sampling: SamplingBatch, generator=None) -> DraftBlock:
        gamma = self.info.gamma
        seqs = [self._tokens.get(s, [])[: int(p)] + [int(a)]
                for s, a, p in zip(slots, anchor_tokens.tolist(), anchor_positions.tolist())]
        lengths = torch.tensor([len(s) for s in seqs])  # [R]
        ids = torch.zeros(len(seqs), int(lengths.max()) + gamma, dtype=torch.int64)  # right padding
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
        rows = torch.arange(len(seqs))
        temperatures = sampling.temperatures.cpu() * self.ratio  # greedy rows stay 0 (one-hot q)
        tokens, probs, top1 = [], [], []
        for k in range(gamma):
            # Causal attention: right padding never reaches the positions read here.
            logits = self.model(ids.to(self.device)).logits.float()[rows, lengths - 1 + k]  # [R, V]
            q = process_logits(logits.cpu(), temperatures, sampling.top_ks.cpu(), sampling.top_ps.cpu(),
                               sampling.min_ps.cpu())  # [R, V]
            x = torch.multinomial(q, 1, generator=generator).squeeze(1)  # [R]
            ids[rows, lengths + k] = x
            tokens.append(x)
            probs.append(q)
            top1.append(torch.softmax(logits.cpu(), -1).amax(-1))
        tokens_t, probs_t = torch.stack(tokens, 1), torch.stack(probs, 1)  # [R, gamma], [R, gamma, V]
        return DraftBlock(
            tokens=tokens_t.to(self.device), probs=probs_t.to(self.device),
            token_probs=probs_t.gather(2, tokens_t[..., None]).squeeze(2).to(self.device),
            confidence_logits=None, top1_probs=torch.stack(top1, 1).to(self.device),
        )


def _gamma(spec: dict, where: str) -> int:
    gamma = spec.get("gamma")
    if not isinstance(gamma, int) or isinstance(gamma, bool) or not 1 <= gamma <= 16:
        raise DrafterConfigError(where, f"{CONFIG_KEY}.gamma", f"must be an integer in [1, 16], got {gamma!r}")
    return gamma


def load_tempered(path: str, spec: dict, target: TargetSpec, device) -> TemperedTargetDrafter:
    from transformers import AutoModelForCausalLM

    where = str(Path(path) / "config.json")
    if spec.get("kind") != KIND:
        raise DrafterConfigError(where, f"{CONFIG_KEY}.kind", f"expected {KIND!r}, got {spec.get('kind')!r}")
    ratio, gamma = spec.get("temperature_ratio"), _gamma(spec, where)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or ratio <= 0:
        raise DrafterConfigError(where, f"{CONFIG_KEY}.temperature_ratio", f"must be a positive number, got {ratio!r}")
    target_path = spec.get("target_path")
    if not isinstance(target_path, str) or not (Path(target_path) / "config.json").is_file():
        raise DrafterConfigError(where, f"{CONFIG_KEY}.target_path", f"no target checkpoint at {target_path!r}")
    model = AutoModelForCausalLM.from_pretrained(target_path, torch_dtype=torch.float32).to(device).eval()
    if model.config.vocab_size != target.vocab_size:
        raise DrafterConfigError(where, f"{CONFIG_KEY}.target_path",
                                 f"vocabulary {model.config.vocab_size} != the served target's {target.vocab_size}")
    return TemperedTargetDrafter(model, target_path, float(ratio), gamma, target, device)


def describe_tempered(path: str, config: dict):
    """The loader's DrafterDescription of a tempered-target checkpoint (config.json only)."""
    from dspark_sglang.drafters.loader import DrafterDescription

    gamma = _gamma(config[CONFIG_KEY], str(Path(path) / "config.json"))
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    return DrafterDescription(
        path=path, format="tempered_target", family="tempered", source="test",
        architecture=(config.get("architectures") or ["?"])[0], gamma=gamma,
        num_layers=int(config["num_hidden_layers"]), hidden_size=hidden,
        num_kv_heads=int(config.get("num_key_value_heads", heads)), head_dim=hidden // heads,
        vocab_size=int(config["vocab_size"]), draft_vocab_size=int(config["vocab_size"]), target_layer_ids=(0,),
        num_target_layers=int(config["num_hidden_layers"]), block_size=None, mask_token_id=None,
        markov_head_type=None, has_confidence_head=False, borrows_from_target=(), num_parameters=0,
    )
