"""What every entry point (pipeline, tune, report, export) does with a user's mistake.

A bad input is a one-line ``error: <what is wrong and what is allowed>`` on stderr and exit code 2;
the traceback appears only on request (``debug=true`` among the overrides, or ``QB_DEBUG=1``).
Anything else (a bug) keeps its full traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")
# Errors our checks raise for bad input (config values, paths, stores), OmegaConf's own for
# missing or mistyped config values, and Hydra's for overrides that do not compose (an unknown
# experiment or key) where an entry point composes the config itself (pipeline.tune).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    ConnectionError,
    OmegaConfBaseException,
    HydraException,
)
EXIT_USER_ERROR = 2


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """``debug=true`` among the overrides, or QB_DEBUG set to anything but 0/false/empty."""
    flag = os.environ.get("QB_DEBUG", "").strip().lower()
    return "debug=true" in argv or flag not in ("", "0", "false")


def one_line(error: BaseException) -> str:
    """The error's message folded onto one line."""
    return " ".join(str(error).split()) or type(error).__name__


def guard(fn: Callable[[], T], argv: Sequence[str] = ()) -> T:
    """Run ``fn``; a user error becomes one line on stderr and exit code 2 (re-raised in debug mode)."""
    try:
        return fn()
    except USER_ERRORS as error:
        if debug_requested(argv):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        print("(add debug=true or set QB_DEBUG=1 for the traceback)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
