"""The one reconstruction engine: orders the steps of :mod:`qdiff.recon.steps`, checkpoints and resumes them.

    for each unit (block or layer), in execution order:   AdaRound the unit's weights   (weights:<unit>)
        (the loop ends early once every rounding variable is 0 or 1: recon.stop_when_hard, exact)
    set every activation quantizer's range from calibration data                           (act_init)
    for each unit, in execution order:                     LSQ the unit's act step sizes (acts:<unit>)
    optionally: match the output layer's bias on the calibration trajectories          (output_bias:<layer>)

Each finished step writes its state to ``work_dir`` (safetensors) and records it in ``progress.json``; a
rerun with the same settings restores the finished steps and continues, so the final weights are
bit-identical to an uninterrupted run on CPU (every unit's batches have their own seed). The folder
records everything that determines the result (:func:`recon_ident`): reusing it with other settings or
another model is refused in one line, never mixed.
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qdiff.cache import cache_lock, claim_folder, save_tensors
from qdiff.errors import CheckpointError, ConfigError, DataError
from qdiff.io import load_state_dict_file, write_json
from qdiff.quant.config import QuantConfig
from qdiff.quant.split import execution_order
from qdiff.quant.wrap import act_quantizers
from qdiff.recon.config import ReconConfig
from qdiff.recon.output import output_layer
from qdiff.recon.steps import (ActRangeInit, ActStepSize, Context, OutputBiasMatch, Step, StepReport, WeightRounding)
from qdiff.recon.units import Unit, find_units

log = logging.getLogger("qdiff")


class Checkpoints:
    """Per-step states under ``root`` (None: no checkpointing), in the order the steps finished."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.progress: dict = {"done": [], "reports": {}}
        if root is not None and (root / "progress.json").exists():
            self.progress = json.loads((root / "progress.json").read_text())

    def done(self, step: str) -> bool:
        return step in self.progress["done"]

    def load(self, step: str) -> tuple[dict[str, torch.Tensor], StepReport]:
        state = load_state_dict_file(self.root / f"{self.progress['done'].index(step):04d}.safetensors")
        return state, StepReport(**{**self.progress["reports"][step], "resumed": True})

    def save(self, step: str, state: dict[str, torch.Tensor], report: StepReport) -> None:
        """The step's state file, then its line in ``progress.json`` (both atomic: a failure keeps the record of the
        steps before it intact, and a state file without its line is overwritten on resume)."""
        if self.root is None:
            return
        progress = {"done": [*self.progress["done"], step], "reports": {**self.progress["reports"], step: asdict(report)}}
        try:
            save_tensors(self.root / f"{len(self.progress['done']):04d}.safetensors", state)
            write_json(self.root / "progress.json", progress)
        except OSError as e:
            raise CheckpointError(f"reconstruction: could not write the checkpoint of step '{step}' ({e.strerror or e}); "
                                  f"{self.kept()}: free space or fix the folder's permissions and rerun with the same "
                                  "settings to resume") from None
        self.progress = progress

    def kept(self) -> str:
        """Where the finished steps are, for error messages."""
        n = len(self.progress["done"])
        return (f"the {n} finished step(s) before it are checkpointed in {self.root}" if n else
                f"nothing had been checkpointed in {self.root} yet")


def plan(ctx: Context, units: list[Unit], order: list[str], act_init_samples: int) -> list[Step]:
    """The steps of a reconstruction, in order (each unit step's batch seed is fixed by its position)."""
    cfg = ctx.cfg
    steps: list = []

    def seed(phase: str) -> int:
        return cfg.seed * 100_003 + 2 * len(steps) + (phase == "acts")

    if ctx.qcfg.quantizes_weights and cfg.weight_iters > 0:
        for u in units:
            steps.append(WeightRounding(u, seed("weights")))
    if act_quantizers(ctx.q_model, calibrated=True):
        steps.append(ActRangeInit(act_init_samples))
        if cfg.act_iters > 0:
            for u in units:
                steps.append(ActStepSize(u, seed("acts")))
    out_name = output_layer(ctx.q_model, order)
    if cfg.output_bias_match and out_name is not None:
        steps.append(OutputBiasMatch(out_name))
    return steps


