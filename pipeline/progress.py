"""Progress bars for the long loops (tqdm, to stderr).

Shown whether or not stderr is a terminal (tqdm's default, ``disable=False``): a run whose stderr goes
to a file still tells how far it got. ``disable=None`` would hide them off a TTY; we do not.
Bars redraw at most once a second, so a log file gets one line a second, not ten.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm


def progress(iterable: Iterable | None = None, desc: str = "", unit: str = "it", total: int | None = None) -> tqdm:
    """A bar over ``iterable`` (or a manual one of ``total``), labelled with what it counts."""
    return tqdm(iterable, desc=desc, unit=unit, total=total, file=sys.stderr, mininterval=1.0)
