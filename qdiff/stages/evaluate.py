"""The evaluate stage of a run: scores the sample sets made by :mod:`qdiff.stages.sample` and draws from them; it
runs no model. FID (with its bootstrap interval), IS, KID, precision/recall of the run's samples, of the FP
reference and of the deployed artifact's; the samples' paired error against FP (and the deployed vs the simulated
model); CLIP score and the prompt grid for text-guided models; the per-step error and activation-range tables and
figures (paper Figs. 2, 3, 6); the comparison figure ``samples.png``."""
from __future__ import annotations

import math

import torch

from qdiff.eval.fidelity import Scorer
from qdiff.models.base import DiffusionModel
from qdiff.stages.sample import SampleSets


def evaluate(model: DiffusionModel, sets: SampleSets, spec, prompts: list[str] | None, real: torch.Tensor | None,
             pre: dict, tracker) -> tuple[dict, dict, dict]:
    """Scores of the run's samples and everything compared with them; returns (scores, extra metrics, features):
    features are the FID features of the run's samples and of the FP reference with the real set's statistics
    (:meth:`Scorer.feature_record`; empty without FID), from which a report computes paired statistics."""
    scorer = Scorer(real, model.eval_kind, spec.eval, spec.device, pre.get("inception_weights"), spec.seed) \
        if real is not None and (spec.eval.fid or spec.eval.isc) else None

    def score(images: torch.Tensor, keep: str | None = None) -> dict:
        return {} if scorer is None else scorer(images, keep)

    scores, extra = score(sets.samples, "samples"), {}
    if sets.deployed is not None:
        d = sets.deployed - sets.samples
        extra["deploy"] = {**score(sets.deployed), "mse_vs_simulated": float((d ** 2).mean()),
                           "max_abs_vs_simulated": float(d.abs().max())}
        if sets.timing is not None:
            extra["deploy"]["sampling"] = sets.timing
    if sets.fp is not None:
        extra["fp"] = {**score(sets.fp, "fp"), "cache_hit": sets.fp_cache_hit}
        scores.update(paired(sets.samples, sets.fp))
    if model.is_text_guided:
        from qdiff.eval.text import evaluate_text

        text = evaluate_text(spec, prompts, sets, spec.output_dir, pre.get("clip", (None, None)), tracker)
        if "clip_score" in text:
            scores["clip_score"] = text["clip_score"]
        if "fp_clip_score" in text:
            extra["fp"]["clip_score"] = text["fp_clip_score"]
        extra["text_eval"] = text["text_eval"]
    if sets.step_mse is not None:
        extra["analysis"] = analysis(sets, spec, tracker)
    comparison_figure(sets, scores, extra.get("fp", {}), spec)
    features = scorer.feature_record() if scorer is not None and spec.eval.fid else {}
    return scores, extra, features


def paired(samples: torch.Tensor, fp_samples: torch.Tensor) -> dict:
    """Final-sample error against FP from the same noise: MSE and PSNR (images in [-1, 1], peak-to-peak 2)."""
    mse = float(((samples - fp_samples) ** 2).mean())
    return {"mse_vs_fp": mse, "psnr_vs_fp": 10 * math.log10(4 / mse) if mse > 0 else float("inf")}


def analysis(sets: SampleSets, spec, tracker) -> dict:
    """Per-step MSE (Fig. 2) and FP activation ranges over timesteps (Figs. 3/6) as CSV + PNG."""
    from qdiff.eval.analysis import plot_activation_ranges, plot_step_mse

    out_dir, mse = spec.output_dir, sets.step_mse
    mse.to_csv(out_dir / "step_mse.csv", index=False)
    plot_step_mse({f"{spec.quant.method} {spec.quant.label}": mse}, out_dir / "step_mse.png")
    sets.act_ranges.to_csv(out_dir / "act_ranges.csv", index=False)
    plot_activation_ranges(sets.act_ranges, out_dir / "act_ranges.png")
    tracker.log_table("step_mse_table", out_dir / "step_mse.csv", curve=("step", "mse_accumulated"))
    tracker.log_image("step_mse", out_dir / "step_mse.png")
    tracker.log_image("act_ranges", out_dir / "act_ranges.png")
    return {"step_mse_mean": float(mse["mse_accumulated"].mean()), "step_mse_last": float(mse["mse_accumulated"].iloc[-1]),
            "step_mse_local_mean": float(mse["mse_local"].mean())}


def comparison_figure(sets: SampleSets, scores: dict, fp_scores: dict, spec) -> None:
    """``samples.png``: FP | the run's model | linear (a qdiff run with ``eval.grid_linear``), the same first noises,
    upscaled and labelled with FID."""
    from qdiff.eval.figures import save_comparison

    k = min(spec.eval.grid_size, sets.samples.shape[0])
    if k == 0:
        return
    label = f"{spec.quant.method} {spec.quant.label}"
    panels = [(label + _fid(scores), sets.samples[:k])]
    if sets.fp is not None:
        panels.insert(0, ("FP W32A32" + _fid(fp_scores), sets.fp[:k]))
    if sets.linear_panel is not None:
        panels.append((f"linear {spec.quant.label} (same noise)", sets.linear_panel))
    save_comparison(panels, spec.output_dir / "samples.png", spec.eval.grid_scale)


def _fid(scores: dict) -> str:
    return f", FID {scores['fid']:.3g}" if "fid" in scores else ""
