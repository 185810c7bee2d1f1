"""A run directory's ``status.json``: one schema for the job that writes it and the report that reads it.

The job (:mod:`qdiff.cli`) records its state and which scheduler job it is, so that the report
(:mod:`qdiff.report`) can later tell running, requeued and dead jobs apart with ``sacct``. The job's own
states are ``running``, ``completed``, ``failed`` and ``interrupted``; the report derives the rest of
:data:`STATES` from this file, ``sacct`` and process liveness (:func:`qdiff.report.scheduler.settle`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from qdiff.errors import ConfigError

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"

# States a job writes into status.json.
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
INTERRUPTED = "interrupted"  # stopped by a signal (preemption, scancel, Ctrl-C); the scheduler may requeue it
# States only the report derives (a requeued SLURM job waiting to start again is reported as pending).
PENDING = "pending"
CANCELLED = "cancelled"
TIMEOUT = "timeout"
INCOMPLETE = "incomplete"  # no metrics, the process is gone, and no scheduler knows more
MISSING = "missing"  # an expected job that has no directory and no SLURM record
# Report states, best first (the HTML page colours them; --strict fails on anything but completed).
STATES = [COMPLETED, RUNNING, PENDING, FAILED, CANCELLED, TIMEOUT, INCOMPLETE, MISSING]


@dataclass
class RunStatus:
    """The contents of ``status.json``; every field may be absent (None) in a file written by an older qdiff."""

    state: str | None = None
    """One of RUNNING, COMPLETED, FAILED, INTERRUPTED: what the job last said of itself."""
    job_id: str | None = None
    """Scheduler job identity kept across requeues (``slurm:<id>`` or ``local:<host>:<id>``), see :func:`job_identity`."""
    slurm_job_id: str | None = None
    """``SLURM_JOB_ID`` of the attempt (for array tasks: the task's own job id)."""
    slurm_array: str | None = None
    """``SLURM_ARRAY_JOB_ID``: the array this task belongs to, None outside arrays."""
    slurm_array_task: str | None = None
    """``SLURM_ARRAY_TASK_ID``: the task's index in its array."""
    restarts: int | None = None
    """How often the scheduler restarted the job (``SLURM_RESTART_COUNT``, else attempts - 1)."""
    attempt: int | None = None
    """Attempts started in this directory, counting this one."""
    host: str | None = None
    """Host name of the process that last wrote the file (liveness is checked only there)."""
    pid: int | None = None
    """Process id of the job on ``host``."""
    started: str | None = None
    """Local time the first attempt started (``%Y-%m-%dT%H:%M:%S``)."""
    attempt_started: str | None = None
    """Local time the latest attempt started."""
    updated: str | None = None
    """Local time of this write."""
    error: str | None = None
    """Why the job failed or stopped (FAILED, INTERRUPTED); absent otherwise."""
    traceback: str | None = None
    """Python traceback of an unexpected failure (not of user errors or signals); absent otherwise."""

    @classmethod
    def from_dict(cls, data: dict) -> RunStatus:
        """Known fields of a parsed file; unknown keys (a newer writer) are ignored rather than fatal."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict:
        """The file's JSON object; ``error``/``traceback`` only when set, as readers test for their presence."""
        out = dataclasses.asdict(self)
        return {k: v for k, v in out.items() if v is not None or k not in ("error", "traceback")}

    @property
    def slurm_id(self) -> str | None:
        """The id ``sacct`` knows the job by: ``<array>_<task>`` for array tasks, else the job id."""
        if self.slurm_array and self.slurm_array_task is not None:
            return f"{self.slurm_array}_{self.slurm_array_task}"
        return self.slurm_job_id

    @property
    def error_line(self) -> str:
        """The error's first line (at most 240 characters), for one-line tables."""
        lines = str(self.error or "").strip().splitlines()
        return lines[0][:240] if lines else ""


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_status(out_dir: Path) -> RunStatus | None:
    """The run's status, or None when it has no (readable) ``status.json``."""
    data = _read_json(Path(out_dir) / STATUS_FILE)
    return None if data is None else RunStatus.from_dict(data)


def read_metrics(out_dir: Path) -> dict | None:
    """The run's ``metrics.json``, or None when it has none (or an unreadable one)."""
    return _read_json(Path(out_dir) / METRICS_FILE)


def job_identity() -> str | None:
    """The scheduler job this process belongs to (kept by SLURM and submitit across requeues), else None."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}"
    if os.environ.get("SUBMITIT_LOCAL_JOB_ID"):
        return f"local:{socket.gethostname()}:{os.environ['SUBMITIT_LOCAL_JOB_ID']}"
    return None


def is_requeued() -> bool:
    """True in a job that SLURM or submitit's local executor started again (preemption, time-out)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0 or os.environ.get("SUBMITIT_EXECUTOR") == "local"


def write_status(out_dir: Path, state: str, **extra: str) -> None:
    """Write ``status.json`` for this process; ``extra``: ``error``/``traceback``. Keeps the first start time."""
    from qdiff.io import write_json  # lazily: it imports torch, which the report does not need

    prev = read_status(out_dir) or RunStatus()
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    attempt = int(prev.attempt or 0) + (state == RUNNING)
    slurm_restarts = os.environ.get("SLURM_RESTART_COUNT")
    status = RunStatus(
        state=state, job_id=job_identity(), slurm_job_id=os.environ.get("SLURM_JOB_ID"),
        slurm_array=os.environ.get("SLURM_ARRAY_JOB_ID"), slurm_array_task=os.environ.get("SLURM_ARRAY_TASK_ID"),
        restarts=int(slurm_restarts) if slurm_restarts else max(0, attempt - 1), attempt=attempt,
        host=socket.gethostname(), pid=os.getpid(), started=prev.started or now,
        attempt_started=now if state == RUNNING else (prev.attempt_started or now), updated=now, **extra)
    write_json(Path(out_dir) / STATUS_FILE, status.to_dict())


def refuse_finished(out_dir: Path, requeued_ok: bool = True) -> dict | None:
    """None when ``out_dir`` holds no finished run; the run's metrics when this very (requeued) job finished it.

    A job preempted after writing ``metrics.json`` (e.g. while W&B was closing) is started again by
    SLURM/submitit; it must return the result, not fail (unless ``requeued_ok`` is false: the caller would run
    again). Anyone else running into a finished directory (a user re-running, another job) gets
    :class:`~qdiff.errors.ConfigError` (a ``QDiffError``): nothing is overwritten.
    """
    out_dir = Path(out_dir)
    if not (out_dir / METRICS_FILE).exists():
        return None
    ident = job_identity()
    if requeued_ok and ident is not None and is_requeued():
        prev = read_status(out_dir)
        done = read_metrics(out_dir) if prev is not None and prev.job_id == ident else None
        if done is not None:
            return done
    raise ConfigError(f"{out_dir} already holds a finished run; refusing to overwrite it")
