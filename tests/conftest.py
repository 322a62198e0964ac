"""Test-wide settings. TRITON_INTERPRET must be set before any kernel module is imported:
`triton.jit` decides at decoration time whether to build an interpreted function."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

torch.set_num_threads(1)

# Property tests draw the same examples on every run ("repeatable": a fixed seed per test), so a red
# run means a code change, not an unlucky draw. `scripts/fuzz.sh` explores fresh random inputs
# ("explore") and prints a reproduction blob for anything it finds; turn those into plain tests.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None, print_blob=True)
settings.load_profile(os.environ.get("DSPARK_HYPOTHESIS_PROFILE", "repeatable"))
