"""The report stage of one run: ``metrics.json`` (the record every sweep report reads), the samples, W&B."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from qdiff.io import write_json


def run_metrics(spec, model, scores: dict, extra: dict, cost: dict) -> dict:
    """The run's flat record: scores, settings that identify it, stage results, cost and provenance."""
    return {
        **scores,
        "n_samples": spec.eval.n_samples,
        "model": spec.model.name,
        "sampler": spec.sampler.name,
        "steps": spec.sampler.steps,
        "quant": spec.quant.label,
        "method": spec.quant.method,
        "transforms": "+".join(spec.quant.transforms),
        "weight_bits": spec.quant.weight_bits,
        "act_bits": spec.quant.act_bits,
        "split": spec.quant.split,
        "calib_mode": spec.calib.mode,
        "seed": spec.seed,
        # the reconstruction's own seed and input source (qdiff runs), which a report's rows tell apart
        **({"recon_seed": spec.recon.seed, "input_source": spec.recon.input_source} if spec.quant.method == "qdiff" else {}),
        **extra,
        "cost": cost,
        "model_meta": model.meta,
        "device": str(spec.device),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "task_name": spec.task_name,
        "output_dir": str(spec.output_dir),
    }


#: A run's FID features (its samples', the FP reference's) and the real set's statistics: what
#: :mod:`qdiff.report.paired` computes paired recovered shares from.
FEATURES_FILE = "eval_features.safetensors"


def write_run(out_dir: Path, samples: torch.Tensor, features: dict, spec, metrics: dict, tracker) -> None:
    """``metrics.json`` last (its presence marks a finished run), after the samples and features; then W&B."""
    from qdiff.cache import save_tensors
    from qdiff.eval.fidelity import to_uint8

    if spec.eval.save_samples:
        save_tensors(out_dir / "samples.safetensors", {"samples": to_uint8(samples)})
    if features and spec.eval.save_features:
        save_tensors(out_dir / FEATURES_FILE, features)
    write_json(out_dir / "metrics.json", metrics)
    tracker.log_metrics(metrics)
    grid = out_dir / "samples.png"
    if grid.exists():
        tracker.log_image("samples", grid, caption=f"{spec.model.name} {spec.quant.method} {spec.quant.label} vs FP")
