"""Checks of the local single-node SLURM cluster (``scripts/slurm_local.sh up``).

Skipped when ``sinfo`` is not on PATH or the cluster does not answer.  Every wait is a poll with a
deadline; nothing sleeps longer than the poll interval.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, TypeVar

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

T = TypeVar("T")

READY_STATES = {"idle", "mix"}
NODE = socket.gethostname().split(".")[0]
UP_HINT = "start it with: bash scripts/slurm_local.sh up"


def _run(*cmd: str, timeout: float = 30) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout).stdout.strip()


def _node_state() -> str:
    out = _run("sinfo", "-h", "-n", NODE, "-o", "%t", timeout=15)
    # strip sinfo's flag suffixes (idle* = not responding, idle~ = powered down, ...)
    return out.splitlines()[0].rstrip("*~#!%$@^-") if out else ""


def _wait(what: str, fn: Callable[[], T | None], timeout: float, interval: float = 0.5) -> T:
    """Poll ``fn`` until it returns a truthy value; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last value: {last!r})")
        time.sleep(interval)


def _sacct_state(job_id: str) -> str:
    """State of the job allocation as recorded by slurmdbd ('' while not recorded yet)."""
    try:
        out = _run("sacct", "-j", job_id, "-n", "-X", "-P", "-o", "State", timeout=15)
    except subprocess.CalledProcessError:
        return ""
    return out.splitlines()[0].strip() if out else ""


def _sacct_final(job_id: str, timeout: float = 90) -> str:
    pending = {"", "PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "SUSPENDED", "RESIZING"}
    return _wait(f"job {job_id} to finish in sacct", lambda: (s := _sacct_state(job_id)) not in pending and s, timeout)


def _sbatch(tmp_path: Path, wrap: str, name: str) -> str:
    out = _run(
        "sbatch", "--parsable", "-J", name, "-n", "1", "-c", "1", "-t", "5",
        "-o", str(tmp_path / f"{name}-%j.out"), "--wrap", wrap,
    )
    return out.split(";")[0]


def _local_controller_may_be_up() -> bool:
    """Fast check for the local cluster (sinfo needs ~10 s to give up on a dead controller)."""
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    try:
        local = "SlurmctldHost=localhost" in conf.read_text()
    except OSError:
        return True  # unknown layout: let sinfo decide
    if not local:
        return True
    try:
        with socket.create_connection(("127.0.0.1", 6817), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> str:
    """Skip the module unless a cluster answers; return the node state."""
    for tool in ("sinfo", "sbatch", "sacct", "scancel", "squeue"):
        if shutil.which(tool) is None:
            pytest.skip(f"'{tool}' is not on PATH: no SLURM installed here ({UP_HINT})")
    if not _local_controller_may_be_up():
        pytest.skip(f"SLURM cluster is not up (nothing listens on localhost:6817); {UP_HINT}")
    try:
        state = _node_state()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", None) or exc
        pytest.skip(f"SLURM cluster is not up (sinfo failed: {str(detail).strip()[:200]}); {UP_HINT}")
    if not state:
        pytest.skip(f"node {NODE} is not part of the SLURM cluster; {UP_HINT}")
    try:
        _run("sacct", "-n", "-X", "-S", "now-1minute", "-o", "JobID", timeout=15)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        pytest.skip(f"SLURM accounting (slurmdbd) does not answer; {UP_HINT}")
    return state


def test_node_is_idle_or_mixed() -> None:
    state = _wait(f"node {NODE} idle/mixed", lambda: (s := _node_state()) in READY_STATES and s, timeout=30)
    assert state in READY_STATES


def test_sbatch_wrap_completes_in_sacct(tmp_path: Path) -> None:
    job_id = _sbatch(tmp_path, "echo hello-from-slurm", "qdiff-t-wrap")
    assert _sacct_final(job_id) == "COMPLETED"
    out = tmp_path / f"qdiff-t-wrap-{job_id}.out"
    assert out.read_text().strip() == "hello-from-slurm"


def test_scancel_shows_cancelled_in_sacct(tmp_path: Path) -> None:
    job_id = _sbatch(tmp_path, "sleep 300", "qdiff-t-cancel")
    try:
        _wait(f"job {job_id} RUNNING", lambda: _run("squeue", "-h", "-j", job_id, "-o", "%T") == "RUNNING", 60)
    finally:
        _run("scancel", job_id)
    # sacct writes "CANCELLED by <uid>"
    assert _sacct_final(job_id).startswith("CANCELLED")


def _submitit_executor(tmp_path: Path):
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    assert executor.cluster == "slurm", f"submitit picked {executor.cluster!r}, not slurm"
    executor.update_parameters(timeout_min=5, cpus_per_task=1, name="qdiff-t-submitit")
    return executor


def _wait_done(job, timeout: float = 90) -> None:
    _wait(f"submitit job {job.job_id} to finish", lambda: job.done(), timeout)


def test_submitit_returns_value(tmp_path: Path) -> None:
    executor = _submitit_executor(tmp_path)

    def add(a: int, b: int) -> int:  # nested: cloudpickle ships it by value
        return a + b

    job = executor.submit(add, 2, 3)
    _wait_done(job)
    assert job.result() == 5
    assert _sacct_final(job.job_id) == "COMPLETED"


def test_submitit_raising_job_fails(tmp_path: Path) -> None:
    from submitit.core.utils import FailedJobError

    executor = _submitit_executor(tmp_path)

    def boom() -> None:
        raise RuntimeError("boom-from-slurm")

    job = executor.submit(boom)
    _wait_done(job)
    with pytest.raises(FailedJobError, match="boom-from-slurm"):
        job.result()


@pytest.mark.slow
def test_submitit_checkpointable_is_requeued_after_preemption(tmp_path: Path) -> None:
    """Preempt a running Checkpointable job: it is requeued and finishes (~12-15 s here)."""
    import submitit

    executor = _submitit_executor(tmp_path)
    # timeout_min > 10: with shorter limits submitit treats every USR2 as a time-out.
    executor.update_parameters(timeout_min=60)
    marker = tmp_path / "starts.txt"

    class SleepUntilRequeued(submitit.helpers.Checkpointable):  # nested: shipped by value
        def __call__(self, marker: str) -> int:
            restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
            with open(marker, "a") as f:
                f.write(f"{restarts}\n")
            if restarts == 0:
                time.sleep(600)  # killed by the preemption long before this ends
            return restarts

    job = executor.submit(SleepUntilRequeued(), str(marker))
    _wait(f"job {job.job_id} to start", lambda: marker.exists() and marker.read_text().strip() == "0", 60, 0.2)
    job._interrupt()  # preemption: SIGTERM then USR2 -> checkpoint + 'scontrol requeue'
    _wait_done(job, timeout=120)
    assert job.result() == 1
    assert marker.read_text().split() == ["0", "1"]
    assert _sacct_final(job.job_id) == "COMPLETED"
