"""The public verb: ``qdiff.quantize(model, QuantConfig(...), calib, ReconConfig(...))``.

Works on any ``nn.Module`` noise predictor called as ``eps = model(x_t, t, **cond)``. The stages, each usable
on its own: :func:`prepare` (detect splits, wrap, init weight ranges), then for ``method="linear"`` the
activation ranges, for ``method="qdiff"`` block reconstruction (:func:`qdiff.recon.reconstruct`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qdiff.calib.checks import check_calibration
from qdiff.errors import ConfigError, DataError
from qdiff.finite import first_bad_row, kind
from qdiff.quant.config import QuantConfig
from qdiff.quant.layers import LAYER_REGISTRY
from qdiff.quant.split import execution_order, find_concat_splits
from qdiff.quant.wrap import LayerSpec, init_weight_quantizers, resolve_layer_specs, wrap_model

log = logging.getLogger("qdiff")


def as_calibration(calib):
    """Accept a CalibrationSet/TensorCalibration or a tuple ``(x, t[, cond])`` of tensors."""
    from qdiff.calib.data import TensorCalibration

    if calib is None or hasattr(calib, "batches"):
        return calib
    if isinstance(calib, (tuple, list)) and len(calib) in (2, 3):
        return TensorCalibration(*calib)
    raise TypeError("calib must be a CalibrationSet, a TensorCalibration or a tuple (x, t[, cond])")


def check_weights(model: nn.Module) -> None:
    """Refuse a model whose own parameters or buffers hold NaN/Inf: every quantized weight would inherit it."""
    for name, v in [*model.named_parameters(), *model.named_buffers()]:
        if first_bad_row(v) is not None:
            raise DataError(f"quantize: the model's {name} holds {kind(v)}; the FP model itself is broken (check the "
                            "checkpoint it was loaded from)")


@torch.no_grad()
def prepare(model: nn.Module, cfg: QuantConfig, example: tuple[torch.Tensor, torch.Tensor, dict], calib=None,
            num_samples: int = 256, seed: int = 0) -> tuple[nn.Module, list[LayerSpec]]:
    """Detect shortcut splits and layer order on one example batch, wrap the layers, apply the configured transforms
    (smoothing, low-rank branch: :mod:`qdiff.quant.transforms`; they need ``calib``), init weight ranges."""
    check_weights(model)
    x, t, cond = example
    splits = shortcut_splits(model, cfg, (x, t), cond)
    order = execution_order(model, (x, t), cond, types=tuple(LAYER_REGISTRY))
    specs = resolve_layer_specs(model, cfg, splits, order)
    log_conditioning_path(model, cfg, specs)
    try:
        q = wrap_model(model, cfg, specs)
    except ValueError as e:
        raise ConfigError(f"quant: {e}") from None
    if cfg.transforms:
        from qdiff.quant.transforms import apply_transforms

        q.transform_report = apply_transforms(model, q, cfg, calib, num_samples, seed, x.device)
    init_weight_quantizers(q, cfg.resolved_scale_method, cfg.lp)
    return q, specs


def log_conditioning_path(model: nn.Module, cfg: QuantConfig, specs: list[LayerSpec]) -> None:
    """Say how the conditioning path (embeddings, adaLN modulation) is quantized: an explicit choice, not a side effect."""
    from collections import Counter

    from qdiff.quant.wrap import conditioning_layers

    cond = conditioning_layers(model)
    if not cond:
        return
    bits = Counter(f"W{s.weight_bits}A{s.act_bits}" for s in specs if s.name in cond)
    log.info("conditioning path (timestep/class/text embeddings, adaLN modulation): %d of %d layers at %s "
             "(quant.cond_bits=%s: %s)", len(cond), len(specs), ", ".join(f"{k} x{n}" for k, n in sorted(bits.items())),
             cfg.cond_bits, "like every other layer, as the paper" if cfg.cond_bits is None else "their own bits")


def shortcut_splits(model: nn.Module, cfg: QuantConfig, inputs: tuple, cond: dict) -> dict[str, int]:
    """Detected split points plus ``cfg.split_layers``; says what it found, and when it found nothing."""
    if not cfg.split:
        return {}
    layers = {n for n, m in model.named_modules() if type(m) in LAYER_REGISTRY}
    unknown = sorted(set(cfg.split_layers) - layers)
    if unknown:
        raise ConfigError(f"quant.split_layers: no quantizable layer named {unknown[0]!r}")
    found = find_concat_splits(model, inputs, cond)
    splits = {**found, **cfg.split_layers}
    if splits:
        log.info("shortcut splitting: %d layer(s) split (%d detected, %d named): %s", len(splits), len(found),
                 len(cfg.split_layers), ", ".join(f"{n}@{c}" for n, c in splits.items()))
    else:
        log.warning("shortcut splitting is on but no concatenation feeding a convolution was found, so no layer is "
                    "split; name split points with QuantConfig(split_layers={layer: channels of the first part})")
    return splits


def quantize(model: nn.Module, config: QuantConfig, calib=None, recon=None, device: torch.device | str | None = None,
             work_dir: str | Path | None = None, act_init_samples: int = 256, progress: bool = True,
             logger=False, workers: int | None = None, launcher: str | None = None) -> nn.Module:
    """A quantized copy of ``model`` (the original is untouched), or ``model`` itself for ``method="fp"``.

    ``calib`` (a set from :func:`qdiff.calibration_data`, or a tuple ``(x_t, t[, cond])``) is needed to detect
    shortcut splits, to set activation ranges and to reconstruct. ``method="linear"``: round-to-nearest with
    min-max ranges. ``method="qdiff"``: AdaRound weight reconstruction, then activation ranges and LSQ step
    sizes, block by block (``recon``: a ReconConfig; ``work_dir``: checkpoint folder to resume from). The
    returned model carries ``quant_specs`` (the per-layer table) and ``qdiff_report`` (per-unit MSE, rounding
    hardness, cost; ``seconds`` splits the time into wrapping and reconstruction).

    ``workers``/``launcher``: reconstruct the units that take FP inputs in parallel, on ``workers`` submitit jobs run
    by ``launcher`` ("local" processes or a "slurm" job array); shorthands for ``recon.workers``/``recon.launcher``,
    and they need ``work_dir`` (:mod:`qdiff.recon.parallel`).
    """
    from qdiff.recon.config import ReconConfig

    if config.method == "fp":
        return model
    calib = as_calibration(calib)
    if calib is None:
        raise ConfigError("quantize needs calib (a set from qdiff.calibration_data, or a tuple (x_t, t[, cond])) to find "
                          "shortcut splits and activation ranges")
    check_calibration(calib)  # one line naming the first non-finite row, before any work
    recon = recon or ReconConfig()
    if workers is not None or launcher is not None:
        import dataclasses

        recon = dataclasses.replace(recon, workers=recon.workers if workers is None else workers,
                                    launcher=launcher or recon.launcher)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    t0 = time.perf_counter()
    q, specs = prepare(model, config, calib.get([0, min(1, len(calib) - 1)], device), calib, act_init_samples, recon.seed)
    report: dict = {"transforms": getattr(q, "transform_report", {})} if config.transforms else {}
    if config.method == "qdiff":
        from qdiff.recon import reconstruct

        t1 = time.perf_counter()
        report.update(reconstruct(model, q, calib, config, recon, device=device, work_dir=work_dir, progress=progress,
                                  logger=logger, act_init_samples=act_init_samples, specs=specs))
        seconds = {"quantize": round(t1 - t0, 2), "reconstruct": round(time.perf_counter() - t1, 2)}
    else:
        if config.quantizes_acts:
            from qdiff.quant.act_init import init_act_quantizers

            init_act_quantizers(q, calib, config.resolved_scale_method, config.lp, num_samples=act_init_samples,
                                seed=recon.seed, device=device, progress=progress)
        seconds = {"quantize": round(time.perf_counter() - t0, 2)}
    report["sanity"] = sanity_check(model, q, calib, device, work_dir)
    q.quant_config, q.quant_specs = config, specs
    q.qdiff_report = {**report, "seconds": seconds}
    return q


#: Calibration inputs (spread over the set, so over its timesteps) on which the quantized model is checked.
SANITY_ROWS = 8


@torch.no_grad()
def sanity_check(fp_model: nn.Module, q: nn.Module, calib, device: torch.device, work_dir=None) -> dict:
    """The quantized model against FP on a few calibration inputs: refuses (one line) a model whose output is
    non-finite, warns when its error exceeds the output itself; returns the relative L2 error."""
    from qdiff.calib.checks import describe_row
    from qdiff.models.base import eps

    rows = np.unique(np.linspace(0, len(calib) - 1, min(SANITY_ROWS, len(calib))).round().astype(np.int64))
    x, t, cond = calib.get(rows, device)
    ref, out = eps(fp_model, x, t, cond).float(), eps(q, x, t, cond).float()
    for name, value in (("FP model's", ref), ("quantized model's", out)):
        bad = first_bad_row(value)
        if bad is not None:
            kept = f"; the reconstruction checkpoints stay in {work_dir}" if work_dir is not None else ""
            raise DataError(f"quantize: the {name} output is {kind(value[bad])} on calibration "
                            f"{describe_row(calib, int(rows[bad]))}, so the quantized model is not returned{kept}")
    rel = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
    if rel > 1.0:
        log.warning("quantize: the quantized model's output differs from FP by %.3g (relative L2) on %d calibration "
                    "inputs, more than the output itself: check the bit widths and the reconstruction report", rel, len(rows))
    return {"rows": len(rows), "rel_l2_vs_fp": round(rel, 6)}
