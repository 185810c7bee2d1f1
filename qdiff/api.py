"""The public verb: ``qdiff.quantize(model, QuantConfig(...), calib_data)``.

Works on any ``nn.Module`` noise predictor called as ``eps = model(x_t, t, **cond)``. Stages, each usable
on its own: :func:`prepare` (detect splits, wrap, init weight ranges), activation-range init, and — for
``method="qdiff"`` — block reconstruction (:func:`qdiff.recon.reconstruct`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qdiff.models.base import unwrap_output
from qdiff.quant.config import QuantConfig
from qdiff.quant.layers import LAYER_REGISTRY
from qdiff.quant.split import execution_order, find_concat_splits
from qdiff.quant.wrap import LayerSpec, init_weight_quantizers, resolve_layer_specs, wrap_model


def default_forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    return unwrap_output(model(x, t, **(cond or {})))


def as_calibration(calib_data):
    """Accept a CalibrationSet/TensorCalibration or a tuple ``(x, t[, cond])`` of tensors."""
    from qdiff.calib.data import TensorCalibration

    if calib_data is None or hasattr(calib_data, "batches"):
        return calib_data
    if isinstance(calib_data, (tuple, list)) and len(calib_data) in (2, 3):
        return TensorCalibration(*calib_data)
    raise TypeError("calib_data must be a CalibrationSet, a TensorCalibration or a tuple (x, t[, cond])")


@torch.no_grad()
def prepare(model: nn.Module, cfg: QuantConfig, example: tuple[torch.Tensor, torch.Tensor, dict]) -> tuple[nn.Module, list[LayerSpec]]:
    """Detect shortcut splits and layer order on one example batch, wrap the layers, init weight ranges."""
    x, t, cond = example
    splits = find_concat_splits(model, (x, t), cond) if cfg.split else {}
    order = execution_order(model, (x, t), cond, types=tuple(LAYER_REGISTRY))
    specs = resolve_layer_specs(model, cfg, splits, order)
    q = wrap_model(model, cfg, specs)
    init_weight_quantizers(q, cfg.resolved_scale_method, cfg.lp)
    return q, specs


def quantize(model: nn.Module, config: QuantConfig, calib_data=None, recon=None, forward=default_forward,
             device: torch.device | str | None = None, work_dir: str | Path | None = None,
             act_init_samples: int = 256, progress: bool = True, probe=None) -> nn.Module:
    """A quantized copy of ``model`` (the original is untouched).

    ``calib_data`` is needed to detect shortcut splits, to set activation ranges and to reconstruct.
    ``method="linear"``: round-to-nearest with the configured ranges. ``method="qdiff"``: AdaRound weight
    reconstruction, then activation ranges and LSQ step sizes, block by block (``recon``: ReconConfig).
    ``probe(unet) -> final latents`` (a sampler run from fixed noise) is needed by ``recon.output_bias_match``.
    """
    from qdiff.errors import ConfigError

    if config.method == "fp":
        return model
    calib = as_calibration(calib_data)
    if calib is None:
        raise ConfigError("quantize needs calib_data (x_t, t[, cond]) to find shortcut splits and activation ranges")
    device = device or next(model.parameters()).device
    q, specs = prepare(model, config, calib.get([0, min(1, len(calib) - 1)], device))
    if config.method == "qdiff":
        from qdiff.recon import ReconConfig, reconstruct

        reconstruct(model, q, calib, config, recon or ReconConfig(), forward=forward, device=device,
                    work_dir=work_dir, progress=progress, probe=probe)
    elif config.quantizes_acts:
        from qdiff.quant.act_init import init_act_quantizers

        init_act_quantizers(q, forward, calib, config.resolved_scale_method, config.lp,
                            num_samples=act_init_samples, device=device, progress=progress)
    q.quant_specs = specs
    return q
