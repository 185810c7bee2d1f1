"""Cost of the paper's calibration on a full-size Stable Diffusion v1.4 UNet (issue 15), measured on one block.

Random-init SD v1.4 UNet (860 M parameters; the cost does not depend on the weights), W4A8, calibration inputs of
the real shapes (latents 4x64x64, DDIM-50 timesteps, 77x768 text embeddings; paper Table 5: N = 6400). Measured
through qdiff's own reconstruction steps (the ones ``python run.py`` runs):

1. every unit's FP forward time at the reconstruction batch (32), and the whole UNet's (FP and fake-quantized);
2. one block (default: the most expensive one of the down path, a 64x64 transformer block) through capture of N inputs + FP
   targets, AdaRound for ``--weight-iters`` and, after the activation ranges are set, LSQ for ``--act-iters``:
   seconds, the median time of one optimisation step, peak device memory; in fp32 and with ``--bf16`` also in
   bf16-mixed;
3. one single layer the same way (the per-step floor of the ~200 small units);
4. the extrapolation to the whole paper budget (20k AdaRound + 5k LSQ steps per unit, every unit's capture of
   N inputs, and generating the calibration set itself: 256 trajectories x 50 steps x 2 guidance branches):
   per-unit step time = a + b * (unit forward time), a and b fitted on the block and the layer.

``--precision bf16-mixed`` times the optimisation steps (block and layer) in bf16-mixed and fits the step model on
the units' forward times under bf16 autocast; capture stays fp32 (as qdiff runs it), so its cost comes from the fp32
forwards. ``experiments/benchmarks/bench_makespan.py --measurement <its JSON>`` schedules that on K GPUs.

Prints a table and writes JSON. Needs a GPU for meaningful numbers (``--device cpu --small`` is a smoke run).

    python experiments/benchmarks/bench_sd_block.py [--device cuda] [--n 6400] [--weight-iters 300] [--act-iters 100] [--bf16]
                                                    [--precision 32-true|bf16-mixed]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, print_table, write_json
from qdiff.recon.units import unit_forward_ms
from qdiff.runtime import sync

#: The paper's budget (Appendix A) and Stable Diffusion's calibration settings (Table 5).
PAPER = {"weight_iters": 20000, "act_iters": 5000, "batch_size": 32, "T": 50, "c": 2, "n": 256, "N": 6400}
#: What the issue quotes for Q-Diffusion W4A8 on LDM-4 bedroom (official code): GPU-hours and memory.
PUBLISHED = {"gpu_hours": 23.0, "memory_gb": 10.3, "model": "LDM-4 LSUN-Bedroom"}


class StepTimer:
    """Lightning callback: wall time of every optimisation step (device synchronised)."""

    def __init__(self, device: torch.device) -> None:
        import pytorch_lightning as pl

        self.device, self.times = device, []
        outer = self

        class _CB(pl.Callback):
            def on_train_batch_start(self, *a, **k):
                sync(outer.device)
                outer.t0 = time.perf_counter()

            def on_train_batch_end(self, *a, **k):
                sync(outer.device)
                outer.times.append(time.perf_counter() - outer.t0)

        self.callback = _CB()

    def median_ms(self) -> float:
        steady = self.times[len(self.times) // 10:] or self.times  # skip the first steps (allocations, autotuning)
        return round(1e3 * statistics.median(steady), 3)


def run_unit(fp, q, calib, qcfg, unit, n_capture: int, args, precision: str, device, with_acts: bool) -> dict:
    """AdaRound (and LSQ) of one unit through qdiff's own steps; seconds, step medians, peak memory."""
    from qdiff.recon.config import ReconConfig
    from qdiff.recon.steps import ActRangeInit, ActStepSize, Context, WeightRounding

    cfg = ReconConfig(weight_iters=args.weight_iters, act_iters=args.act_iters, batch_size=PAPER["batch_size"],
                      capture_batch_size=args.capture_batch, precision=precision, weight_lr=5e-2, act_lr=5e-4)
    idx = np.arange(min(n_capture, len(calib)))
    row: dict = {"unit": unit.name, "kind": unit.module_type, "layers": unit.n_layers, "precision": precision, "N": len(idx)}
    timer = StepTimer(device)
    ctx = Context(fp, q, calib, qcfg, cfg, device, idx)
    ctx.callbacks = [timer.callback]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rep = WeightRounding(unit, 0).run(ctx)
    row.update(capture_s=rep.capture_seconds, weights_s=rep.optimize_seconds, weight_step_ms=timer.median_ms(),
               weights_mse=f"{rep.mse_before:.3g}->{rep.mse_after:.3g}", hard=rep.hard_fraction)
    if with_acts:
        t0 = time.perf_counter()
        ActRangeInit(args.act_init_samples).run(ctx)
        row["act_init_s"] = round(time.perf_counter() - t0, 2)
        timer.times = []
        rep = ActStepSize(unit, 1).run(ctx)
        row.update(acts_s=rep.optimize_seconds, act_step_ms=timer.median_ms())
    if device.type == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=PAPER["N"], help="calibration inputs captured for the block (paper: 6400)")
    ap.add_argument("--weight-iters", type=int, default=300)
    ap.add_argument("--act-iters", type=int, default=100)
    ap.add_argument("--act-init-samples", type=int, default=32)
    ap.add_argument("--capture-batch", type=int, default=32)
    ap.add_argument("--unit", default=None, help="unit to reconstruct (default: the down-path block with the longest forward)")
    ap.add_argument("--bf16", action="store_true", help="also time the block in bf16-mixed")
    ap.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"],
                    help="precision of the timed optimisation steps and of the step model's unit forwards")
    ap.add_argument("--small", action="store_true", help="a tiny same-family UNet (CPU smoke run of this script)")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "sd_block")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    from qdiff.api import prepare
    from qdiff.calib.data import TensorCalibration
    from qdiff.models.paper import build_unet
    from qdiff.quant.config import QuantConfig
    from qdiff.quant.split import execution_order
    from qdiff.recon.units import find_units

    t0 = time.perf_counter()
    arch = None
    if args.small:
        arch = {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1, "cross_attention_dim": 32,
                "sample_size": 16, "text_hidden_size": 32, "text_num_attention_heads": 4}
    with torch.device(device):
        fp = build_unet("sd14", arch).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in fp.parameters())
    c, hw = fp.config.in_channels, fp.config.sample_size
    ctx_dim = fp.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    timesteps = torch.arange(1, 1000, 1000 // PAPER["T"])
    calib = TensorCalibration(torch.randn(args.n, c, hw, hw, generator=g),
                              timesteps[torch.randint(len(timesteps), (args.n,), generator=g)],
                              {"encoder_hidden_states": torch.randn(args.n, 77, ctx_dim, generator=g)})
    qcfg = QuantConfig(method="qdiff", weight_bits=4, act_bits=8)
    setup_s = round(time.perf_counter() - t0, 1)

    def fresh_q():
        return prepare(fp, qcfg, calib.get([0, 1], device))[0]

    q = fresh_q()
    x0, t0_, c0 = calib.get([0], device)
    units = find_units(q, execution_order(fp, (x0, t0_), c0), "block", [])
    xb, tb, cb = calib.get(np.arange(PAPER["batch_size"]), device)
    fwd, fp_total = unit_forward_ms(fp, [u.name for u in units], xb, tb, cb, device)
    _, q_total = unit_forward_ms(q, [], xb, tb, cb, device)
    step_fwd = fwd                       # the forwards the step model is fitted on: the steps' precision
    if args.precision == "bf16-mixed":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            step_fwd, _ = unit_forward_ms(fp, [u.name for u in units], xb, tb, cb, device)
    print(f"{len(units)} units; UNet forward at batch 32: FP {fp_total:.1f} ms, fake-quantized W4A8 {q_total:.1f} ms", flush=True)

    by_name = {u.name: u for u in units}
    blocks = [u for u in units if u.kind == "block"]
    down = [u for u in blocks if u.name.startswith("down_blocks.")] or blocks   # short prefix: capture stays cheap
    block = by_name[args.unit] if args.unit else max(down, key=lambda u: fwd.get(u.name, 0))
    layer = min((u for u in units if u.kind == "layer"), key=lambda u: fwd.get(u.name, 1e9))
    rows = [run_unit(fp, q, calib, qcfg, block, args.n, args, args.precision, device, with_acts=True)]
    rows.append(run_unit(fp, q, calib, qcfg, layer, min(args.n, 512), args, args.precision, device, with_acts=False))
    if args.bf16:
        q = fresh_q()
        rows.append(run_unit(fp, q, calib, qcfg, block, min(args.n, 1024), args, "bf16-mixed", device, with_acts=False))
    for r in rows:
        r["fwd_ms"] = round(step_fwd[r["unit"]], 3)

    # extrapolation: step time per unit = a + b * forward time (a, b from the block and the layer, in --precision)
    (fb, wb), (fl, wl) = (rows[0]["fwd_ms"], rows[0]["weight_step_ms"]), (rows[1]["fwd_ms"], rows[1]["weight_step_ms"])
    b = (wb - wl) / max(fb - fl, 1e-9)
    a = wl - b * fl
    act_ratio = rows[0]["act_step_ms"] / wb
    weight_ms = sum(a + b * step_fwd[u.name] for u in units)
    # capture of unit u: N inputs through the FP and the quantized prefix up to u (both stop after u)
    cum, prefix = 0.0, {}
    for u in units:
        cum += fwd[u.name]
        prefix[u.name] = cum
    scale = fp_total / max(cum, 1e-9)           # unit forwards miss the glue between units
    capture_s_per_unit = {u.name: PAPER["N"] / args.capture_batch * prefix[u.name] * scale * (1 + q_total / fp_total) / 1e3
                          for u in units}
    predicted_block_capture = capture_s_per_unit[block.name] * args.n / PAPER["N"]
    gen_s = PAPER["n"] * PAPER["T"] * 2 / PAPER["batch_size"] * fp_total / 1e3
    est = {
        "adaround_h": weight_ms * PAPER["weight_iters"] / 3.6e6,
        "lsq_h": weight_ms * act_ratio * PAPER["act_iters"] / 3.6e6,
        "capture_h": 2 * sum(capture_s_per_unit.values()) / 3600,   # once per phase (weights, acts)
        "calib_generation_h": gen_s / 3600,
    }
    est["total_h"] = sum(est.values())
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "precision": args.precision, "unet_params": n_params, "units": len(units),
        "n_blocks": sum(u.kind == "block" for u in units), "setup_seconds": setup_s,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "fwd_ms_batch32": {"fp": round(fp_total, 2), "fake_quant_w4a8": round(q_total, 2)},
        "unit_fwd_ms": {k: round(v, 3) for k, v in fwd.items()},
        "unit_step_fwd_ms": {k: round(v, 3) for k, v in step_fwd.items()},
        "measured": rows, "step_model_ms": {"a": round(a, 3), "b": round(b, 3), "lsq_over_adaround": round(act_ratio, 3)},
        "block_capture_predicted_s": round(predicted_block_capture, 2),
        "paper_budget_estimate_gpu_hours": {k: round(v, 2) for k, v in est.items()},
        "published": PUBLISHED, "paper_budget": PAPER,
    }
    print_table(rows, ["unit", "precision", "N", "capture_s", "weight_step_ms", "act_step_ms", "fwd_ms", "peak_mem_gb", "hard"],
                title=f"SD v1.4 UNet ({n_params / 1e6:.0f} M params, {len(units)} units) on {result['device']}, steps in {args.precision}")
    print_table([{k: round(v, 2) for k, v in est.items()}], list(est),
                title=f"paper budget extrapolated (GPU-hours, steps in {args.precision}); published Q-Diffusion W4A8 {PUBLISHED['model']}: "
                      f"{PUBLISHED['gpu_hours']} h, {PUBLISHED['memory_gb']} GB")
    write_json(args.out / "results.json", result)


if __name__ == "__main__":
    main()
