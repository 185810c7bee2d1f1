"""Sample grids and simple plots written into run directories."""
from __future__ import annotations

import math
from pathlib import Path

import torch


def save_grid(images: torch.Tensor, path: str | Path, n: int = 64) -> None:
    """First ``n`` images ([-1, 1]) as a square PNG grid."""
    from torchvision.utils import save_image

    n = min(n, images.shape[0])
    if n == 0:
        return
    nrow = max(1, int(math.ceil(math.sqrt(n))))
    save_image((images[:n].clamp(-1, 1) + 1) / 2, str(path), nrow=nrow, padding=1, pad_value=1.0)
