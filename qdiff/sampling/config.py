"""Typed sampler settings (the ``sampler/`` config group)."""
from __future__ import annotations

from dataclasses import dataclass

from qdiff.errors import ConfigError

SAMPLERS = ("ddim", "ddpm", "plms", "dpm_solver")
#: Not a named sampler: the scheduler class recorded in the scheduler config itself (``_class_name``), e.g. a
#: diffusers pipeline's own scheduler (``qdiff.calibration_data``, ``qdiff.quantize_pipeline``).
FROM_CONFIG = "from_config"


@dataclass
class SamplerConfig:
    #: ddim | ddpm | plms | dpm_solver (all diffusers schedulers on the model's training noise schedule), or
    #: from_config: the class named by the scheduler config's ``_class_name`` (any diffusers scheduler).
    name: str = "ddim"
    #: Number of denoising steps.
    steps: int = 100
    #: DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like); ignored by other samplers.
    eta: float = 0.0
    #: Images denoised together; memory, not results, depends on it.
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS and self.name != FROM_CONFIG:
            raise ConfigError(f"unknown sampler '{self.name}'; known: {', '.join(SAMPLERS)}")
        if self.steps <= 0:
            raise ConfigError(f"sampler.steps must be > 0, got {self.steps}")
        if self.batch_size <= 0:
            raise ConfigError(f"sampler.batch_size must be > 0, got {self.batch_size}")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"sampler.eta must be in [0, 1], got {self.eta}")
