"""What the schedulers know of a job, and the one place that settles a job's final state.

``status.json`` cannot tell the whole story: a job killed by ``scancel`` or a node failure never writes again,
and a requeued job looks stopped between attempts. :func:`settle` combines the file with ``sacct`` (SLURM
jobs) or the process's liveness (local jobs).
"""
from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess
from pathlib import Path

from qdiff.runstatus import (CANCELLED, COMPLETED, FAILED, INCOMPLETE, INTERRUPTED, MISSING, PENDING, RUNNING, TIMEOUT,
                             RunStatus)

log = logging.getLogger("qdiff")

# sacct state -> report state (for jobs whose status.json still says running/interrupted, or that have no dir yet)
SACCT_STATES = {
    "PENDING": PENDING, "REQUEUED": PENDING, "REQUEUE_HOLD": PENDING, "REQUEUE_FED": PENDING,
    "RUNNING": RUNNING, "COMPLETING": RUNNING, "CONFIGURING": RUNNING, "SUSPENDED": RUNNING,
    "RESIZING": RUNNING, "STAGE_OUT": RUNNING, "SIGNALING": RUNNING,
    "CANCELLED": CANCELLED, "TIMEOUT": TIMEOUT, "DEADLINE": TIMEOUT,
    "FAILED": FAILED, "NODE_FAIL": FAILED, "OUT_OF_MEMORY": FAILED, "BOOT_FAIL": FAILED,
    "PREEMPTED": CANCELLED, "REVOKED": CANCELLED, "COMPLETED": INCOMPLETE,
}
# A job without a directory is only what SLURM says of it, if that is one of these; else missing.
_UNSTARTED_STATES = (PENDING, RUNNING, CANCELLED)


def sacct_states(ids: list[str]) -> dict[str, str] | None:
    """``{job id: sacct State}`` of the latest record of each job; None when sacct is not available."""
    if not ids:
        return {}
    if shutil.which("sacct") is None:
        return None
    # the array's own id too: tasks still pending show only as '<array>_[2-7%2]' under it
    query = sorted(set(ids) | {i.split("_")[0] for i in ids if "_" in i})
    try:
        out = subprocess.run(["sacct", "-j", ",".join(query), "-n", "-X", "-P", "-o", "JobID,State"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("sacct failed (%s); unfinished SLURM jobs are reported as incomplete", str(e).strip()[:200])
        return None
    states: dict[str, str] = {}
    for line in out.splitlines():
        if "|" not in line:
            continue
        jid, state = line.split("|", 1)
        for j in expand_array_id(jid.strip()):
            states[j] = state.strip()
    return states


def expand_array_id(jid: str) -> list[str]:
    """``'12_[0-2,5%4]'`` (pending array tasks) -> ``['12_0', '12_1', '12_2', '12_5']``."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", jid)
    if not m:
        return [jid]
    out = []
    for part in m.group(2).split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def submitit_array_ids(sweep_dir: Path) -> dict[int, str]:
    """Array task index -> SLURM id ('<array>_<task>') from submitit's folders (latest array wins)."""
    sub = sweep_dir / ".submitit"
    out: dict[int, tuple[int, str]] = {}
    if not sub.is_dir():
        return {}
    for p in sub.iterdir():
        m = re.fullmatch(r"(\d+)(?:_(\d+))?", p.name)
        if m and (m.group(2) is not None or not any(sub.glob(f"{p.name}_*"))):
            # '<array>_<task>', or a plain '<id>' when the sweep had a single job (no array)
            a, t = int(m.group(1)), int(m.group(2) or 0)
            if t not in out or a > out[t][0]:
                out[t] = (a, p.name)
    return {t: v[1] for t, v in out.items()}


def pid_alive(status: RunStatus) -> bool:
    """A local (non-SLURM) job still running on this machine."""
    if status.host != socket.gethostname() or not status.pid:
        return False
    try:
        st = Path(f"/proc/{int(status.pid)}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError, ValueError):
        return False
    return st not in ("Z", "X")


def needs_sacct(has_metrics: bool, status: RunStatus, slurm_id: str | None) -> bool:
    """Whether :func:`settle` would ask ``sacct`` about this job (so that one query covers them all)."""
    return bool(slurm_id) and not has_metrics and status.state != FAILED


def settle(has_metrics: bool, status: RunStatus, slurm_id: str | None, sacct: dict[str, str] | None,
           has_dir: bool = True) -> tuple[str, str]:
    """A job's final state and a one-line detail, from its files, ``sacct`` and its process.

    ``status``: empty (all None) when the job wrote no ``status.json``. ``has_dir=False``: an expected job
    without a directory (never started, or still waiting in SLURM's queue).
    """
    found = (sacct or {}).get(slurm_id or "", "")
    word = found.split()[0] if found else ""
    if not has_dir:
        state = SACCT_STATES.get(word, "")
        state = state if state in _UNSTARTED_STATES else MISSING
        if not found:
            return state, "never started (no job directory)"
        return state, f"{'not started yet' if state == PENDING else 'never started'}; sacct: {found}"
    if has_metrics:
        return COMPLETED, ""
    st, error = status.state, status.error_line
    if st == FAILED:
        return FAILED, error or FAILED
    if slurm_id:
        if sacct is None:
            return INCOMPLETE, f"SLURM job {slurm_id}: sacct not available"
        state = SACCT_STATES.get(word, INCOMPLETE)
        detail = f"sacct: {found}" if found else f"SLURM job {slurm_id} unknown to sacct"
        if st == INTERRUPTED and state == INCOMPLETE:
            detail += f"; last attempt stopped ({error})"
        return state, detail
    if st == RUNNING and pid_alive(status):
        return RUNNING, f"pid {status.pid} alive"
    detail = f"status '{st}' but the process is gone" if st else "no status.json (stopped before the run started)"
    return INCOMPLETE, detail + (f": {error}" if error else "")
