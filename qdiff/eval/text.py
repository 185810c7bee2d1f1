"""Evaluation of text-guided models: CLIP score of the samples, and the fixed-prompt FP-vs-quantized grid's figure
(its images are made by the sample stage, :func:`qdiff.stages.sample.prompt_grid`)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

log = logging.getLogger("qdiff")


def evaluate_text(spec, prompts: Sequence[str], sets, out_dir: Path, clip: tuple[str | None, str | None],
                  tracker=None) -> dict:
    """CLIP scores of the sample sets and ``prompts_grid.png`` from the grid the sample stage made.

    ``sets``: :class:`qdiff.stages.sample.SampleSets` (``fp`` is None in an FP run); ``clip`` is
    :func:`qdiff.eval.clip.resolve_clip_model`'s answer from preflight. Returns ``clip_score`` (float or None),
    ``fp_clip_score`` (when there is an FP reference) and a ``text_eval`` summary.
    """
    ev = spec.eval
    samples, fp_samples = sets.samples, sets.fp
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
    if sets.prompt_grid is not None:
        from qdiff.eval.figures import save_prompt_grid

        rows, labels = sets.prompt_grid
        path = out_dir / "prompts_grid.png"
        save_prompt_grid(rows, labels, path)
        out["text_eval"]["prompts_grid"] = {"path": str(path), "prompts": list(ev.prompts_grid),
                                            "n_per_prompt": ev.prompts_grid_n, "columns": labels, "seed": spec.seed}
        if tracker is not None:
            tracker.log_image("prompts_grid", path, caption=" | ".join(ev.prompts_grid))
    return out
