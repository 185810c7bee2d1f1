"""Inter-process locks for shared caches: the jobs of a parallel sweep (SLURM array, submitit local) share
``paths.cache_dir`` and often need the same entry (every job of a grid uses the same calibration set).

The first job builds the entry while the others wait, then find it complete. ``flock`` locks are released
by the kernel when a process dies (preemption, scancel, OOM), so a killed job never leaves a stale lock.
On NFS, Linux maps ``flock`` to POSIX locks; Lustre needs the ``flock`` mount option.
"""
from __future__ import annotations

import fcntl
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("qdiff")


@contextmanager
def cache_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed); log when another process holds it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another job that is building the same %s (%s)", what, p)
            t0 = time.perf_counter()
            fcntl.flock(f, fcntl.LOCK_EX)
            log.info("%s lock acquired after %.1f s", what, time.perf_counter() - t0)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
