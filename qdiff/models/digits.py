"""The embedded default model: a small diffusers UNet trained on scikit-learn's bundled digits.

It has what the paper's UNets have (ResBlocks with a time embedding, an attention level, skip
concatenations in the up path) at a size that trains, calibrates and samples on a laptop CPU.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

WEIGHTS_DIR = Path(__file__).parent / "weights"
UNET_WEIGHTS = WEIGHTS_DIR / "digits_unet.safetensors"
CLASSIFIER_WEIGHTS = WEIGHTS_DIR / "digits_classifier.safetensors"

IMAGE_SIZE = 16

#: Architecture of the embedded UNet (diffusers ``UNet2DModel`` kwargs), 1.11 M parameters.
UNET_CONFIG: dict = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
)

#: The embedded transformer (diffusers ``DiTTransformer2DModel`` kwargs): DiT's design (adaLN-Zero blocks, patch 2,
#: a class-label embedding with a null class for classifier-free guidance) at digits size, 16x16 -> 64 tokens.
DIT_CONFIG: dict = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,
    patch_size=2,
    num_attention_heads=4,
    attention_head_dim=16,
    num_layers=6,
    num_embeds_ada_norm=10,
    norm_type="ada_norm_zero",
    activation_fn="gelu-approximate",
)
DIT_WEIGHTS = WEIGHTS_DIR / "digits_dit.safetensors"
#: Classes of the digits (0-9); DiT's label embedding holds one more row, the null class of CFG's unconditional branch.
NUM_CLASSES = 10

#: Training noise schedule (diffusers scheduler config) shared by training and every sampler.
SCHEDULER_CONFIG: dict = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    clip_sample=True,
    prediction_type="epsilon",
)


def load_digits_images(size: int = IMAGE_SIZE) -> torch.Tensor:
    """All 1797 scikit-learn digits as a float tensor [N, 1, size, size] in [-1, 1] (no download)."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images).float().unsqueeze(1) / 16.0
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous()


def load_digits_labels() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().target).long()


def build_digits_unet():
    """The embedded UNet with random weights."""
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


def build_digits_dit(**overrides):
    """The embedded DiT with random weights."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**{**DIT_CONFIG, **overrides})


class DigitsClassifier(torch.nn.Module):
    """Small CNN on 16x16 digits; its penultimate features drive FID and its logits drive IS."""

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, self.feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1], shape [B, 1, 16, 16] -> (features, logits)."""
        f = self.body(x)
        return f, self.head(f)

    def layers(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every candidate feature layer for FID (docs/results-digits.md: which reads best): each
        conv block's activations averaged globally (``*_gap``: 32, 32, 64-d) and over 2x2 quadrants (``*_pool2``:
        128, 128, 256-d), the flattened last pool (1024-d), the penultimate layer before and after its ReLU
        (128-d) and the logits (10-d)."""
        out: dict[str, torch.Tensor] = {}
        h = x
        names = {1: "conv1", 3: "conv2", 6: "conv3", 8: "pool_flat", 9: "fc_pre", 10: "fc"}
        for i, m in enumerate(self.body):
            h = m(h)
            if h.dim() == 4 and i in names:
                out[f"{names[i]}_gap"] = h.mean((2, 3))
                out[f"{names[i]}_pool2"] = torch.nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)
            elif i in names:
                out[names[i]] = h
        out["logits"] = self.head(h)
        return out
