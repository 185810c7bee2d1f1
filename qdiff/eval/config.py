"""Typed evaluation settings (the ``eval/`` config group)."""
from __future__ import annotations

from dataclasses import dataclass, field

from qdiff.errors import ConfigError, check_switches

#: The digits classifier's layers a digits FID can be computed on (qdiff.models.digits.DigitsClassifier.layers).
DIGITS_LAYERS = ("conv1_gap", "conv1_pool2", "conv2_gap", "conv2_pool2", "conv3_gap", "conv3_pool2", "pool_flat", "fc_pre",
                 "fc", "logits")
#: The prompts of the paper's Stable Diffusion figures (Figures 9 and 10).
PAPER_PROMPTS = ("A puppy wearing a hat.", "Cluttered house in the woods in anime oil painting style.")


@dataclass
class EvalConfig:
    #: Images generated per model for FID/IS. 1024 keeps digits FID within ~0.3 across seeds (docs/results-digits.md).
    n_samples: int = 1024
    #: Compute FID against the model's real images.
    fid: bool = True
    #: Compute the Inception Score (with the digits classifier for ``digits``).
    isc: bool = True
    #: IS splits; None = torch-fidelity's 10, or n_samples when fewer.
    isc_splits: int | None = None
    #: Feature-extraction batch size.
    batch_size: int = 256
    #: Local InceptionV3 weights for RGB models (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
    #: or a .safetensors copy); ``None`` uses torch's hub cache and downloads when it is reachable.
    inception_weights: str | None = None
    #: Digits classifier weights used as torch-fidelity feature extractor; ``None`` = the bundled ones.
    digits_classifier: str | None = None
    #: The digits classifier's layer whose features FID, KID and precision/recall compare (DIGITS_LAYERS).
    digits_feature: str = "conv2_pool2"
    #: Kernel Inception Distance (mean and std over subsets of up to 1000) with the FID features.
    kid: bool = True
    #: Precision and recall (k-NN manifolds, k = 3) with the FID features.
    prc: bool = True
    #: Resamples of the generated set for FID's 95 % bootstrap interval (0: none).
    bootstrap: int = 100
    #: Images per model in ``samples.png`` (FP | quantized | linear, from the same noise).
    grid_size: int = 64
    #: Upscaling of those images (nearest neighbour), so that small images stay readable.
    grid_scale: int = 4
    #: In a qdiff run, also sample the grid's images with round-to-nearest at the same bits (a few seconds).
    grid_linear: bool = True
    #: Save all generated samples as ``samples.safetensors`` in the run directory.
    save_samples: bool = True
    #: Save the FID features of the samples and of the FP reference, with the real set's statistics, as
    #: ``eval_features.safetensors``: ``qdiff.report`` computes paired recovered shares and intervals from them
    #: (digits: ~3 MB per run; InceptionV3: 2048-d features and a 2048² covariance, ~35 MB).
    save_features: bool = True
    #: Per-step FP-vs-quantized output MSE (paper Fig. 2) and activation ranges (Figs. 3, 6) for quantized runs.
    analysis: bool = True
    #: Images followed by the per-step MSE analysis.
    analysis_batch: int = 32
    #: Text-guided models: fixed prompts drawn side by side as ``prompts_grid.png`` (one row per prompt: FP
    #: images, then quantized ones from the same noise). Default: the paper's Figure 9/10 prompts; [] = no grid.
    prompts_grid: list = field(default_factory=lambda: list(PAPER_PROMPTS))
    #: Images per prompt and per model in that grid.
    prompts_grid_n: int = 4
    #: Text-guided models: CLIP score (torchmetrics' CLIPScore, 100 x image-text cosine similarity) of the
    #: samples against their prompts, for the quantized and the FP model. Null in metrics.json when the
    #: CLIP weights cannot be found (a one-line note is logged; the run goes on).
    clip_score: bool = True
    #: CLIP weights: a local folder (a transformers CLIPModel + CLIPProcessor saved with save_pretrained) or a
    #: hub id, taken from the local hub cache when offline.
    clip_model: str = "openai/clip-vit-large-patch14"

    def __post_init__(self) -> None:
        check_switches(self, "eval")
        if self.n_samples < 2:
            raise ConfigError(f"eval.n_samples must be >= 2 (FID needs a covariance), got {self.n_samples}")
        if self.batch_size <= 0 or self.grid_size < 0 or self.analysis_batch <= 0 or self.grid_scale < 1:
            raise ConfigError("eval.batch_size, eval.analysis_batch and eval.grid_scale must be > 0 and eval.grid_size >= 0")
        if self.digits_feature not in DIGITS_LAYERS:
            raise ConfigError(f"eval.digits_feature must be one of {', '.join(DIGITS_LAYERS)}, got '{self.digits_feature}'")
        if self.bootstrap < 0:
            raise ConfigError(f"eval.bootstrap must be >= 0, got {self.bootstrap}")
        if self.isc_splits is None:
            self.isc_splits = min(10, self.n_samples)
        if self.isc_splits <= 0 or self.isc_splits > self.n_samples:
            raise ConfigError(f"eval.isc_splits must be in [1, n_samples], got {self.isc_splits}")
        if self.prompts_grid is None:
            self.prompts_grid = []
        if not isinstance(self.prompts_grid, (list, tuple)) or \
                not all(isinstance(p, str) and p.strip() for p in self.prompts_grid):
            raise ConfigError(f"eval.prompts_grid must be a list of non-empty prompts, got {self.prompts_grid!r}")
        self.prompts_grid = [p.strip() for p in self.prompts_grid]
        if not isinstance(self.prompts_grid_n, int) or self.prompts_grid_n < 1:
            raise ConfigError(f"eval.prompts_grid_n must be >= 1, got {self.prompts_grid_n!r}")
        if not isinstance(self.clip_model, str) or not self.clip_model.strip():
            raise ConfigError("eval.clip_model must name CLIP weights (a local folder or a hub id)")
