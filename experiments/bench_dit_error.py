"""Where a transformer's quantization error sits (issue 24): the digits DiT, layer group by layer group.

Groups: ``cond`` (the conditioning path: timestep/class embedding MLPs and adaLN modulation, with DiT's final
modulation ``proj_out_1``), ``attn_qkv`` (to_q/k/v), ``attn_out`` (to_out), ``ff_in`` (the FFN's first linear,
after the norm), ``ff_out`` (its second linear, whose input comes straight out of GELU), ``io`` (the patch
embedding conv and the final projection). For each group:

1. its activations on calibration inputs: the inputs' max |x| over their 99.9th percentile (how much one
   outlier stretches a per-tensor 8- or 4-bit range) and the largest channel's max |x| over the median
   channel's (channel outliers, what smoothing / channel balancing target);
2. round-to-nearest of that group alone (every other layer FP) at W4 (weights only), A8 and A4 (activations
   only): the relative MSE of eps against FP on calibration inputs across all timesteps, and the final-sample
   MSE against FP over the calibration trajectories replayed to the end (same noise, sampler and guidance);
3. with ``--run <dir>`` (a ``model=digits_dit`` Q-Diffusion run): that reconstructed model with the group put
   back in FP: how much of its final-sample error the group carries.

Prints a table, writes JSON (default ``outputs/bench/dit/error.json``).

    python experiments/bench_dit_error.py [--run outputs/bench/dit/qdiff/qdiff_w4a8_cpu1k] [--trajectories 64]
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch

from common import ROOT, compose, print_table, write_json

GROUPS = {
    "attn_qkv": r"\.attn1\.to_[qkv]$",
    "attn_out": r"\.attn1\.to_out\.0$",
    "ff_in": r"\.ff\.net\.0\.proj$",
    "ff_out": r"\.ff\.net\.2$",
    "io": r"^(pos_embed\.proj|proj_out_2)$",
}


def groups_of(model) -> dict[str, list[str]]:
    """Layer names per group (the conditioning path from qdiff's own detection)."""
    from qdiff.quant.layers import LAYER_REGISTRY
    from qdiff.quant.wrap import conditioning_layers

    layers = [n for n, m in model.named_modules() if type(m) in LAYER_REGISTRY]
    cond = conditioning_layers(model)
    out = {"cond": sorted(cond)}
    for g, pattern in GROUPS.items():
        out[g] = [n for n in layers if n not in cond and re.search(pattern, n)]
    missing = set(layers) - {n for v in out.values() for n in v}
    if missing:
        raise SystemExit(f"layers in no group: {sorted(missing)}")
    return out


@torch.no_grad()
def activation_stats(model, calib, layers: list[str], rows: np.ndarray) -> dict:
    """Per group: mean over its layers of max/p99.9 of |input| and of max-channel/median-channel of max |input|."""
    from qdiff.models.base import eps

    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().float()))
             for n in layers]
    try:
        for s in range(0, len(rows), 64):
            x, t, cond = calib.get(rows[s:s + 64])
            eps(model, x, t, cond)
    finally:
        for h in hooks:
            h.remove()
    tail, chan = [], []
    for n in layers:
        # rows x channels: a conv's channels are dim 1, a linear's the last dim
        a = torch.cat([v.transpose(1, -1).reshape(-1, v.shape[1]) if v.dim() == 4 else v.reshape(-1, v.shape[-1])
                       for v in seen[n]])
        mag = a.abs()
        flat = mag.flatten()
        sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
        tail.append(float(flat.max() / sample.quantile(0.999).clamp_min(1e-12)))
        per_channel = mag.amax(0)
        chan.append(float(per_channel.max() / per_channel.median().clamp_min(1e-12)))
    return {"max_over_p999": float(np.mean(tail)), "channel_max_over_median": float(np.mean(chan))}


def only(names: list[str], weight_bits: int, act_bits: int):
    """A QuantConfig quantizing only ``names`` (weights and/or activations), every other layer FP."""
    from qdiff.quant.config import LayerOverride, QuantConfig

    pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    return QuantConfig(method="linear", weight_bits=32 if weight_bits >= 16 else 8, act_bits=32 if act_bits >= 16 else 8,
                       overrides=[LayerOverride(pattern=".*", weight_quant=False, act_quant=False),
                                  LayerOverride(pattern=pattern, weight_bits=None if weight_bits >= 16 else weight_bits,
                                                act_bits=None if act_bits >= 16 else act_bits,
                                                weight_quant=weight_bits < 16, act_quant=act_bits < 16)])


