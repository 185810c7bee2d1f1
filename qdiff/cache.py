"""Content-keyed work on disk: calibration sets, FP reference samples and reconstruction folders.

One helper for all three: a key hashed from everything that determines the content, an inter-process
lock while an entry is built (the jobs of a parallel sweep share ``paths.cache_dir`` and often need the
same entry: the first builds it while the others wait, then reuse it), atomic writes (a killed job never
leaves half a file), and folders that record the settings they were made with, so that reusing one made
with other settings is refused instead of silently mixing two runs.

``flock`` locks are released by the kernel when a process dies (preemption, scancel, OOM), so a killed
job never leaves a stale lock. On NFS, Linux maps ``flock`` to POSIX locks; Lustre needs the ``flock``
mount option.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from qdiff.errors import ConfigError
from qdiff.io import write_json

log = logging.getLogger("qdiff")

IDENT_FILE = "ident.json"


def content_key(ident: dict) -> str:
    """16 hex digits of the SHA-256 of ``ident`` as canonical JSON."""
    return hashlib.sha256(_canonical(ident).encode()).hexdigest()[:16]


def _canonical(ident: dict) -> str:
    return json.dumps(ident, sort_keys=True, default=str)


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


class Entry:
    """One cache entry ``<root>/<kind>/<key><suffix>`` for the settings ``ident``, with its lock file."""

    def __init__(self, root: str | os.PathLike, kind: str, ident: dict, suffix: str = "") -> None:
        self.ident = ident
        self.key = content_key(ident)
        self.path = Path(root) / kind / f"{self.key}{suffix}"

    @contextmanager
    def locked(self, what: str) -> Iterator["Entry"]:
        with cache_lock(self.path.parent / f"{self.key}.lock", what):
            yield self


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """``safetensors`` file written atomically (temp file + rename; a failed write leaves no temp file)."""
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, p)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        code = re.search(r"os error (\d+)", str(e))  # safetensors reports I/O errors as its own type
        if code and not isinstance(e, OSError):
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(p)) from None
        raise


@contextmanager
def publish_folder(path: str | os.PathLike, overwrite: bool, what: str) -> Iterator[Path]:
    """A fresh folder beside ``path`` to write into; renamed to ``path`` when the ``with`` body succeeds.

    A failure or a kill inside the body leaves ``path`` as it was (at worst a hidden ``.<name>.tmp-<pid>`` folder
    beside it). With ``overwrite`` an existing ``path`` is moved aside first and removed only after the new
    folder is in place, so there is never a moment with half an artifact at ``path``.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    recover_publish_leftovers(p)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    old = p.with_name(f".{p.name}.old-{os.getpid()}")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if p.exists():
            if not overwrite and any(p.iterdir()):
                raise ConfigError(f"{what}: {p} was filled by someone else while this was written; nothing replaced")
            os.replace(p, old) if any(p.iterdir()) else p.rmdir()
        os.replace(tmp, p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not p.exists():
            os.replace(old, p)  # put the earlier output back
        raise
    shutil.rmtree(old, ignore_errors=True)


def claim_folder(path: str | os.PathLike, ident: dict, what: str, fresh: bool = False) -> Path:
    """Make ``path`` the work folder of ``ident``; returns it.

    A folder that records other settings is refused with one line naming what differs, unless ``fresh``
    (then it is emptied). A folder without a record is only taken when empty (or ``fresh``): its content
    cannot be told apart from another run's.
    """
    p = Path(path)
    f = p / IDENT_FILE
    if p.exists() and not fresh:
        if f.is_file():
            old = json.loads(f.read_text())
            if _canonical(old) != _canonical(ident):
                raise ConfigError(f"{what} folder {p} was made with other settings ({_differences(old, ident)}); "
                                  "use another folder or start it fresh (recon.resume=false)")
        elif any(p.iterdir()):
            raise ConfigError(f"{what} folder {p} holds files but no record of the settings that made them; "
                              "use an empty folder or start it fresh (recon.resume=false)")
    if fresh and p.exists():
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    if not f.is_file():
        write_json(f, ident)
    return p


def _differences(old: dict, new: dict, prefix: str = "", limit: int = 4) -> str:
    """``a.b: old -> new`` for the first few differing leaves."""
    out: list[str] = []

    def walk(a, b, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
        elif _canonical({"v": a}) != _canonical({"v": b}):
            out.append(f"{key}: {_short(a)} -> {_short(b)}")

    walk(old, new, prefix)
    more = f" and {len(out) - limit} more" if len(out) > limit else ""
    return "; ".join(out[:limit]) + more


def _short(v: object, n: int = 40) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def recover_publish_leftovers(p: str | os.PathLike) -> None:
    """What a killed :func:`publish_folder` left beside ``p``: its half-written folder is removed; an earlier
    output it had moved aside is put back when nothing replaced it (the kill fell between the two renames)."""
    p = Path(p)
    if not p.parent.is_dir():
        return
    for leftover in sorted(p.parent.glob(f".{p.name}.*-*")):
        stage, _, pid = leftover.name.rpartition("-")
        if not pid.isdigit() or _alive(int(pid)) or not stage.endswith((".tmp", ".old")):
            continue
        if stage.endswith(".old") and not p.exists():
            os.replace(leftover, p)
            log.warning("restored %s from %s (left by a process killed while replacing it)", p, leftover.name)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
