"""The Hydra entry point's body: tracker lifecycle, run status file, one-line errors."""
from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qdiff.errors import QDiffError
from qdiff.quant.config import quant_label
from qdiff.runstatus import COMPLETED, FAILED, INTERRUPTED, RUNNING, refuse_finished, write_status

log = logging.getLogger("qdiff")


def main(cfg: DictConfig, raise_errors: bool = False) -> float | None:
    """Run one job; returns the metric a sweeper optimises (``cfg.optimized_metric``).

    User errors exit with status 2 and one line, unless in a multirun or ``raise_errors`` (submitit jobs),
    where they are raised so that the launcher records the job as failed.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from hydra.utils import instantiate

    from qdiff.run import run

    multirun = raise_errors or (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN)
    out_dir = Path(cfg.paths.output_dir)
    key = cfg.get("optimized_metric")
    try:
        done = refuse_finished(out_dir)
    except QDiffError as e:
        return _fail(e, multirun)
    if done is not None:
        log.info("%s: this job finished the run before it was requeued; returning its metrics", out_dir)
        write_status(out_dir, COMPLETED)
        return done.get(key) if key else None
    tracker = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_status(out_dir, RUNNING)
        tracker = instantiate(cfg.logger) if cfg.get("logger") else None
        if tracker is not None:
            tracker.start(OmegaConf.to_container(cfg, resolve=True), out_dir, **run_context(cfg))
        metrics, _ = run(cfg, tracker)
    except QDiffError as e:
        if out_dir.is_dir():
            write_status(out_dir, FAILED, error=str(e))
        if tracker is not None:
            tracker.finish(exit_code=2)
        return _fail(e, multirun)
    except BaseException as e:
        # SystemExit / KeyboardInterrupt: preempted or stopped (submitit exits after requeueing the job);
        # the report asks the scheduler whether it lives on.
        stopped = isinstance(e, (SystemExit, KeyboardInterrupt))
        if out_dir.is_dir():
            write_status(out_dir, INTERRUPTED if stopped else FAILED, error=f"{type(e).__name__}: {e}",
                         **({} if stopped else {"traceback": traceback.format_exc()}))
        if tracker is not None:
            tracker.finish(exit_code=1)
        raise
    write_status(out_dir, COMPLETED)
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
    label = "FP" if q.get("method") == "fp" else quant_label(q.get("weight_bits"), q.get("act_bits"))
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
