"""Where quantization error comes from, per timestep and per layer (paper Figures 2, 3 and 6).

* :func:`step_mse` runs the FP and the quantized model from the same noise with the same sampler and
  records, at every step, the MSE between their noise predictions: ``accumulated`` (each model on its
  own trajectory: errors compound, Fig. 2) and ``local`` (both models on the FP trajectory's input).
* :func:`activation_ranges` records every quantizable layer's FP output range at every step (Figs. 3/6).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import nn

from qdiff.models.base import DiffusionModel
from qdiff.quant.layers import LAYER_REGISTRY
from qdiff.sampling.config import SamplerConfig
from qdiff.sampling.samplers import Trajectory, guided_eps, initial_noise, prompt_conditioning


def _trajectory(model: DiffusionModel, unet: nn.Module, sampler: SamplerConfig, n: int, seed: int, device,
                prompts: list[str] | None) -> Trajectory:
    cond, uncond = prompt_conditioning(model, prompts[:n] if prompts else [], device)
    x_T = initial_noise(model.sample_shape, n, seed).to(device)
    return Trajectory(model.scheduler_config, model.guidance_scale, unet, sampler, x_T, cond, uncond,
                      torch.Generator("cpu").manual_seed(seed))


@torch.no_grad()
def step_mse(model: DiffusionModel, fp_unet: nn.Module, q_unet: nn.Module, sampler: SamplerConfig, n: int, seed: int,
             device: torch.device | str = "cpu", prompts: list[str] | None = None) -> pd.DataFrame:
    """Per-step MSE of quantized vs FP noise predictions over ``n`` trajectories (both walked in lockstep)."""
    fp = _trajectory(model, fp_unet, sampler, n, seed, device, prompts)
    q = _trajectory(model, q_unet, sampler, n, seed, device, prompts)
    rows = []
    for s_fp, s_q in zip(fp, q):
        e_local = guided_eps(q_unet, s_fp.x_in, s_fp.t, fp.cond, fp.uncond, fp.guidance)
        rows.append({"step": s_fp.index, "t": int(s_fp.t[0]), "mse_accumulated": float(((s_fp.eps - s_q.eps) ** 2).mean()),
                     "mse_local": float(((s_fp.eps - e_local) ** 2).mean()),
                     "x_mse": float(((s_fp.x - s_q.x) ** 2).mean())})
    return pd.DataFrame(rows)


@torch.no_grad()
def activation_ranges(model: DiffusionModel, unet: nn.Module, sampler: SamplerConfig, n: int, seed: int,
                      device: torch.device | str = "cpu", prompts: list[str] | None = None) -> pd.DataFrame:
    """Output min/max of every Conv/Linear layer of ``unet`` at every sampling step (one row per layer x step)."""
    seen: list[dict] = []   # this step's layer outputs, labelled with the step once it is done
    rows: list[dict] = []
    hooks = []
    for name, m in unet.named_modules():
        if type(m) in LAYER_REGISTRY or getattr(m, "org_type", None):
            def hook(_m, _i, out, name=name):
                seen.append({"layer": name, "min": float(out.amin()), "max": float(out.amax())})
            hooks.append(m.register_forward_hook(hook))
    try:
        for step in _trajectory(model, unet, sampler, n, seed, device, prompts):
            rows += [{**r, "step": step.index, "t": int(step.t[0])} for r in seen]
            seen.clear()
    finally:
        for h in hooks:
            h.remove()
    df = pd.DataFrame(rows)[["layer", "step", "t", "min", "max"]]
    return df.groupby(["layer", "step", "t"], sort=False).agg({"min": "min", "max": "max"}).reset_index()


def plot_step_mse(frames: dict[str, pd.DataFrame], path: str | Path, column: str = "mse_accumulated") -> None:
    """Fig. 2: MSE vs denoising step for one or more quantized models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, df in frames.items():
        ax.plot(df["step"], df[column], label=label)
    ax.set_xlabel("denoising step (0 = pure noise)")
    ax.set_ylabel(f"MSE to FP output ({column.split('_')[1]})")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_activation_ranges(df: pd.DataFrame, path: str | Path, n_layers_over_time: int = 4) -> None:
    """Fig. 6 (range per layer, over all steps) and Fig. 3 (range over steps for the widest layers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_layer = df.groupby("layer", sort=False).agg({"min": "min", "max": "max"}).reset_index()
    widest = (per_layer["max"] - per_layer["min"]).nlargest(n_layers_over_time).index
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6.5))
    a1.vlines(range(len(per_layer)), per_layer["min"], per_layer["max"], lw=3)
    a1.set_xlabel("layer (execution order)")
    a1.set_ylabel("FP output range")
    a1.set_title("activation range per layer over all timesteps (cf. Fig. 6)")
    for i in widest:
        layer = per_layer.loc[i, "layer"]
        d = df[df["layer"] == layer]
        a2.fill_between(d["step"], d["min"], d["max"], alpha=0.3, label=layer)
    a2.set_xlabel("denoising step (0 = pure noise)")
    a2.set_ylabel("FP output range")
    a2.set_title("range over timesteps of the widest layers (cf. Fig. 3)")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
