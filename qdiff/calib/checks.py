"""Calibration data is checked where it is taken: non-finite values refused, absurd ones warned about.

:func:`check_calibration` scans a set (a collected :class:`~qdiff.calib.data.CalibrationSet`, read in chunks from
its memory-mapped files, or the tensors given to :func:`qdiff.quantize`) and raises one line naming the first
row with a NaN or an infinity: for a collected set its trajectory, step and timestep. Collection itself checks
every step as it samples (:func:`sampler_diverged`), so a set collected by qdiff only fails here when it was
changed on disk. The scan reads the set once (~0.1 s per 100 MB).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from qdiff.errors import DataError
from qdiff.finite import ABSURD_X, first_bad_row, kind, max_abs

log = logging.getLogger("qdiff")

#: Rows read per chunk while scanning a stored set.
CHUNK = 1024



def diverges(scheduler_config: dict | None = None) -> str:
    """What to try when the FP sampler diverges (clipping is suggested when the scheduler has it off)."""
    clip = "" if (scheduler_config or {}).get("clip_sample") else "the scheduler's clipping (clip_sample=True), "
    return f"the sampler diverges on these trajectories: try {clip}fewer steps (calib.T) or another scheduler"


def describe_row(calib, row: int) -> str:
    """``row 17 (trajectory 1, step 4 of 10, t=600, unconditional branch)`` for a collected set; ``row 17 (t=600)``
    for tensors."""
    meta = getattr(calib, "meta", None)
    if not meta or "n_trajectories" not in meta:
        t = calib.t[row]
        return f"row {row} (t={_num(t)})"
    n_entries = calib.n_entries
    entry = row % n_entries
    branch = ", unconditional branch" if row >= n_entries else ""
    traj = entry % meta["n_trajectories"]
    steps = meta.get("sampler", {}).get("steps")
    of = f" of {steps}" if steps else ""
    return f"row {row} (trajectory {traj}, step {int(calib.step[entry]) + 1}{of}, t={_num(calib.t[entry])}{branch})"


def _num(t) -> str:
    v = float(t)
    return str(int(v)) if math.isfinite(v) and v == int(v) else f"{v:.4g}"


def check_calibration(calib) -> dict:
    """Refuse a set with a non-finite x_t, t or conditioning (one line naming the first such row); warn when
    |x_t| is far beyond what a sampler produces. Returns ``{"max_abs_x": ...}``. A stored set is checked once
    per object."""
    done = getattr(calib, "_qdiff_checked", None)
    if done is not None:
        return done
    stored = hasattr(calib, "n_entries")
    where = (f"calibration set {calib.root}" if stored else "calibration tensors")
    fix = (f"collect it again (delete {calib.root})" if stored else
           "check the tensors given to quantize (a NaN pixel, or a sampler that diverged while making them)")
    peak, peak_row = 0.0, 0
    conds = calib.conds if stored else calib.cond
    arrays = [("x_t", calib.x), ("t", calib.t), *((f"conditioning {k!r}", v) for k, v in conds.items())]
    if stored and calib.unconds is not None:
        arrays += [(f"unconditional conditioning {k!r}", v) for k, v in calib.unconds.items()]
    for name, arr in arrays:
        for start in range(0, len(arr), CHUNK):
            chunk = arr[start:start + CHUNK]
            chunk = chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.array(chunk))
            bad = first_bad_row(chunk)
            if bad is not None:
                at = "its shared row" if len(arr) == 1 else describe_row(calib, start + bad)
                raise DataError(f"{where}: {name} of {at} holds {kind(chunk[bad])}; refused before any quantization: {fix}")
            if name == "x_t" and chunk.numel():
                m = chunk.abs().reshape(chunk.shape[0], -1).amax(1)
                i = int(m.argmax())
                if float(m[i]) > peak:
                    peak, peak_row = float(m[i]), start + i
    if peak > ABSURD_X:
        log.warning("%s: |x_t| reaches %.3g at %s, far beyond the model inputs a diffusion sampler makes from "
                    "unit-variance noise and data (a few units): the sampler that made it probably diverged (try the "
                    "scheduler's clipping, clip_sample=True, fewer steps or another scheduler), or the data is not on "
                    "the model's scale", where, peak, describe_row(calib, peak_row))
    result = {"max_abs_x": round(peak, 4)}
    try:
        calib._qdiff_checked = result if stored else None
    except AttributeError:  # pragma: no cover - a foreign set type with slots
        pass
    return result


def sampler_diverged(step, start: int, T: int, x_peak: tuple[float, int] | None = None,
                     scheduler_config: dict | None = None) -> None:
    """Raise when this collection step's model input or noise estimate is non-finite: names the trajectory, the
    step (1-based) and its timestep, and whether the model or the sampler produced it. ``start``: the batch's first
    trajectory; ``x_peak``: (largest |x_t| so far, its 0-based step) for the message."""
    for what, value in (("x_t", step.x_in), ("the model's noise estimate", step.eps)):
        bad = first_bad_row(value)
        if bad is None:
            continue
        t = _num(step.t[bad])
        at = f"trajectory {start + bad}, step {step.index + 1} of {T} (t={t})"
        if what == "x_t":
            cause = f"the sample itself became {kind(value[bad])}: {diverges(scheduler_config)}"
        elif x_peak is not None and x_peak[0] > ABSURD_X:
            cause = f"|x_t| had grown to {x_peak[0]:.3g} by step {x_peak[1] + 1}: {diverges(scheduler_config)}"
        else:
            cause = (f"the model returns {kind(value[bad])} for a finite input (|x_t| <= {max_abs(step.x_in[bad]):.3g}) "
                     f"at t={t}: check the model's weights and how it handles this timestep")
        raise DataError(f"calibration data: {what} of {at} is non-finite; {cause}")


def conditioning_broken(cond: dict | None, uncond: dict | None, start: int) -> None:
    """Raise when a batch's conditioning holds a non-finite value (names the key and the trajectory)."""
    for branch, d in (("conditioning", cond), ("unconditional conditioning", uncond)):
        for k, v in (d or {}).items():
            bad = first_bad_row(v)
            if bad is not None:
                raise DataError(f"calibration data: {branch} {k!r} of trajectory {start + bad} holds {kind(v[bad])}; "
                                "refused before sampling: check the tensors (or prompt encoder) that made it")
