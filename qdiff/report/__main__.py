"""``python -m qdiff.report <sweep dir | run dir | dir of runs> [--out DIR]`` (console script: ``qdiff-report``)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qdiff-report", description="Paper-style tables, figures and an HTML page "
                                "from qdiff run directories; every expected job is listed, finished or not.")
    p.add_argument("path", help="a sweep dir (holds multirun.yaml), a run dir, or a directory of runs/sweeps")
    p.add_argument("--out", default=None, help="where to write report.{md,csv,html}, jobs.csv, report_figures/ (default: PATH)")
    p.add_argument("--no-sacct", action="store_true", help="do not ask SLURM accounting about unfinished jobs")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.add_argument("--strict", action="store_true", help="exit 1 unless every job completed")
    a = p.parse_args(argv)

    from qdiff.report import build_report
    from qdiff.report.tables import display_per_reconstruction, display_table, to_markdown

    try:
        rep = build_report(a.path, a.out, use_sacct=not a.no_sacct, figures=not a.no_figures)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for n in rep.notes:
        print(f"note: {n}")
    if len(rep.table):
        print(to_markdown(display_table(rep.table)))
    if len(rep.per_recon):
        print("\nRecovered share per reconstruction (mean over sampling seeds; per seed with its paired 95 % interval):")
        print(to_markdown(display_per_reconstruction(rep.per_recon)))
    print(f"jobs: {len(rep.jobs)} (" + ", ".join(f"{n} {s}" for s, n in rep.counts.items()) + ")")
    for r in rep.jobs[rep.jobs["state"] != "completed"].to_dict("records"):
        job = f"#{r['job']}" if r["job"] is not None and str(r["job"]) != "<NA>" else ""
        print(f"  {r['state']:10s} {r['sweep'] or ''} {job} {r['overrides'] or r['dir']}: {r['detail']}")
    print(f"report: {rep.files['html']}")
    return 1 if a.strict and not rep.complete else 0


if __name__ == "__main__":
    sys.exit(main())
