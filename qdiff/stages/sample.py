"""The sample stage of a run: every set of samples the run needs is made here, and nowhere else.

* the run's own samples (the quantized model, or the FP model in an FP run);
* the FP reference of a quantized run: the FP model from the same noise, cached by key (every quantized run of that
  sampler, seed and count compares against the same set);
* the deployed artifact's samples (``deploy=``), from the same noise — with ``deploy.timing`` batch by batch in turn
  with FP eager and FP compiled for the sampling-time comparison;
* for the figure ``samples.png``: the first samples of the round-to-nearest baseline at the same bits
  (``eval.grid_linear``, qdiff runs);
* for text-guided models: the fixed-prompt grid (``eval.prompts_grid``), FP and quantized;
* the per-step error trajectories and activation ranges (paper Figs. 2, 3, 6; ``eval.analysis``).

The evaluate stage (:mod:`qdiff.stages.evaluate`) only scores these and draws from them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import pandas as pd
import torch
from torch import nn

from qdiff.cache import Entry, save_tensors
from qdiff.models.base import DiffusionModel, fingerprint
from qdiff.sampling import generate, initial_noise


@dataclass
class SampleSets:
    #: The run's samples, in [-1, 1].
    samples: torch.Tensor
    #: The FP reference (quantized runs) and whether it came from the cache.
    fp: torch.Tensor | None = None
    fp_cache_hit: bool | None = None
    #: The deployed artifact's samples (``deploy=``).
    deployed: torch.Tensor | None = None
    #: ``deploy.timing``: seconds per sampling batch of FP eager/compiled, simulated and deployed.
    timing: dict | None = None
    #: The round-to-nearest baseline's first samples, for the comparison figure.
    linear_panel: torch.Tensor | None = None
    #: Text models: (prompt, [images per column]) rows and the column labels of the prompt grid.
    prompt_grid: tuple[list, list[str]] | None = None
    #: Per-step FP-vs-quantized error (Fig. 2) and FP activation ranges (Figs. 3/6).
    step_mse: pd.DataFrame | None = None
    act_ranges: pd.DataFrame | None = None


def sample(model: DiffusionModel, unet: nn.Module, spec, prompts: list[str] | None, calib=None,
           deployed: nn.Module | None = None, variants: dict[str, nn.Module] | None = None) -> SampleSets:
    """Every sample set of the run (see the module docstring). ``deployed``/``variants`` come from the deploy stage."""
    label = f"{spec.quant.method} {spec.quant.label}"
    if deployed is None:
        sets = SampleSets(generate(model, unet, spec.sampler, spec.eval.n_samples, spec.seed, spec.device, prompts,
                                   desc=f"sampling {label}"))
    elif spec.deploy.timing:
        from qdiff.deploy.stage import sample_interleaved

        both, timing = sample_interleaved(model, variants, ("simulated", "deployed"), spec, prompts,
                                          spec.deploy.timing_batches)
        sets = SampleSets(both["simulated"], deployed=both["deployed"], timing=timing)
    else:  # the same noise: generate draws it from the seed
        sets = SampleSets(generate(model, unet, spec.sampler, spec.eval.n_samples, spec.seed, spec.device, prompts,
                                   desc=f"sampling {label}"),
                          deployed=generate(model, deployed, spec.sampler, spec.eval.n_samples, spec.seed, spec.device,
                                            prompts, desc=f"sampling {label} ({spec.deploy.backend} artifact)"))
    if spec.quant.enabled:
        sets.fp, sets.fp_cache_hit = fp_reference(model, spec, prompts)
    if model.is_text_guided and spec.eval.prompts_grid:
        sets.prompt_grid = prompt_grid(model, unet, spec, compare=spec.quant.enabled)
    if spec.quant.enabled and spec.eval.analysis:
        from qdiff.eval.analysis import activation_ranges, step_mse

        n = min(spec.eval.analysis_batch, spec.eval.n_samples)
        sets.step_mse = step_mse(model, model.unet, unet, spec.sampler, n, spec.seed, spec.device, prompts)
        sets.act_ranges = activation_ranges(model, model.unet, spec.sampler, min(n, 16), spec.seed, spec.device, prompts)
    k = min(spec.eval.grid_size, spec.eval.n_samples)
    if spec.quant.method == "qdiff" and spec.eval.grid_linear and calib is not None and k > 0:
        sets.linear_panel = linear_samples(model, spec, prompts, calib, k)
    return sets


def fp_reference(model: DiffusionModel, spec, prompts: list[str] | None) -> tuple[torch.Tensor, bool]:
    """FP samples for the same sampler/seed/count, cached by key (a quantized run compares against them)."""
    from qdiff.eval.fidelity import to_uint8
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


def linear_baseline(quant):
    """The round-to-nearest baseline of a quantization config: same bits, layers and splits, none of the transforms."""
    return replace(quant, method="linear", scale_method=None, smooth=None, lowrank=0, act_time_groups=1,
                   weight_group_size=0, act_dynamic=False)


def linear_samples(model: DiffusionModel, spec, prompts: list[str] | None, calib, k: int) -> torch.Tensor:
    """The first ``k`` samples of the run's noise from the round-to-nearest baseline at the same bits: plain
    round-to-nearest, without the run's transforms (smoothing, low-rank branch, time groups, group-wise or dynamic
    scales), as the ``quant.method=linear`` row of the same bits."""
    import qdiff

    lin = qdiff.quantize(model.unet, linear_baseline(spec.quant), calib, spec.recon, device=spec.device, progress=False)
    noise = initial_noise(model.sample_shape, spec.eval.n_samples, spec.seed)
    return generate(model, lin, spec.sampler, k, spec.seed, spec.device, prompts, desc="sampling linear (figure)",
                    noise=noise)


def prompt_grid(model: DiffusionModel, unet: nn.Module, spec, compare: bool) -> tuple[list, list[str]]:
    """``eval.prompts_grid_n`` images per fixed prompt from the FP and (if ``compare``) the run's model."""
    ev = spec.eval
    n = ev.prompts_grid_n
    grid_prompts = [p for p in ev.prompts_grid for _ in range(n)]
    runs = [("FP W32A32", model.unet)]
    if compare:
        runs.append((f"{spec.quant.method} {spec.quant.label}", unet))
    images = [generate(model, u, spec.sampler, len(grid_prompts), spec.seed, spec.device, grid_prompts,
                       desc=f"prompts grid {label}") for label, u in runs]
    rows = [(p, [im[i * n:(i + 1) * n] for im in images]) for i, p in enumerate(ev.prompts_grid)]
    return rows, [label for label, _ in runs]
