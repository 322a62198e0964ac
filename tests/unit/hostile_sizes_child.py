"""Child process for test_fuzz_inputs: feed every parser headers that *claim* huge sizes, in a fresh
interpreter, and report how far the resident high-water mark grew (JSON on stdout).

A fresh process makes the measurement mean something: inside pytest, the high-water mark already
holds whatever earlier test files (an SGLang engine, a training step) once needed.

`--control-mb N` also allocates and touches N MB after the parsers ran: the negative control that
shows the measurement sees a real allocation.
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import sys
import tempfile
from pathlib import Path

import torch

from dspark_sglang.drafters.checkpoint import read_tensor_shapes, read_tensors
from dspark_sglang.drafters.errors import DrafterLoadError
from dspark_sglang.drafters.interface import TargetSpec
from dspark_sglang.drafters.loader import describe_drafter, load_drafter

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "drafters" / "deepspec_dspark_vanilla"
TARGET_WEIGHTS = FIXTURE.parent / "zlab_dflash" / "target_embeddings.safetensors"


def max_rss_mb() -> int:
    """This process's peak resident set. Linux's VmHWM belongs to the address space, which exec
    replaces; ru_maxrss would start at the parent's (pytest's) peak, inherited across fork."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def safetensors_claiming(header: dict, body: bytes = b"\0" * 16, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def hostile_checkpoints():
    """(name, config.json text, model.safetensors bytes) for each size-claiming input."""
    config = (FIXTURE / "config.json").read_text()
    weights = (FIXTURE / "model.safetensors").read_bytes()
    for shape in ([2**40, 2**40], [2**31, 2**31, 16], [2**62], [2**33]):
        yield f"shape {shape}", config, safetensors_claiming(
            {"fc.weight": {"dtype": "F32", "shape": shape, "data_offsets": [0, 16]}})
    yield "offsets 2**62", config, safetensors_claiming(
        {"fc.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 2**62]}})
    yield "header length 2**60", config, struct.pack("<Q", 2**60) + b"{}"
    for field, value in (("num_hidden_layers", 10**9), ("block_size", 10**9), ("hidden_size", 2**40),
                         ("head_dim", 2**40), ("vocab_size", 2**40)):
        mutated = json.loads(config)
        mutated[field] = value
        yield f"config {field}={value}", json.dumps(mutated), weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--control-mb", type=int, default=0)
    args = parser.parse_args()

    from safetensors.torch import load_file

    embeddings = load_file(str(TARGET_WEIGHTS))
    target = TargetSpec(64, 512, 8, embeddings["embed_tokens.weight"], embeddings["lm_head.weight"])
    before = max_rss_mb()
    refused, loaded = 0, []
    for name, config_text, weights in hostile_checkpoints():
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / "config.json").write_text(config_text)
            (root / "model.safetensors").write_bytes(weights)
            for call in (read_tensor_shapes, read_tensors, describe_drafter, load_drafter):
                try:
                    call(root, target) if call is load_drafter else call(root)
                    if call is load_drafter:
                        loaded.append(name)
                except DrafterLoadError:
                    refused += 1
    if args.control_mb:
        ballast = torch.ones(args.control_mb * 2**20 // 4)  # float32, every page touched
        del ballast
    json.dump({"grown_mb": max_rss_mb() - before, "before_mb": before, "refused": refused, "loaded": loaded},
              sys.stdout)


if __name__ == "__main__":

    main()
