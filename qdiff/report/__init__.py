"""Aggregate qdiff outputs into the paper's tables, figures and one HTML page.

    python -m qdiff.report outputs/table2_digits/multiruns/<timestamp>     # a sweep
    python -m qdiff.report outputs/qdiff/runs/<timestamp>                  # one run
    python -m qdiff.report outputs/                                        # every sweep and run below

Every expected job is listed, finished or not (see :mod:`qdiff.report.collect`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from qdiff.report.collect import collect
from qdiff.report.paired import per_reconstruction
from qdiff.report.tables import (display_per_reconstruction, display_table, jobs_table, normalise, paper_table, state_counts, to_markdown,
                                 varying_axes)

__all__ = ["Report", "build_report", "collect", "paper_table"]


@dataclass
class Report:
    root: Path
    out: Path
    jobs: pd.DataFrame
    table: pd.DataFrame
    counts: dict[str, int]
    notes: list[str]
    files: dict[str, Path] = field(default_factory=dict)
    #: Paired recovered shares grouped over sampling seeds (:func:`qdiff.report.paired.per_reconstruction`).
    per_recon: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def complete(self) -> bool:
        return set(self.counts) <= {"completed"}


def _jobs_display(jobs: pd.DataFrame) -> pd.DataFrame:
    out = jobs.copy()
    out["fid"] = out["fid"].map(lambda v: f"{v:.2f}" if pd.notna(v) else "")
    out["restarts"] = out["restarts"].map(lambda v: str(int(v)) if pd.notna(v) else "")
    out["job"] = out["job"].map(lambda v: str(int(v)) if pd.notna(v) else "")
    return out


def build_report(path: str | Path, out: str | Path | None = None, use_sacct: bool = True, figures: bool = True) -> Report:
    """Collect every job under ``path`` and write report.md/.csv/.html, jobs.csv and figures into ``out`` (default: ``path``)."""
    from qdiff.report import figures as figs
    from qdiff.report.html import render

    root = Path(path).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {root}")
    out_dir = Path(out).resolve() if out is not None else root
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, notes = collect(root, use_sacct=use_sacct)
    jobs = normalise(rows)
    table = paper_table(jobs, root) if len(jobs) else pd.DataFrame()
    counts = state_counts(jobs)
    per_recon = per_reconstruction(table, varying_axes(jobs)) if len(table) else pd.DataFrame()
    rep = Report(root, out_dir, jobs, table, counts, notes, per_recon=per_recon)

    fig_files: dict[str, Path] = {}
    if figures and len(jobs):
        fig_dir = out_dir / "report_figures"
        fig_dir.mkdir(exist_ok=True)
        axes = varying_axes(jobs)
        done = jobs[jobs["state"] == "completed"]
        for key, fn in [("fid_vs_bits", lambda p: figs.fid_vs_bits(table, p)),
                        ("samples", lambda p: figs.sample_grids(done, root, axes, p)),
                        ("step_mse", lambda p: figs.step_mse(done, root, axes, p)),
                        ("act_ranges", lambda p: figs.act_ranges(done, root, p))]:
            f = fn(fig_dir / f"{key}.png")
            if f is not None:
                fig_files[key] = f

    shown = display_table(table) if len(table) else pd.DataFrame()
    jobs_view = jobs_table(jobs) if len(jobs) else pd.DataFrame()
    name = f"{root.parent.parent.name} / {root.name}" if root.parent.name in ("multiruns", "runs") else root.name
    title = f"qdiff report: {name}"
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    summary = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no jobs"
    md = [f"# {title}", "", f"`{root}` · generated {generated} · {len(jobs)} job(s): {summary}", ""]
    md += [f"> {n}" for n in notes] + ([""] if notes else [])
    if len(shown):
        md += ["## Results", "", to_markdown(shown), ""]
    per_recon_shown = display_per_reconstruction(per_recon) if len(per_recon) else None
    if per_recon_shown is not None:
        md += ["## Recovered share per reconstruction", "", to_markdown(per_recon_shown), ""]
    md += [f"![{k}]({f.relative_to(out_dir)})" for k, f in fig_files.items()]
    if len(jobs_view):
        md += ["", "## All jobs", "", to_markdown(_jobs_display(jobs_view)), ""]
    files = {"markdown": out_dir / "report.md", "csv": out_dir / "report.csv", "jobs_csv": out_dir / "jobs.csv",
             "html": out_dir / "report.html", "per_recon_csv": out_dir / "recovered.csv"}
    files["markdown"].write_text("\n".join(md))
    table.to_csv(files["csv"], index=False)
    jobs.to_csv(files["jobs_csv"], index=False)
    per_recon.to_csv(files["per_recon_csv"], index=False)
    files["html"].write_text(render(title, root, counts, notes, shown,
                                    _jobs_display(jobs_view) if len(jobs_view) else jobs_view, fig_files, generated,
                                    per_recon_shown))
    rep.files = {**files, **fig_files}
    return rep
