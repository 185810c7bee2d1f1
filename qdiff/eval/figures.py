"""Sample figures written into run directories: the FP-vs-quantized comparison and the prompt grid."""
from __future__ import annotations

import math
from pathlib import Path

import torch


def _tile(images: torch.Tensor, nrow: int, scale: int = 1) -> "Image.Image":  # noqa: F821 - PIL imported lazily
    """Images in [-1, 1] as one RGB grid with ``nrow`` per row, upscaled ``scale`` times (nearest: pixels stay sharp)."""
    from PIL import Image
    from torchvision.utils import make_grid

    g = make_grid(((images.clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1), nrow=nrow, padding=2, pad_value=1.0)
    im = Image.fromarray(g.mul(255).round().byte().permute(1, 2, 0).numpy())
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im


def save_comparison(panels: list[tuple[str, torch.Tensor]], path: str | Path, scale: int = 1) -> None:
    """Labelled sample grids side by side (e.g. FP | quantized | linear from the same noise) as one PNG."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line, gap = 16, 16
    tiles = [(label, _tile(images, max(1, int(math.ceil(math.sqrt(images.shape[0])))), scale)) for label, images in panels]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [max(im.width, int(measure.textlength(label, font=font)) + 4) for label, im in tiles]
    canvas = Image.new("RGB", (sum(widths) + gap * (len(tiles) - 1), line + max(im.height for _, im in tiles)), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for (label, im), w in zip(tiles, widths):
        draw.text((x + 2, 2), label, fill="black", font=font)
        canvas.paste(im, (x, line))
        x += w + gap
    canvas.save(str(path))


def save_prompt_grid(rows: list[tuple[str, list[torch.Tensor]]], labels: list[str], path: str | Path) -> None:
    """Side-by-side samples per prompt (the layout of the paper's Figures 5, 9, 10) as one PNG.

    ``rows``: (prompt, [images of model 1, images of model 2, ...]) with images [n, C, H, W] in [-1, 1], the
    same n and noise for every model; ``labels`` names the models over their columns.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, gap, line = 4, 12, 14

    tiles = [(prompt, [_tile(g, g.shape[0]) for g in groups]) for prompt, groups in rows]
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
