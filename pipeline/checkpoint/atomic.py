"""Write a folder all at once: into a temporary sibling, renamed into place at the end.

A failure (or a kill) leaves no half-written folder under the target name; the temporary one is
removed on any exception.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class NotEnoughDisk(ValueError):
    """The target's file system has less free space than the write needs."""


def check_target(target: Path) -> None:
    """A target folder must not exist, or be empty."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not an empty folder; choose another output or remove it")


def check_free_space(target: Path, needed_bytes: int) -> None:
    folder = target.parent if not target.exists() else target
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise NotEnoughDisk(
            f"not enough disk for {target}: it needs about {needed_bytes / 2**20:.0f} MiB, "
            f"{folder} has {free / 2**20:.0f} MiB free"
        )


@contextmanager
def atomic_dir(target: Path, needed_bytes: int = 0) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target``."""
    target = Path(target)
    check_target(target)
    check_free_space(target, needed_bytes)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        if target.exists():
            target.rmdir()  # empty (checked above): rename cannot replace a folder
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
