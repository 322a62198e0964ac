"""Every kernel variant compiles for sm_90 (PTX and cubin via the wheel's ptxas, no GPU needed).

The interpreter runs code the compiler rejects (Python ints as loop-carried values, non-constexpr
globals, branch type mismatches), so this runs the real pipeline in a subprocess with
TRITON_INTERPRET=0 (conftest.py sets it to 1 for this process). Small tiles keep it fast; the code
paths are the same as at the launchers' GPU tile sizes.
"""

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.interp
SCRIPT = pathlib.Path(__file__).with_name("_compile_kernels.py")


def test_all_kernels_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, str(SCRIPT), "90"], env=env, capture_output=True, text=True,
                          timeout=600, cwd=SCRIPT.parents[2])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    compiled = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert len(compiled) == 12, proc.stdout
