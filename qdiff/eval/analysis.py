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
from qdiff.sampling.samplers import build_scheduler, guided_eps, initial_noise, prompt_conditioning, step_kwargs


@torch.no_grad()
def step_mse(model: DiffusionModel, fp_unet: nn.Module, q_unet: nn.Module, sampler: SamplerConfig, n: int, seed: int,
             device: torch.device | str = "cpu", prompts: list[str] | None = None) -> pd.DataFrame:
    """Per-step MSE of quantized vs FP noise predictions over ``n`` trajectories."""
    x = initial_noise(model, n, seed).to(device)
    s_fp, s_q = build_scheduler(sampler, model.scheduler_config), build_scheduler(sampler, model.scheduler_config)
    x_fp, x_q = x * s_fp.init_noise_sigma, x * s_q.init_noise_sigma
    cond, uncond = prompt_conditioning(model, prompts[:n] if prompts else [], device)
    g_fp, g_q = torch.Generator("cpu").manual_seed(seed), torch.Generator("cpu").manual_seed(seed)
    kw_fp, kw_q = step_kwargs(s_fp, sampler, g_fp), step_kwargs(s_q, sampler, g_q)
    rows = []
    for i, t in enumerate(s_fp.timesteps):
        tt = t.to(device).expand(n)
        in_fp, in_q = s_fp.scale_model_input(x_fp, t), s_q.scale_model_input(x_q, t)
        e_fp = guided_eps(model, fp_unet, in_fp, tt, cond, uncond, model.guidance_scale)
        e_q = guided_eps(model, q_unet, in_q, tt, cond, uncond, model.guidance_scale)
        e_q_local = guided_eps(model, q_unet, in_fp, tt, cond, uncond, model.guidance_scale)
        rows.append({"step": i, "t": int(t), "mse_accumulated": float(((e_fp - e_q) ** 2).mean()),
                     "mse_local": float(((e_fp - e_q_local) ** 2).mean()),
                     "x_mse": float(((x_fp - x_q) ** 2).mean())})
        x_fp = s_fp.step(e_fp, t, x_fp, **kw_fp).prev_sample
        x_q = s_q.step(e_q, t, x_q, **kw_q).prev_sample
    return pd.DataFrame(rows)


@torch.no_grad()
def activation_ranges(model: DiffusionModel, unet: nn.Module, sampler: SamplerConfig, n: int, seed: int,
                      device: torch.device | str = "cpu", prompts: list[str] | None = None) -> pd.DataFrame:
    """Output min/max of every Conv/Linear layer of ``unet`` at every sampling step (one row per layer x step)."""
    from qdiff.sampling.samplers import denoise

    state = {"step": 0, "t": 0}
    rows: list[dict] = []
    hooks = []
    for name, m in unet.named_modules():
        if type(m) in LAYER_REGISTRY or getattr(m, "org_type", None):
            def hook(_m, _i, out, name=name):
                rows.append({"layer": name, "step": state["step"], "t": state["t"],
                             "min": float(out.amin()), "max": float(out.amax())})
            hooks.append(m.register_forward_hook(hook))

    def on_step(i, t, *_):
        state.update(step=i, t=int(t[0]))

    cond, uncond = prompt_conditioning(model, prompts[:n] if prompts else [], device)
    try:
        denoise(model, unet, sampler, initial_noise(model, n, seed).to(device), cond, uncond,
                torch.Generator("cpu").manual_seed(seed), on_step=on_step)
    finally:
        for h in hooks:
            h.remove()
    df = pd.DataFrame(rows)
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
