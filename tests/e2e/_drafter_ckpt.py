"""Build a DeepSpec-format DSpark checkpoint for a transformers target folder (tests only).

The weights are random except for two engineered parts that make the drafter *sometimes right*,
so the worker's accept-and-commit path (several tokens per round) runs in end-to-end tests and
not only its reject path:

- `lm_head` is zero, so the base logits carry no signal;
- the vanilla Markov head scores v by `scale * cos(E_v, E_prev)` on a random r-dimensional
  projection of the target's embeddings E, whose maximum is v == prev: every draft repeats the
  anchor. Greedy targets that loop on one token ("1 1 1 1 ...") then accept whole blocks.

Losslessness does not depend on any of this: parity must hold for any drafter.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dspark_sglang.drafters.config import parse_block_config
from dspark_sglang.drafters.dspark import DSparkDrafter


def _target_embeddings(target_dir: Path) -> torch.Tensor:
    tensors = load_file(str(target_dir / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "embed_tokens.weight"):
        if name in tensors:
            return tensors[name].float()
    raise KeyError(f"{target_dir}: no embed_tokens weight")


def build_dspark_checkpoint(
    target_dir: str | Path,
    out_dir: str | Path,
    *,
    block_size: int = 4,
    num_layers: int = 1,
    markov_rank: int = 64,
    repeat_scale: float = 40.0,
    seed: int = 0,
) -> Path:
    """Write config.json + model.safetensors for a DSpark drafter of the target in `target_dir`."""
    target_dir, out_dir = Path(target_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = json.loads((target_dir / "config.json").read_text())
    num_target_layers = target["num_hidden_layers"]
    hidden, vocab = target["hidden_size"], target["vocab_size"]
    heads, kv_heads = target["num_attention_heads"], target["num_key_value_heads"]
    # DeepSpec/z-lab layer choice: 5 layers evenly from 1 to L-3.
    span = num_target_layers - 4
    layer_ids = [int(round(1 + i * span / 4)) for i in range(5)]
    config = {
        "architectures": ["Qwen3DSparkModel"],
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "layer_types": ["full_attention"] * num_layers,
        "block_size": block_size,
        "mask_token_id": 0,
        "target_layer_ids": layer_ids,
        "num_target_layers": num_target_layers,
        "markov_rank": markov_rank,
        "markov_head_type": "vanilla",
        "enable_confidence_head": True,
        "confidence_head_with_markov": True,
        "tie_word_embeddings": False,
        "dtype": "float32",
    }
    torch.manual_seed(seed)
    drafter = DSparkDrafter(parse_block_config(config, "deepspec_dspark", str(out_dir)))
    with torch.no_grad():
        for p in drafter.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
        embed = _target_embeddings(target_dir)  # [V, H]
        drafter.embed_tokens.weight.copy_(embed)
        drafter.lm_head.weight.zero_()
        proj = torch.randn(hidden, markov_rank) / hidden**0.5  # [H, r]
        rows = torch.nn.functional.normalize(embed @ proj, dim=-1)  # [V, r]
        drafter.markov_head.markov_w1.weight.copy_(rows)
        drafter.markov_head.markov_w2.weight.copy_(rows * repeat_scale)
    tensors = {}
    for prefix, module in drafter.weight_parts().items():
        for name, value in module.state_dict().items():
            tensors[prefix + name] = value.detach().contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
