"""Real images for FID (CIFAR-10 / LSUN / COCO references), loaded into the [-1, 1] range the samplers produce."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qdiff.models.base import ModelConfigError, WeightsNotFoundError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_reference_images(path: str | Path, size: int, limit: int | None = None) -> torch.Tensor:
    """[N, 3, size, size] float tensor in [-1, 1] from a folder of images or an .npz/.safetensors tensor file.

    Tensor files may hold uint8 images (0..255, NHWC or NCHW, e.g. an ``arr_0`` of guided-diffusion style
    reference batches) or floats already in [-1, 1] / [0, 1]. Images are center-cropped and resized to ``size``.
    """
    if size <= 0:
        raise ModelConfigError(f"reference image size must be positive, got {size}")
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsNotFoundError(f"reference images path '{path}' does not exist; set model.reference to a folder of images or an .npz/.safetensors file")
    if path.is_dir():
        x = _from_folder(path, size, limit)
    elif path.suffix.lower() in (".npz", ".npy", ".safetensors"):
        x = _from_tensor_file(path, limit)
    else:
        raise ModelConfigError(f"reference '{path}' is neither a folder of images nor an .npz/.npy/.safetensors file")
    return _resize(x, size)


def _from_folder(path: Path, size: int, limit: int | None) -> torch.Tensor:
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise ModelConfigError(f"reference folder '{path}' holds no {'/'.join(IMAGE_SUFFIXES)} images")
    out = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = _center_crop(im.convert("RGB"))
                im = im.resize((size, size), Image.BICUBIC) if im.size != (size, size) else im
                out[i] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        except OSError as e:
            raise ModelConfigError(f"cannot read reference image '{f}': {e}") from None
    return out


def _center_crop(im: "Image.Image") -> "Image.Image":  # noqa: F821 - PIL is imported lazily
    w, h = im.size
    s = min(w, h)
    return im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


def _from_tensor_file(path: Path, limit: int | None) -> torch.Tensor:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            arrays = list(load_file(str(path)).values())
        elif path.suffix.lower() == ".npy":
            arrays = [torch.from_numpy(np.load(path, allow_pickle=False))]
        else:
            with np.load(path, allow_pickle=False) as data:
                arrays = [torch.from_numpy(data[k]) for k in data.files]
    except Exception as e:  # noqa: BLE001 - numpy/safetensors raise many types for unreadable files
        raise ModelConfigError(f"cannot read reference tensor file '{path}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    arrays = [a for a in arrays if a.dim() == 4]
    if not arrays:
        raise ModelConfigError(f"reference tensor file '{path}' holds no 4-D image array")
    x = arrays[0]
    if limit is not None:
        x = x[:limit]
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ModelConfigError(f"reference tensor in '{path}' has shape {tuple(x.shape)}; expected N images with 1 or 3 channels")
    return x


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.dtype == torch.uint8 or x.float().max() > 1.5:  # 0..255 pixels
        x = x.float() / 127.5 - 1.0
    else:
        x = x.float()
        if x.min() >= 0:  # [0, 1] floats
            x = x * 2 - 1
    if x.shape[-2:] != (size, size):
        h, w = x.shape[-2:]
        s = min(h, w)
        x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(-1, 1).contiguous()


__all__ = ["load_reference_images"]
