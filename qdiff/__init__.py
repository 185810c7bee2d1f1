"""qdiff: post-training quantization of diffusion models (Q-Diffusion), with experiment orchestration.

    import qdiff
    calib = qdiff.calibration_data(unet, scheduler, (C, H, W), T=100, c=5, n=64)
    qmodel = qdiff.quantize(unet, qdiff.QuantConfig(method="qdiff", weight_bits=4, act_bits=8), calib,
                            qdiff.ReconConfig.preset("cpu"))
    pipe = qdiff.quantize_pipeline(pipe, qdiff.QuantConfig(), calib=qdiff.CalibConfig(T=50, c=2, n=64))

Importing ``qdiff`` is light: every name below, and every subpackage (``qdiff.calib``, ``qdiff.quant``,
``qdiff.recon``, ``qdiff.deploy``, ...), is imported on first attribute access.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: Public names -> the module that defines them (imported on first access).
_NAMES = {
    "quantize": "qdiff.api",
    "calibration_data": "qdiff.calib.from_model",
    "quantize_pipeline": "qdiff.pipelines",
    "save_pipeline": "qdiff.pipelines",
    "load_pipeline": "qdiff.pipelines",
    "export": "qdiff.deploy",
    "load_deployed": "qdiff.deploy",
    "QuantConfig": "qdiff.quant.config",
    "CalibConfig": "qdiff.calib.config",
    "ReconConfig": "qdiff.recon.config",
    "SamplerConfig": "qdiff.sampling.config",
    "ConfigError": "qdiff.errors",
    "CheckpointError": "qdiff.errors",
    "DataError": "qdiff.errors",
}
#: Subpackages and modules reachable as ``qdiff.<name>`` after a bare ``import qdiff``.
_SUBMODULES = ("api", "cache", "calib", "deploy", "errors", "eval", "io", "launch", "models", "pipelines", "quant",
               "recon", "report", "runtime", "sampling", "testing")


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"qdiff.{name}")
    else:
        raise AttributeError(f"module 'qdiff' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_NAMES, *_SUBMODULES})


__all__ = [*_NAMES, "__version__"]
