"""Run in a fresh interpreter by test_plugin.py: SGLang's plugin and hook registries are
process-global, so each scenario gets its own process."""

import json
import logging
import sys

logging.basicConfig(level=logging.INFO)  # the takeover decision is logged at INFO

mode = sys.argv[1]

import dspark_sglang.sglang.plugin as plugin  # noqa: E402
import dspark_sglang.sglang.signatures as signatures  # noqa: E402

if mode == "mismatch":
    signatures.check_sglang = lambda *a, **k: ["simulated: sglang 0.6.0 is installed"]

from sglang.srt.plugins import load_plugins  # noqa: E402

load_plugins()  # the real entry-point path (group sglang.srt.plugins)
plugin.register()  # idempotent

from sglang.srt.arg_groups.overrides import resolving_view  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm  # noqa: E402

out = {"refusal": plugin.refusal_reasons()}
try:
    SpeculativeAlgorithm.from_string(plugin.ALGORITHM_NAME)
    out["registered"] = True
except ValueError:
    out["registered"] = False
# Request validation (request_params.py): SGLang's own SamplingParams.verify, as the tokenizer manager calls it.
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

checks = {}
for name, custom in (("good", {"dspark": {"max_verify_len": 2}}), ("bad", {"dspark": {"max_verify_len": -1}})):
    try:
        SamplingParams(custom_params=custom).verify(1000)
        checks[name] = "ok"
    except ValueError as exc:
        checks[name] = str(exc)
out["custom_params"] = checks
draft = {"speculative_draft_model_path": sys.argv[3]} if len(sys.argv) > 3 and sys.argv[3] else {}
device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
model = sys.argv[5] if len(sys.argv) > 5 else "dummy"
args = ServerArgs(model_path=model, speculative_algorithm=sys.argv[2], device=device, **draft)
try:
    args.resolve_once()
    out["resolved"] = resolving_view(args).speculative_algorithm
    out["disable_cuda_graph"] = bool(resolving_view(args).disable_cuda_graph)
except Exception as exc:  # reported to the test, which asserts on it
    out["error"] = f"{type(exc).__name__}: {exc}"
print("PROBE " + json.dumps(out))
