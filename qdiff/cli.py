"""The Hydra entry point's body: tracker lifecycle, run status file, one-line errors."""
from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qdiff.errors import QDiffError
from qdiff.io import write_json

log = logging.getLogger("qdiff")


def _status(out_dir: Path, state: str, **extra) -> None:
    info = {"state": state, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_array": os.environ.get("SLURM_ARRAY_JOB_ID"), "restarts": os.environ.get("SLURM_RESTART_COUNT"), **extra}
    write_json(out_dir / "status.json", info)


def main(cfg: DictConfig) -> float | None:
    """Run one job; returns the metric a sweeper optimises (``cfg.optimized_metric``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from hydra.utils import instantiate

    from qdiff.pipeline import run

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    out_dir = Path(cfg.paths.output_dir)
    tracker = None
    try:
        if (out_dir / "metrics.json").exists():
            raise QDiffError(f"{out_dir} already holds a finished run; refusing to overwrite it")
        out_dir.mkdir(parents=True, exist_ok=True)
        _status(out_dir, "running")
        tracker = instantiate(cfg.logger) if cfg.get("logger") else None
        if tracker is not None:
            tracker.start(OmegaConf.to_container(cfg, resolve=True), out_dir)
        metrics, _ = run(cfg, tracker)
    except QDiffError as e:
        msg = f"error: {e}"
        log.error(msg)
        if (out_dir / "status.json").exists():
            _status(out_dir, "failed", error=str(e))
        if tracker is not None:
            tracker.finish(exit_code=2)
        if multirun:
            raise
        print(msg, file=sys.stderr)
        sys.exit(2)
    except BaseException as e:
        _status(out_dir, "failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        if tracker is not None:
            tracker.finish(exit_code=1)
        raise
    _status(out_dir, "completed")
    if tracker is not None:
        tracker.finish()
    _print_summary(metrics)
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


def _print_summary(m: dict) -> None:
    def fmt(d: dict) -> str:
        parts = [f"FID {d['fid']:.2f}" if "fid" in d else "", f"IS {d['is']:.2f}±{d['is_std']:.2f}" if "is" in d else ""]
        return ", ".join(p for p in parts if p)

    lines = [f"[qdiff] {m['model']} {m['method']} {m['quant']} ({m['sampler']}-{m['steps']}, {m['n_samples']} samples): {fmt(m)}"]
    if "fp" in m:
        lines.append(f"[qdiff] {m['model']} full precision W32A32 (same sampler/seed): {fmt(m['fp'])}")
    lines.append(f"[qdiff] total {m['cost']['total_seconds']:.0f} s; outputs in {m['output_dir']}")
    print("\n".join(lines), flush=True)
