"""Shared CLI plumbing: bad input files end the tool with one clear line and exit status 2."""

from __future__ import annotations

import sys
from typing import Callable

from dspark_sglang.confidence import CalibrationDataError, CalibrationFileError
from dspark_sglang.cost_table import CostTableError

EXIT_BAD_INPUT = 2
# Errors that name their file and field; shown without a traceback.
INPUT_ERRORS = (CostTableError, CalibrationFileError, CalibrationDataError)


class UsageError(ValueError):
    """A problem with the command line or its inputs that the message fully explains."""


def run(prog: str, main: Callable[[list[str] | None], int], argv=None) -> int:
    """Call ``main(argv)``; turn input errors into ``prog: error: <message>`` and status 2."""
    try:
        return main(argv)
    except (*INPUT_ERRORS, UsageError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def matplotlib_pyplot():
    """pyplot on the non-interactive Agg backend (tools write PNG files, never open windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