@torch.no_grad()
def errors(model, q, calib, rows: np.ndarray, ref_final: torch.Tensor, n_traj: int) -> dict:
    from qdiff.models.base import eps

    num = den = 0.0
    for s in range(0, len(rows), 64):
        x, t, cond = calib.get(rows[s:s + 64])
        e_fp, e_q = eps(model, x, t, cond), eps(q, x, t, cond)
        num += float(((e_q - e_fp) ** 2).sum())
        den += float((e_fp ** 2).sum())
    final = calib.final_latents(q, n_traj)
    return {"eps_rel_mse": num / den, "final_mse": float(((final - ref_final) ** 2).mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="a model=digits_dit Q-Diffusion run directory (its quantized_unet/)")
    p.add_argument("--trajectories", type=int, default=64, help="calibration trajectories replayed to the end")
    p.add_argument("--rows", type=int, default=512, help="calibration inputs for the eps error and statistics")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "dit" / "error.json")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (e.g. paths.cache_dir=... to reuse a calibration set)")
    args = p.parse_args()
    import qdiff
    from qdiff.calib import collect_calibration
    from qdiff.models import load_model
    from qdiff.spec import build_spec, run_prompts

    torch.manual_seed(0)
    spec = build_spec(compose(["model=digits_dit", *args.overrides], args.out.parent / "error_run"))
    model = load_model(spec.model)
    calib, _ = collect_calibration(model, spec.sampler, spec.calib, spec.cache_dir, "cpu",
                                   run_prompts(model, spec, spec.calib.n, spec.calib.seed), progress=False)
    rows = np.unique(np.linspace(0, len(calib) - 1, min(args.rows, len(calib))).round().astype(np.int64))
    ref_final = calib.final_latents(model.unet, args.trajectories)
    groups = groups_of(model.unet)
    n_params = {g: sum(dict(model.unet.named_modules())[n].weight.numel() for n in names) for g, names in groups.items()}
    total = sum(n_params.values())
    table = []
    for g, names in groups.items():
        row = {"group": g, "layers": len(names), "weights": round(n_params[g] / total, 3),
               **activation_stats(model.unet, calib, names, rows)}
        for label, (wb, ab) in {"W4": (4, 32), "A8": (32, 8), "A4": (32, 4)}.items():
            q = qdiff.quantize(model.unet, only(names, wb, ab), calib, progress=False)
            e = errors(model.unet, q, calib, rows, ref_final, args.trajectories)
            row[f"{label}_eps"], row[f"{label}_final"] = e["eps_rel_mse"], e["final_mse"]
        table.append(row)
    if args.run is not None:
        from qdiff.quant.wrap import quant_layers

        art = args.run / "quantized_unet"
        full = errors(model.unet, qdiff.load_deployed(art), calib, rows, ref_final, args.trajectories)
        fp_layers = dict(model.unet.named_modules())
        for row in table:
            q = qdiff.load_deployed(art)
            for name, layer in quant_layers(q):
                if name in groups[row["group"]]:
                    layer.weight.data = fp_layers[name].weight.detach().clone()
                    for quantizer in (*layer.wq, *layer.aq):
                        quantizer.enabled = False
                    layer.invalidate_cache()
            e = errors(model.unet, q, calib, rows, ref_final, args.trajectories)
            row["qdiff_fp_group_final"] = e["final_mse"]
            row["qdiff_share"] = 1 - e["final_mse"] / full["final_mse"]
        print(f"{args.run}: whole reconstructed model: eps rel MSE {full['eps_rel_mse']:.4g}, final MSE {full['final_mse']:.4g}")
    cols = ["group", "layers", "weights", "max_over_p999", "channel_max_over_median", "W4_eps", "W4_final", "A8_eps",
            "A8_final", "A4_eps", "A4_final"] + (["qdiff_fp_group_final", "qdiff_share"] if args.run else [])
    text = print_table(table, cols, "digits DiT: error of each layer group alone (round-to-nearest; eps relative MSE "
                                    "and final-sample MSE vs FP)" + ("; qdiff_share: its share of the reconstructed "
                                                                     "model's final-sample error" if args.run else ""))
    write_json(args.out, {"rows": table, "table": text, "run": str(args.run) if args.run else None,
                          "trajectories": args.trajectories, "rows_eps": len(rows)})


if __name__ == "__main__":
    main()
