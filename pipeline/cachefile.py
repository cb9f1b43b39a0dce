"""Cache entries written safely by any number of processes, also on a shared file system.

Readers never see a partial entry: it is written under a unique temporary name in the same folder
and moved into place with ``os.replace`` (atomic on POSIX file systems, NFS included). Writers
compute an entry once: the first takes a lock file beside the entry (``filelock``'s ``FileLock``,
``flock(2)``, which Linux's NFS client maps to NFS byte-range locks), the others wait on it and read
what it wrote. Correctness does not rest on the lock: where a file system ignores it, two writers
compute the same entry and the last rename wins, whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

T = TypeVar("T")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the lock of the cache entry ``path``; say so when another process holds it first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process writing %s", path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a unique temporary file beside ``path``, then rename it into place."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before it is visible under its name
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is shared
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A unique temporary folder beside ``path`` to fill; renamed to ``path`` on success, removed on failure."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        os.replace(tmp, path)  # fails if path exists and is not empty: never half-merged
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def compute_once(
    path: Path, compute: Callable[[], T], write: Callable[[T, Path], None], read: Callable[[Path], T]
) -> T:
    """The cache entry at ``path``: read if present, else computed by one process and written atomically."""
    if path.exists():
        return read(path)
    with locked(path):
        if path.exists():  # another process wrote it while this one waited
            return read(path)
        result = compute()
        atomic_write(path, lambda tmp: write(result, tmp))
        return result
