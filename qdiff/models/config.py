"""Typed model settings (the ``model/`` config group)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    #: Registry key: digits, ddim_cifar10, ldm_bedroom, ldm_church, sd14.
    name: str = "digits"
    #: Where the weights are: a diffusers hub id, a local diffusers folder, or an original checkpoint file.
    #: ``None`` uses the model's own default (the embedded weights for ``digits``).
    source: str | None = None
    #: Build the same architecture with random weights (smoke tests, offline CI). Never silently enabled.
    random_init: bool = False
    #: Overrides of the architecture config, e.g. ``{block_out_channels: [32, 64]}`` for width-reduced tests.
    arch: dict | None = field(default_factory=dict)
    #: Classifier-free guidance strength (text-guided models only).
    guidance_scale: float = 7.5
    #: Caption file for text-guided calibration/evaluation: COCO annotation JSON, or a TSV/TXT of captions.
    prompts: str | None = None
    #: Real images for FID: a folder of images or an .npz/.pt/.safetensors tensor; digits uses its bundled data.
    reference: str | None = None
    #: Weights dtype of the FP parts that are not quantized (vae, text encoder): float32 | float16 | bfloat16.
    dtype: str = "float32"
    #: Ask the hub only for files already cached locally (no network).
    local_files_only: bool = False

    def __post_init__(self) -> None:
        from qdiff.models.base import ModelConfigError

        if self.arch is None:
            self.arch = {}
        if not isinstance(self.arch, dict):
            raise ModelConfigError(f"model.arch must be a mapping of architecture overrides, got {type(self.arch).__name__}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ModelConfigError(f"model.dtype must be float32, float16 or bfloat16, got '{self.dtype}'")
        if self.guidance_scale < 0:
            raise ModelConfigError(f"model.guidance_scale must be >= 0, got {self.guidance_scale}")
