"""CLIP score of text-guided samples: torchmetrics' ``CLIPScore`` with weights from a local folder or the hub cache.

Missing CLIP weights never stop a run: :func:`resolve_clip_model` finds out without downloading anything and
returns a one-line note instead, and the pipeline records ``clip_score: null``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

log = logging.getLogger("qdiff")


def resolve_clip_model(name: str) -> tuple[str | None, str | None]:
    """``(source, None)`` when CLIP weights ``name`` can be loaded, else ``(None, note)``; never downloads."""
    from qdiff.models.hub import hub_cached, hub_offline, hub_reachable

    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), None
        return None, (f"eval.clip_model '{name}' holds no config.json "
                      "(expected a CLIPModel + CLIPProcessor saved with save_pretrained)")
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        return None, f"eval.clip_model '{name}' does not exist; point it at a local CLIP folder"
    if hub_cached(name, ("",)):
        return name, None
    if hub_offline() or not hub_reachable():
        return None, (f"CLIP weights '{name}' are not in the local hub cache and the hub cannot be reached; "
                      "download them elsewhere and set eval.clip_model=/path/to/the/folder")
    return name, None


class _TensorFeatures(nn.Module):
    """A CLIPModel whose ``get_*_features`` return tensors, as torchmetrics expects.

    transformers >= 5 returns a model output with the projected embedding in ``pooler_output``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def load_clip_scorer(source: str, device: torch.device | str):
    """torchmetrics ``CLIPScore`` on ``device`` with the weights at ``source``; ``(scorer, None)`` or ``(None, note)``."""
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    from qdiff.models.hub import first_line, load_errors

    local = Path(source).expanduser().is_dir()

    def load():
        kw = {"local_files_only": True} if local else {}
        return _TensorFeatures(CLIPModel.from_pretrained(source, **kw).eval()), CLIPProcessor.from_pretrained(source, **kw)

    try:
        return CLIPScore(model_name_or_path=load).to(device), None
    except load_errors(RuntimeError, KeyError) as e:
        return None, f"cannot load CLIP weights '{source}' ({first_line(e, type(e).__name__)})"


@torch.no_grad()
def clip_score(scorer, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 64) -> float:
    """Mean CLIP score (torchmetrics: 100 x cosine similarity, floored at 0) of images in [-1, 1] vs their prompts."""
    from qdiff.eval.fidelity import to_uint8

    if len(prompts) < images.shape[0]:
        raise ValueError(f"CLIP score needs a prompt per image: {images.shape[0]} images, {len(prompts)} prompts")
    scorer.reset()
    device = scorer.device
    for s in range(0, images.shape[0], batch_size):
        batch = to_uint8(images[s:s + batch_size]).to(device)
        scorer.update(batch, list(prompts[s:s + batch_size]))
    return round(float(scorer.compute()), 4)