def run_steps(steps: list[Step], ctx: Context, ckpt: Checkpoints, progress: bool) -> tuple[list[StepReport], list[dict]]:
    """Run (or restore) every step in order, checkpointing each; one progress bar for all of them.

    With ``recon.workers > 1`` each run of consecutive independent unit steps (FP inputs) that is not finished yet
    goes to the workers first (:func:`qdiff.recon.parallel.run_parallel`); their parts are then restored and
    checkpointed here in plan order, exactly as if this process had run them. Returns the reports and the
    parallel phases' accounting.
    """
    from qdiff.recon.module import BarPostfix
    from qdiff.recon.parallel import Parts, run_parallel

    reports, phases = [], []
    parts = Parts(ckpt.root) if ckpt.root is not None else None
    bar = tqdm(total=len(steps), desc="reconstruction", unit="step", disable=not progress)
    shown = BarPostfix(bar)
    ctx.callbacks = [shown] if progress else []
    with _quiet_lightning():
        for i, step in enumerate(steps):
            shown.label = step.name
            bar.set_postfix_str(step.name)
            if ctx.cfg.workers > 1 and _independent(step, ctx) and not (i and _independent(steps[i - 1], ctx)):
                group = _independent_run(steps, i, ctx, ckpt)  # a run of independent steps starts here
                if len(group) > 1 and not all(parts.done(s.name) for s in group):
                    phases.append({"steps": len(group), **run_parallel(group, ctx, ckpt.root, progress)})
            if ckpt.done(step.name):
                state, rep = ckpt.load(step.name)
                step.restore(ctx, state)
            elif parts is not None and parts.done(step.name):  # finished by a worker: taken over as is
                state, rep_dict = parts.load(step.name)
                step.restore(ctx, state)
                rep = StepReport(**rep_dict)
                ckpt.save(step.name, state, rep)
                parts.remove(step.name)
            else:
                try:
                    rep = step.run(ctx)
                except DataError as e:  # nothing of this step is kept; what finished before it is
                    where = (f"; {ckpt.kept()}: fix the cause and rerun with the same settings to resume"
                             if ckpt.root is not None else "")
                    raise type(e)(f"{e}{where}") from None
                ckpt.save(step.name, step.state(ctx), rep)
            reports.append(rep)
            bar.update(1)
    bar.close()
    return reports, phases


def _independent(step: Step, ctx: Context) -> bool:
    return bool(getattr(step, "independent", None) and step.independent(ctx.cfg))


def _independent_run(steps: list[Step], i: int, ctx: Context, ckpt: Checkpoints) -> list[Step]:
    """The unfinished steps of the run of consecutive independent steps starting at ``i``."""
    j = i
    while j < len(steps) and _independent(steps[j], ctx):
        j += 1
    return [s for s in steps[i:j] if not ckpt.done(s.name)]


def recon_ident(ctx: Context, units: list[Unit], specs: list | None) -> dict:
    """Everything that determines a reconstruction's result (a work folder records it)."""
    from qdiff.models.base import fingerprint

    recon = ctx.cfg.result_settings()
    return {"weights": fingerprint(ctx.fp_model), "calib": calibration_fingerprint(ctx.calib), "quant": asdict(ctx.qcfg),
            "recon": recon, "units": [asdict(u) for u in units], "layers": [asdict(s) for s in specs or []],
            "device": ctx.device.type}


