"""Shared helpers of the benchmark scripts: compose configs like run.py, run them, time calls (interleaved, medians:
``interleaved_ms``/``medians``, the same timer as the deploy stage), print a table, write JSON."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from qdiff.runtime import interleaved_ms, medians  # noqa: E402,F401 - the one timing helper of every benchmark


def compose(overrides: list[str], out_dir: Path, cache_dir: Path | None = None):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    paths = [f"paths.root_dir={ROOT}", f"paths.log_dir={out_dir.parent}", f"paths.output_dir={out_dir}",
             f"paths.cache_dir={cache_dir or ROOT / 'outputs' / 'cache'}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hcompose(config_name="config", overrides=[*paths, "logger=none", *overrides])


def run_one(overrides: list[str], out_dir: Path, cache_dir: Path | None = None) -> dict:
    """Run the pipeline in-process for one setting; returns its metrics (also in out_dir/metrics.json)."""
    from qdiff.run import run

    if (out_dir / "metrics.json").exists():
        print(f"reusing {out_dir}/metrics.json", flush=True)
        return json.loads((out_dir / "metrics.json").read_text())
    t0 = time.perf_counter()
    metrics, _ = run(compose(overrides, out_dir, cache_dir))
    print(f"[{time.perf_counter() - t0:.0f} s] {' '.join(overrides)}: FID {metrics.get('fid', float('nan')):.2f}", flush=True)
    return metrics


def gap_recovered(fid_method: float, fid_fp: float, fid_linear: float) -> float:
    """1 - (FID_method - FID_fp) / (FID_linear - FID_fp): share of linear quantization's FID gap closed."""
    return 1 - (fid_method - fid_fp) / (fid_linear - fid_fp)


def print_table(rows: list[dict], columns: list[str], title: str = "") -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns}
    lines = [f"| {' | '.join(c.ljust(widths[c]) for c in columns)} |",
             f"|{'|'.join('-' * (widths[c] + 2) for c in columns)}|"]
    lines += [f"| {' | '.join(fmt(r.get(c, '')).ljust(widths[c]) for c in columns)} |" for r in rows]
    text = (f"{title}\n" if title else "") + "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
    print(f"wrote {path}")
