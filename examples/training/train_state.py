"""Resumable training state: trainable weights, AdamW moments, step, random streams, data order.

Long training runs span several sessions on a CPU, so `train_drafter.py --save-every N` writes
`<out>/train_state/` and `--resume` continues bit for bit where it stopped (same arguments, same
thread count). Safetensors and JSON only (no pickle):
- `weights.safetensors`: every trainable parameter by name, float32;
- `optimizer.safetensors`: `<name>.exp_avg`, `<name>.exp_avg_sq`, `<name>.step` per parameter;
- `generators.safetensors`: the torch generators' states (uint8);
- `state.json`: step, Python RNG state, the unconsumed shuffled sequence pool, history, EMA, curve.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _trainable(module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def save(folder: Path, module, opt: torch.optim.Optimizer, generators: dict[str, torch.Generator | None],
         rng: random.Random, extra: dict) -> None:
    """Write the state atomically (a tmp folder renamed over the old one)."""
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    params = _trainable(module)
    save_file({n: p.detach().float().contiguous() for n, p in params.items()}, str(tmp / "weights.safetensors"))
    moments = {}
    for name, p in params.items():
        st = opt.state.get(p)
        if st:
            moments[f"{name}.exp_avg"] = st["exp_avg"].contiguous()
            moments[f"{name}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            moments[f"{name}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    save_file(moments, str(tmp / "optimizer.safetensors"))
    save_file({k: g.get_state() for k, g in generators.items() if g is not None}, str(tmp / "generators.safetensors"))
    state = dict(extra, python_rng=_rng_to_json(rng.getstate()))
    (tmp / "state.json").write_text(json.dumps(state))
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        os.replace(folder, old)
        os.replace(tmp, folder)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.replace(tmp, folder)


def load(folder: Path, module, opt: torch.optim.Optimizer, generators: dict[str, torch.Generator | None],
         rng: random.Random) -> dict:
    """Restore weights, moments, generators and the Python RNG; return the rest of state.json."""
    params = _trainable(module)
    weights = load_file(str(folder / "weights.safetensors"))
    missing = sorted(set(params) - set(weights))
    if missing:
        raise SystemExit(f"{folder}: the saved state lacks {missing[:3]}...: resume with the same model arguments")
    with torch.no_grad():
        for name, p in params.items():
            if weights[name].shape != p.shape:
                raise SystemExit(f"{folder}: {name} is {tuple(weights[name].shape)}, the model has {tuple(p.shape)}")
            p.copy_(weights[name])
    moments = load_file(str(folder / "optimizer.safetensors"))
    for name, p in params.items():
        if f"{name}.exp_avg" in moments:
            opt.state[p] = {"step": moments[f"{name}.step"].reshape(()).clone(),
                            "exp_avg": moments[f"{name}.exp_avg"].clone(),
                            "exp_avg_sq": moments[f"{name}.exp_avg_sq"].clone()}
    saved = load_file(str(folder / "generators.safetensors"))
    for key, gen in generators.items():
        if gen is not None and key in saved:
            gen.set_state(saved[key])
    state = json.loads((folder / "state.json").read_text())
    rng.setstate(_rng_from_json(state.pop("python_rng")))
    return state


def _rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(data) -> tuple:
    version, internal, gauss = data
    return version, tuple(internal), gauss
