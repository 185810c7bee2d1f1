"""Evaluation of text-guided models: CLIP score of the samples, and a fixed-prompt FP-vs-quantized grid."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from qdiff.models.base import DiffusionModel

log = logging.getLogger("qdiff")


def evaluate_text(model: DiffusionModel, unet: nn.Module, spec, prompts: Sequence[str], samples: torch.Tensor,
                  fp_samples: torch.Tensor | None, out_dir: Path, clip: tuple[str | None, str | None],
                  tracker=None) -> dict:
    """CLIP scores and ``prompts_grid.png`` for one run.

    ``unet`` is what was sampled (the quantized UNet, or the FP one in an FP run); ``fp_samples`` are the FP
    model's samples for the same prompts and noise (None in an FP run); ``clip`` is
    :func:`qdiff.eval.clip.resolve_clip_model`'s answer from preflight. Returns ``clip_score`` (float or None),
    ``fp_clip_score`` (when ``fp_samples`` is given) and a ``text_eval`` summary.
    """
    ev = spec.eval
    out: dict = {"text_eval": {}}
    if ev.clip_score:
        from qdiff.eval.clip import clip_score, load_clip_scorer

        source, note = clip
        scorer = None
        if source is not None:
            scorer, note = load_clip_scorer(source, spec.device)
        if scorer is None:
            if source is not None:  # unavailable weights were already reported by preflight
                log.warning("CLIP score skipped: %s", note)
            out["clip_score"] = None
            if fp_samples is not None:
                out["fp_clip_score"] = None
            out["text_eval"].update(clip_model=ev.clip_model, clip_note=note)
        else:
            out["clip_score"] = clip_score(scorer, samples, prompts, ev.batch_size)
            if fp_samples is not None:
                out["fp_clip_score"] = clip_score(scorer, fp_samples, prompts, ev.batch_size)
            out["text_eval"]["clip_model"] = source
            del scorer
    if ev.prompts_grid:
        out["text_eval"]["prompts_grid"] = prompts_grid(model, unet, spec, out_dir / "prompts_grid.png", fp_samples is not None)
        if tracker is not None:
            tracker.log_image("prompts_grid", out_dir / "prompts_grid.png", caption=" | ".join(ev.prompts_grid))
    return out


def prompts_grid(model: DiffusionModel, unet: nn.Module, spec, path: Path, compare_fp: bool) -> dict:
    """Sample ``eval.prompts_grid_n`` images per fixed prompt with the FP and (if ``compare_fp``) the given UNet."""
    from qdiff.eval.figures import save_prompt_grid
    from qdiff.sampling import generate

    ev = spec.eval
    n = ev.prompts_grid_n
    grid_prompts = [p for p in ev.prompts_grid for _ in range(n)]
    runs = [("FP W32A32", model.unet)]
    if compare_fp:
        runs.append((f"{spec.quant.method} {spec.quant.label}", unet))
    images = [generate(model, u, spec.sampler, len(grid_prompts), spec.seed, spec.device, grid_prompts,
                       desc=f"prompts grid {label}") for label, u in runs]
    rows = [(p, [im[i * n:(i + 1) * n] for im in images]) for i, p in enumerate(ev.prompts_grid)]
    save_prompt_grid(rows, [label for label, _ in runs], path)
    return {"path": str(path), "prompts": list(ev.prompts_grid), "n_per_prompt": n, "columns": [label for label, _ in runs],
            "seed": spec.seed}
