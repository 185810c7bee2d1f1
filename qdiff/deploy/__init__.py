"""Deployment: one packed artifact (``export``), several backends to run it (``load_deployed``).

    qdiff.export(qmodel, "w4a8/")                              # safetensors + JSON, packed integer weights
    unet = qdiff.load_deployed("w4a8/", backend="int8")         # no FP checkpoint needed; unet(x_t, t, **cond)

Backends: ``simulated`` (qdiff's fake-quantized network, exactly the calibrated model) and ``int8`` (integer
kernels on CPU through PyTorch's x86 int8 lowering, with the artifact's own integers and step sizes).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qdiff.deploy.artifact import Artifact, artifact_sizes, export

BACKENDS = ("simulated", "int8")


def load_deployed(path: str | Path, backend: str = "simulated", device: torch.device | str = "cpu", **options) -> nn.Module:
    """The network stored in the artifact at ``path``, called like the original: ``model(x_t, t, **cond)``."""
    from qdiff.errors import ConfigError

    if backend not in BACKENDS:
        raise ConfigError(f"unknown deploy backend '{backend}'; known: {', '.join(BACKENDS)}")
    if backend == "int8" and torch.device(device).type != "cpu":
        raise ConfigError(f"the int8 backend runs PyTorch's x86 (oneDNN) int8 kernels on the CPU, not on {device}; "
                          "use backend='simulated' there")
    art = Artifact(path)
    from qdiff.deploy.simulated import load_simulated

    model = load_simulated(art, "cpu" if backend == "int8" else device)
    if backend == "int8":
        from qdiff.deploy.int8 import lower_int8

        return lower_int8(model, **options)
    return model


__all__ = ["BACKENDS", "Artifact", "artifact_sizes", "export", "load_deployed"]