def calibration_fingerprint(calib) -> str:
    """A calibration set's key (collected sets) or a hash of its tensors (in-memory sets)."""
    meta = getattr(calib, "meta", None)
    if meta and "key" in meta:
        return str(meta["key"])
    import hashlib

    h = hashlib.sha256()
    for tensor in (calib.x, calib.t, *(calib.cond[k] for k in sorted(calib.cond))):
        h.update(tensor.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def reconstruct(fp_model: nn.Module, q_model: nn.Module, calib, qcfg: QuantConfig, cfg: ReconConfig,
                device: torch.device | str | None = None, work_dir: str | Path | None = None, progress: bool = True,
                logger=False, act_init_samples: int = 256, specs: list | None = None) -> dict:
    """Reconstruct ``q_model`` (a wrapped copy of ``fp_model``) in place; returns a cost/quality report.

    ``work_dir``: checkpoint folder (resumed when it holds a reconstruction with the same settings; a folder
    made with other settings is refused unless ``cfg.resume`` is false, which starts it fresh).
    """
    if cfg.output_bias_match and not hasattr(calib, "final_latents"):
        raise ConfigError("recon.output_bias_match replays the calibration trajectories to the end: it needs a "
                          "calibration set collected by qdiff (qdiff.calibration_data), not bare tensors")
    device = torch.device(device) if device is not None else next(q_model.parameters()).device
    t_start = time.perf_counter()
    x0, t0, c0 = calib.get([0], device)
    order = execution_order(fp_model, (x0, t0), c0)
    units = find_units(q_model, order, cfg.granularity, cfg.block_patterns)
    n = min(cfg.num_samples or len(calib), len(calib))
    sample_idx = np.sort(np.random.default_rng(cfg.seed).choice(len(calib), size=n, replace=False))
    if cfg.cache_storage == "disk" and work_dir is None:
        raise ConfigError("recon.cache_storage=disk needs a work_dir")
    if cfg.workers > 1 and work_dir is None:
        raise ConfigError(f"recon.workers={cfg.workers} needs a work_dir: the workers write their units' checkpoints there "
                          "(on SLURM, a folder on a disk every node sees)")
    ctx = Context(fp_model, q_model, calib, qcfg, cfg, device, sample_idx,
                  disk=Path(work_dir) / "unit_cache" if cfg.cache_storage == "disk" else None, logger=logger)
    steps = plan(ctx, units, order, act_init_samples)
    with _work_folder(work_dir, recon_ident(ctx, units, specs), fresh=not cfg.resume) as root:
        if cfg.workers > 1:
            log.info("reconstruction on %d %s workers: %s", cfg.workers, cfg.launcher, {
                "fp": "every unit on FP inputs, AdaRound and LSQ in parallel",
                "fp_then_quantized": "AdaRound on FP inputs in parallel, then LSQ in order on quantized inputs",
            }[cfg.input_source])
        reports, phases = run_steps(steps, ctx, Checkpoints(root), progress)
    done = [r for r in reports if not r.resumed]
    hard = _warn_undecided_rounding(reports, cfg)
    return {
        "output": {k: v for r in reports for k, v in r.extra.items()},
        "units": [asdict(u) for u in units],
        "n_units": len(units),
        "n_calibration_inputs": n,
        "steps": [{k: v for k, v in asdict(r).items() if k != "extra"} for r in reports],
        "resumed_steps": sum(r.resumed for r in reports),
        "hard_fraction_mean": hard,
        "seconds_total": round(time.perf_counter() - t_start, 2),
        "seconds_capture": round(sum(r.capture_seconds for r in done), 2),
        "seconds_optimize": round(sum(r.optimize_seconds for r in done), 2),
        "work_dir": None if work_dir is None else str(work_dir),
        "parallel": {"workers": cfg.workers, "launcher": cfg.launcher, "input_source": cfg.input_source,
                     "phases": phases} if cfg.workers > 1 else None,
    }


#: Below this mean share of rounding variables at exactly 0 or 1, AdaRound did not converge in its budget.
DECIDED = 0.9


def _warn_undecided_rounding(reports: list[StepReport], cfg: ReconConfig) -> float | None:
    """Mean hard fraction over the AdaRound steps; a warning with the fix when rounding ended undecided."""
    fractions = [r.hard_fraction for r in reports if r.hard_fraction is not None]
    if not fractions:
        return None
    mean = round(float(np.mean(fractions)), 4)
    if mean < DECIDED:
        log.warning("AdaRound ended undecided: on average only %.0f%% of the rounding variables reached 0 or 1 "
                    "(%d units, weight_iters=%d, weight_lr=%g), so the rounding is close to round-to-nearest, not "
                    "learned. Give it more iterations or a larger learning rate: ReconConfig.preset(\"cpu\") ends "
                    "fully decided at 1000-1500 iterations (weight_lr=5e-2); the paper's weight_lr=1e-3 is set for 20k",
                    100 * mean, len(fractions), cfg.weight_iters, cfg.weight_lr)
    return mean


@contextmanager
def _work_folder(work_dir: str | Path | None, ident: dict, fresh: bool) -> Iterator[Path | None]:
    """The checkpoint folder, locked against a concurrent job and checked against ``ident`` (None: none)."""
    if work_dir is None:
        yield None
        return
    p = Path(work_dir)
    with cache_lock(p.with_name(p.name + ".lock"), "reconstruction"):
        yield claim_folder(p, ident, "reconstruction", fresh=fresh)


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for pattern in (".*does not have many workers.*", ".*GPU available but not used.*", ".*srun.*",
                        ".*in eval mode at the start of training.*",  # intended: the unit keeps eval mode
                        ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"):
            warnings.filterwarnings("ignore", pattern)
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)
