"""The evaluate stage of a run: FID (with its bootstrap interval), IS, KID, precision/recall of the samples and
of the FP reference (same noise), the samples' paired error against FP, text-guided scores, the per-step error
analysis (Fig. 2, 3, 6) and the comparison figure ``samples.png``."""
from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from qdiff.cache import Entry, save_tensors
from qdiff.eval.fidelity import Scorer, to_uint8
from qdiff.models.base import DiffusionModel, fingerprint
from qdiff.sampling import generate, initial_noise

log = logging.getLogger("qdiff")


def evaluate(model: DiffusionModel, unet: nn.Module, samples: torch.Tensor, spec, prompts: list[str] | None,
             real: torch.Tensor | None, pre: dict, tracker, calib=None,
             deployed: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Scores of ``samples`` (made by ``unet``) and everything compared with FP; returns (scores, extra metrics).

    ``deployed``: the deployed artifact's samples from the same noise, scored next to the simulated ones."""
    scorer = Scorer(real, model.eval_kind, spec.eval, spec.device, pre.get("inception_weights"), spec.seed) \
        if real is not None and (spec.eval.fid or spec.eval.isc) else None

    def score(images: torch.Tensor) -> dict:
        return {} if scorer is None else scorer(images)

    scores, extra = score(samples), {}
    if deployed is not None:
        extra["deploy"] = {**score(deployed), "mse_vs_simulated": float(((deployed - samples) ** 2).mean()),
                           "max_abs_vs_simulated": float((deployed - samples).abs().max())}
    fp_samples = None
    if spec.quant.enabled:
        fp_samples, fp_hit = fp_reference(model, spec, prompts)
        extra["fp"] = {**score(fp_samples), "cache_hit": fp_hit}
        scores.update(paired(samples, fp_samples))
    if model.is_text_guided:
        from qdiff.eval.text import evaluate_text

        text = evaluate_text(model, unet, spec, prompts, samples, fp_samples, spec.output_dir, pre.get("clip", (None, None)),
                             tracker)
        if "clip_score" in text:
            scores["clip_score"] = text["clip_score"]
        if "fp_clip_score" in text:
            extra["fp"]["clip_score"] = text["fp_clip_score"]
        extra["text_eval"] = text["text_eval"]
    if spec.quant.enabled and spec.eval.analysis:
        extra["analysis"] = analysis(model, unet, spec, prompts, spec.output_dir, tracker)
    comparison_figure(model, unet, samples, fp_samples, scores, extra.get("fp", {}), spec, prompts, calib)
    return scores, extra


def paired(samples: torch.Tensor, fp_samples: torch.Tensor) -> dict:
    """Final-sample error against FP from the same noise: MSE and PSNR (images in [-1, 1], peak-to-peak 2)."""
    mse = float(((samples - fp_samples) ** 2).mean())
    return {"mse_vs_fp": mse, "psnr_vs_fp": 10 * math.log10(4 / mse) if mse > 0 else float("inf")}


def fp_reference(model: DiffusionModel, spec, prompts: list[str] | None) -> tuple[torch.Tensor, bool]:
    """FP samples for the same sampler/seed/count, cached by key (a quantized run compares against them)."""
    from qdiff.io import load_state_dict_file
    from qdiff.spec import conditions_key

    ident = {"weights": model.meta.get("fingerprint") or fingerprint(model.unet), "sampler": asdict(spec.sampler),
             "n": spec.eval.n_samples, "seed": spec.seed, "prompts": conditions_key(prompts)}
    entry = Entry(spec.cache_dir, "fp_samples", ident, suffix=".safetensors")
    with entry.locked("FP reference samples"):
        if entry.path.exists():
            return load_state_dict_file(entry.path)["samples"].float() / 127.5 - 1, True
        images = to_uint8(generate(model, model.unet, spec.sampler, spec.eval.n_samples, spec.seed, spec.device, prompts,
                                   desc="sampling fp reference"))
        save_tensors(entry.path, {"samples": images})
    return images.float() / 127.5 - 1, False


def analysis(model: DiffusionModel, qunet: nn.Module, spec, prompts: list[str] | None, out_dir: Path, tracker) -> dict:
    """Per-step MSE (Fig. 2) and FP activation ranges over timesteps (Figs. 3/6) as CSV + PNG."""
    from qdiff.eval.analysis import activation_ranges, plot_activation_ranges, plot_step_mse, step_mse

    n = min(spec.eval.analysis_batch, spec.eval.n_samples)
    mse = step_mse(model, model.unet, qunet, spec.sampler, n, spec.seed, spec.device, prompts)
    mse.to_csv(out_dir / "step_mse.csv", index=False)
    plot_step_mse({f"{spec.quant.method} {spec.quant.label}": mse}, out_dir / "step_mse.png")
    ranges = activation_ranges(model, model.unet, spec.sampler, min(n, 16), spec.seed, spec.device, prompts)
    ranges.to_csv(out_dir / "act_ranges.csv", index=False)
    plot_activation_ranges(ranges, out_dir / "act_ranges.png")
    tracker.log_table("step_mse_table", out_dir / "step_mse.csv", curve=("step", "mse_accumulated"))
    tracker.log_image("step_mse", out_dir / "step_mse.png")
    tracker.log_image("act_ranges", out_dir / "act_ranges.png")
    return {"step_mse_mean": float(mse["mse_accumulated"].mean()), "step_mse_last": float(mse["mse_accumulated"].iloc[-1]),
            "step_mse_local_mean": float(mse["mse_local"].mean())}


def comparison_figure(model: DiffusionModel, unet: nn.Module, samples: torch.Tensor, fp_samples: torch.Tensor | None,
                      scores: dict, fp_scores: dict, spec, prompts: list[str] | None, calib) -> None:
    """``samples.png``: FP | quantized | linear (a qdiff run with ``eval.grid_linear``), the same first noises,
    upscaled and labelled with FID."""
    from qdiff.eval.figures import save_comparison

    k = min(spec.eval.grid_size, samples.shape[0])
    if k == 0:
        return
    label = f"{spec.quant.method} {spec.quant.label}"
    panels = [(label + _fid(scores), samples[:k])]
    if fp_samples is not None:
        panels.insert(0, ("FP W32A32" + _fid(fp_scores), fp_samples[:k]))
    if spec.quant.method == "qdiff" and spec.eval.grid_linear and calib is not None:
        panels.append((f"linear {spec.quant.label} (same noise)", _linear_samples(model, spec, prompts, calib, k)))
    save_comparison(panels, spec.output_dir / "samples.png", spec.eval.grid_scale)


def _fid(scores: dict) -> str:
    return f", FID {scores['fid']:.3g}" if "fid" in scores else ""


def _linear_samples(model: DiffusionModel, spec, prompts: list[str] | None, calib, k: int) -> torch.Tensor:
    """The first ``k`` samples of the run's noise from the round-to-nearest baseline at the same bits."""
    from dataclasses import replace

    import qdiff

    lin = qdiff.quantize(model.unet, replace(spec.quant, method="linear", scale_method=None), calib, spec.recon,
                         device=spec.device, progress=False)
    noise = initial_noise(model.sample_shape, spec.eval.n_samples, spec.seed)
    return generate(model, lin, spec.sampler, k, spec.seed, spec.device, prompts, desc="sampling linear (figure)",
                    noise=noise)
