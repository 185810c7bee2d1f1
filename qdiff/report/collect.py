"""Every job of a sweep, a run directory or a directory of runs, with its state: one row per job, none dropped.

Expected jobs come from the sweep itself (:mod:`qdiff.report.sweep`); each is matched to its job directory
(:mod:`qdiff.report.discover`, :mod:`qdiff.report.rows`). A job without one is ``missing`` (or
``pending``/``cancelled`` when SLURM knows it), a directory without ``metrics.json`` is ``failed``
(``status.json`` says so), or, when its status still says running, whatever ``sacct`` says of its SLURM job
(``running``, ``pending``, ``cancelled``, ``timeout``, ``failed``), else ``incomplete``
(:func:`qdiff.report.scheduler.settle`).
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from qdiff.report.discover import find_sources, job_dirs
from qdiff.report.rows import missing_row, read_job
from qdiff.report.scheduler import needs_sacct, sacct_states, settle, submitit_array_ids
from qdiff.report.sweep import compose_missing, match_jobs, read_sweep
from qdiff.runstatus import STATES

__all__ = ["STATES", "collect"]


def _sweep_rows(path: Path, notes: list[str]) -> list[dict]:
    """Rows of a sweep directory: every expected job in job-number order, then the job dirs no job expects."""
    sweep = read_sweep(path)
    if sweep.note:
        notes.append(f"{path.name}: {sweep.note}")
    # submitit's folders are named by job id: SLURM ids for the SLURM launcher, process ids for the local one
    array_ids = submitit_array_ids(path) if sweep.on_slurm else {}
    matched, unmatched = match_jobs(sweep, [read_job(d) for d in job_dirs(path)])
    rows: list[dict] = []
    for num, ovr, r in matched:
        if r is None:
            r = {**compose_missing(sweep, ovr), **missing_row(path / str(num), array_ids.get(num))}
        if not r.get("slurm_id") and array_ids.get(num):  # started, but status.json not written yet
            r["slurm_id"] = array_ids[num]
        r.update(sweep=path.name, sweep_dir=str(path), job=num, overrides=sweep.shown(ovr))
        rows.append(r)
    for r in unmatched:  # an earlier launch into the same dir, ...
        r.update(sweep=path.name, sweep_dir=str(path), job=None, overrides=" ".join(r["_overrides"] or []))
        rows.append(r)
    return rows


def collect(path: str | Path, use_sacct: bool = True) -> tuple[pd.DataFrame, list[str]]:
    """All jobs under ``path`` as a DataFrame (one row per job) and notes on what could not be determined."""
    root = Path(path).resolve()
    rows: list[dict] = []
    notes: list[str] = []
    for src in find_sources(root):
        if src.kind == "run":
            rows.append({**read_job(src.path), "sweep": "", "job": None, "overrides": ""})
        else:
            rows += _sweep_rows(src.path, notes)
    ids = [r["slurm_id"] for r in rows if needs_sacct(r["has_metrics"], r["_status"], r.get("slurm_id"))]
    sacct = sacct_states(ids) if use_sacct else None
    for r in rows:
        has_dir = not r.pop("_missing", False)
        r["state"], r["detail"] = settle(r["has_metrics"], r.pop("_status"), r.get("slurm_id"), sacct, has_dir)
        r.pop("_overrides", None)
        r["dir"] = os.path.relpath(r["dir"], root) if r.get("dir") else ""
    df = pd.DataFrame(rows)
    if df.empty:
        notes.append(f"no runs or sweeps found under {root}")
    return df, notes
