"""Typed evaluation settings (the ``eval/`` config group)."""
from __future__ import annotations

from dataclasses import dataclass

from qdiff.errors import ConfigError


@dataclass
class EvalConfig:
    #: Images generated per model for FID/IS. 1024 keeps digits FID within ~0.3 across seeds (README).
    n_samples: int = 1024
    #: Compute FID against the model's real images.
    fid: bool = True
    #: Compute the Inception Score (with the digits classifier for ``digits``).
    isc: bool = True
    #: IS splits (torch-fidelity default 10).
    isc_splits: int = 10
    #: Feature-extraction batch size.
    batch_size: int = 256
    #: Local InceptionV3 weights for RGB models (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
    #: or a .safetensors copy); ``None`` uses torch's hub cache and downloads when it is reachable.
    inception_weights: str | None = None
    #: Digits classifier weights used as torch-fidelity feature extractor; ``None`` = the bundled ones.
    digits_classifier: str | None = None
    #: Images in the saved sample grid.
    grid_size: int = 64
    #: Save all generated samples as ``samples.safetensors`` in the run directory.
    save_samples: bool = True
    #: Per-step FP-vs-quantized output MSE (paper Fig. 2) and activation ranges (Figs. 3, 6) for quantized runs.
    analysis: bool = True
    #: Images followed by the per-step MSE analysis.
    analysis_batch: int = 64

    def __post_init__(self) -> None:
        if self.n_samples < 2:
            raise ConfigError(f"eval.n_samples must be >= 2 (FID needs a covariance), got {self.n_samples}")
        if self.batch_size <= 0 or self.grid_size < 0 or self.analysis_batch <= 0:
            raise ConfigError("eval.batch_size and eval.analysis_batch must be > 0 and eval.grid_size >= 0")
        if self.isc_splits <= 0 or self.isc_splits > self.n_samples:
            raise ConfigError(f"eval.isc_splits must be in [1, n_samples], got {self.isc_splits}")
