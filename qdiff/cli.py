"""The Hydra entry point's body: tracker lifecycle, run status file, one-line errors."""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qdiff.errors import QDiffError
from qdiff.io import write_json

log = logging.getLogger("qdiff")


def _job_identity() -> str | None:
    """The scheduler job this process belongs to (kept by SLURM and submitit across requeues), else None."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}"
    if os.environ.get("SUBMITIT_LOCAL_JOB_ID"):
        return f"local:{socket.gethostname()}:{os.environ['SUBMITIT_LOCAL_JOB_ID']}"
    return None


def _is_requeued() -> bool:
    """True in a job that SLURM or submitit's local executor started again (preemption, time-out)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0 or os.environ.get("SUBMITIT_EXECUTOR") == "local"


def _read_status(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _status(out_dir: Path, state: str, **extra) -> None:
    """Write ``status.json``; the report reads it (with ``sacct``) to tell running, requeued and dead jobs apart."""
    prev = _read_status(out_dir)
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    attempt = int(prev.get("attempt") or 0) + (state == "running")
    slurm_restarts = os.environ.get("SLURM_RESTART_COUNT")
    info = {"state": state, "job_id": _job_identity(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_array": os.environ.get("SLURM_ARRAY_JOB_ID"), "slurm_array_task": os.environ.get("SLURM_ARRAY_TASK_ID"),
            "restarts": int(slurm_restarts) if slurm_restarts else max(0, attempt - 1), "attempt": attempt,
            "host": socket.gethostname(), "pid": os.getpid(), "started": prev.get("started") or now,
            "attempt_started": now if state == "running" else prev.get("attempt_started", now), "updated": now, **extra}
    write_json(out_dir / "status.json", info)


def _finished_by_this_job(out_dir: Path) -> dict | None:
    """Metrics of a run that this very (requeued) scheduler job already finished, else None.

    A job preempted after writing ``metrics.json`` (e.g. while W&B was closing) is started again by
    SLURM/submitit; it must return the result, not fail. A user re-running into a finished directory is
    still refused: only the same scheduler job, restarted, matches.
    """
    ident = _job_identity()
    if ident is None or not _is_requeued() or _read_status(out_dir).get("job_id") != ident:
        return None
    try:
        return json.loads((out_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def main(cfg: DictConfig, raise_errors: bool = False) -> float | None:
    """Run one job; returns the metric a sweeper optimises (``cfg.optimized_metric``).

    User errors exit with status 2 and one line, unless in a multirun or ``raise_errors`` (submitit jobs),
    where they are raised so that the launcher records the job as failed.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from hydra.utils import instantiate

    from qdiff.pipeline import run

    multirun = raise_errors or (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN)
    out_dir = Path(cfg.paths.output_dir)
    key = cfg.get("optimized_metric")
    if (out_dir / "metrics.json").exists():
        done = _finished_by_this_job(out_dir)
        if done is not None:
            log.info("%s: this job finished the run before it was requeued; returning its metrics", out_dir)
            _status(out_dir, "completed")
            return done.get(key) if key else None
        return _fail(QDiffError(f"{out_dir} already holds a finished run; refusing to overwrite it"), multirun)
    tracker = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _status(out_dir, "running")
        tracker = instantiate(cfg.logger) if cfg.get("logger") else None
        if tracker is not None:
            tracker.start(OmegaConf.to_container(cfg, resolve=True), out_dir, **run_context(cfg))
        metrics, _ = run(cfg, tracker)
    except QDiffError as e:
        if out_dir.is_dir():
            _status(out_dir, "failed", error=str(e))
        if tracker is not None:
            tracker.finish(exit_code=2)
        return _fail(e, multirun)
    except BaseException as e:
        # SystemExit / KeyboardInterrupt: preempted or stopped (submitit exits after requeueing the job);
        # the report asks the scheduler whether it lives on.
        stopped = isinstance(e, (SystemExit, KeyboardInterrupt))
        if out_dir.is_dir():
            _status(out_dir, "interrupted" if stopped else "failed", error=f"{type(e).__name__}: {e}",
                    **({} if stopped else {"traceback": traceback.format_exc()}))
        if tracker is not None:
            tracker.finish(exit_code=1)
        raise
    _status(out_dir, "completed")
    if tracker is not None:
        tracker.finish()
    _print_summary(metrics)
    return metrics.get(key) if key else None


def _fail(e: QDiffError, raise_it: bool) -> None:
    """One-line error; in a multirun the exception marks the job failed and the sweep goes on."""
    log.error("error: %s", e)
    if raise_it:
        raise e
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run_context(cfg: DictConfig) -> dict:
    """W&B defaults that depend on how the job was launched: group = the sweep, name = method/bits/job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    q = cfg.get("quant") or {}
    label = "FP" if q.get("method") == "fp" else f"W{q.get('weight_bits')}A{q.get('act_bits')}"
    name = f"{q.get('method')}-{label}"
    group = str(cfg.get("task_name"))
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            group = f"{cfg.get('task_name')}-{Path(hc.sweep.dir).name}"
            name = f"{name}-{hc.job.num}"
    return {"group": group, "name": name, "tags": [str(t) for t in cfg.get("tags") or []] + [str(cfg.get("task_name"))]}


def _print_summary(m: dict) -> None:
    def fmt(d: dict) -> str:
        parts = [f"FID {d['fid']:.2f}" if "fid" in d else "", f"IS {d['is']:.2f}±{d['is_std']:.2f}" if "is" in d else "",
                 f"CLIP {d['clip_score']:.2f}" if d.get("clip_score") is not None else ""]
        return ", ".join(p for p in parts if p)

    lines = [f"[qdiff] {m['model']} {m['method']} {m['quant']} ({m['sampler']}-{m['steps']}, {m['n_samples']} samples): {fmt(m)}"]
    if "fp" in m:
        lines.append(f"[qdiff] {m['model']} full precision W32A32 (same sampler/seed): {fmt(m['fp'])}")
    lines.append(f"[qdiff] total {m['cost']['total_seconds']:.0f} s; outputs in {m['output_dir']}")
    print("\n".join(lines), flush=True)
