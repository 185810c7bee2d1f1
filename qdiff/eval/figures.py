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


def save_prompt_grid(rows: list[tuple[str, list[torch.Tensor]]], labels: list[str], path: str | Path) -> None:
    """Side-by-side samples per prompt (the layout of the paper's Figures 5, 9, 10) as one PNG.

    ``rows``: (prompt, [images of model 1, images of model 2, ...]) with images [n, C, H, W] in [-1, 1], the
    same n and noise for every model; ``labels`` names the models over their columns.
    """
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, gap, line = 4, 12, 14

    def to_pil(images: torch.Tensor) -> Image.Image:
        g = make_grid(((images.clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1), nrow=images.shape[0], padding=2, pad_value=1.0)
        return Image.fromarray(g.mul(255).round().byte().permute(1, 2, 0).numpy())

    tiles = [(prompt, [to_pil(g) for g in groups]) for prompt, groups in rows]
    widths = [max(max(t[1][k].width for t in tiles), int(measure.textlength(label, font=font)) + 2 * pad)
              for k, label in enumerate(labels)]
    xs = [sum(widths[:k]) + gap * k for k in range(len(widths))]
    width = max(xs[-1] + widths[-1], max(int(measure.textlength(f'"{p}"', font=font)) + 2 * pad for p, _ in tiles))
    height = line + pad + sum(line + pad + max(im.height for im in ims) for _, ims in tiles)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for x, label in zip(xs, labels):
        draw.text((x + pad, 1), label, fill="black", font=font)
    y = line + pad
    for prompt, ims in tiles:
        draw.text((pad, y), f'"{prompt}"', fill="black", font=font)
        y += line
        for x, im in zip(xs, ims):
            canvas.paste(im, (x, y))
        y += max(im.height for im in ims) + pad
    canvas.save(str(path))
