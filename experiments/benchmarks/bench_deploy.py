"""Deployment on digits (issue 13): the packed artifact's size, and the int8 backend's speed and quality,
against compiled FP32 and against the runtime's own static int8 quantization of the FP model.

For each bit setting:
1. ``python run.py quant=<bits> deploy=int8 seed=<s>`` per sampling seed (in-process, reusing the cached
   reconstruction): artifact bytes, FID/IS of the simulated model and of the int8 artifact from the same noise,
   their mean final-sample MSE, UNet latency at batch 1 and the sampling batch and sampling time per batch of
   FP eager, FP compiled, simulated and int8, interleaved (the run's own ``deploy`` record).
2. The user's alternative: PT2E's stock static quantization of the FP model (``X86InductorQuantizer``,
   min-max observers; weights per-channel symmetric int8, or [-8, 7] for 4-bit weights) calibrated on the same
   calibration set, compiled the same way: its FID on the same seeds, and its latency at the sampling batch
   interleaved with compiled FP32 and the int8 artifact in this process.
Timings mean something only on a quiet machine (2 cores: a second busy process wrecks small-kernel timings).
Prints a table, writes JSON.

    python experiments/benchmarks/bench_deploy.py [--bits w8a8 w4a8] [--seeds 0 1] [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch import nn

from common import ROOT, print_table, run_one, write_json


class StockInt8(nn.Module):
    """The FP UNet through PT2E's stock static int8 flow, exported at one batch size, called like a UNet."""

    def __init__(self, unet: nn.Module, calib, batch: int, weight_bits: int) -> None:
        super().__init__()
        import torch._inductor.config as inductor_config
        from torch._inductor.compile_fx import compile_fx
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)

        from qdiff.deploy.int8 import _Eps

        cfg = get_default_x86_inductor_quantization_config()
        if weight_bits < 8:  # the same min-max observer on a narrower signed range
            from dataclasses import replace

            cfg = replace(cfg, weight=replace(cfg.weight, quant_min=-2 ** (weight_bits - 1), quant_max=2 ** (weight_bits - 1) - 1))
        x, t, _ = calib.get(list(range(batch)))
        with torch.no_grad():
            graph = torch.export.export(_Eps(unet).eval(), (x, t.float())).module()
            prepared = prepare_pt2e(graph, X86InductorQuantizer().set_global(cfg))
            for start in range(0, len(calib) - batch + 1, batch):   # every full batch of the calibration set
                xb, tb, _ = calib.get(list(range(start, start + batch)))
                prepared(xb, tb.float())
            graph = convert_pt2e(prepared)
            with inductor_config.patch(freezing=True):  # compiled like the int8 backend (qdiff.deploy.int8)
                self.fn = compile_fx(graph, [x, t.float()])
                self.fn(x, t.float())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.fn(x, torch.as_tensor(t).float().reshape(-1).expand(x.shape[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", nargs="+", default=["w8a8", "w4a8"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--repeats", type=int, default=20, help="interleaved latency calls per variant")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "deploy")
    args = p.parse_args()

    from qdiff.calib import CalibrationSet
    from qdiff.deploy import load_deployed
    from qdiff.deploy.int8 import compile_fp
    from qdiff.deploy.stage import latency_ms
    from qdiff.eval.config import EvalConfig
    from qdiff.eval.fidelity import compute_metrics
    from qdiff.models import ModelConfig, load_model
    from qdiff.sampling import SamplerConfig, generate

    model = load_model(ModelConfig(name="digits"))
    real = model.real_images()
    rows, raw = [], {}
    for bits in args.bits:
        runs = {s: run_one([f"quant={bits}", "deploy=int8", "deploy.timing=true", f"seed={s}"], args.out / f"{bits}_seed{s}") for s in args.seeds}
        first = runs[args.seeds[0]]
        d = first["deploy"]
        calib = CalibrationSet(ROOT / "outputs" / "cache" / "calib" / first["calibration"]["key"])
        batch = d["sampling"]["batch_size"]
        stock = StockInt8(model.unet, calib, batch, first["weight_bits"])
        sampler = SamplerConfig(name="ddim", steps=first["steps"], batch_size=batch)
        stock_fid = {}
        for s in args.seeds:
            images = generate(model, stock, sampler, first["n_samples"], s, desc=f"sampling stock PT2E {bits}")
            stock_fid[s] = compute_metrics(images, real, "digits", EvalConfig(n_samples=first["n_samples"]), seed=s)["fid"]
        x, t, _ = calib.get(list(range(batch)))
        variants = {"fp_compiled": compile_fp(model.unet), "int8": load_deployed(args.out / f"{bits}_seed{args.seeds[0]}" / "quantized_unet", "int8"),
                    "stock": stock}
        lat = latency_ms(variants, x, t, {}, args.repeats)
        raw[bits] = {"runs": runs, "stock_fid": stock_fid, "latency_same_process": lat}

        def mean(key) -> float:
            return statistics.mean(key(m) for m in runs.values())

        diffs = [m["deploy"]["fid"] - m["fid"] for m in runs.values()]
        fp_fids = [m["fp"]["fid"] for m in runs.values()]
        lb = d["latency_ms"]
        rows.append({
            "bits": first["quant"], "artifact_MB": d["artifact_bytes"] / 1e6, "vs_fp32": d["ratio_to_fp32"],
            "FID_fp": mean(lambda m: m["fp"]["fid"]), "FID_sim": mean(lambda m: m["fid"]),
            "FID_int8": mean(lambda m: m["deploy"]["fid"]), "int8-sim": statistics.mean(diffs),
            "FP_seed_sd": statistics.stdev(fp_fids) if len(fp_fids) > 1 else 0.0, "FID_stock": statistics.mean(stock_fid.values()),
            "mse_int8_sim": mean(lambda m: m["deploy"]["mse_vs_simulated"]),
            "b1_fp_c_ms": lb["1"]["fp_compiled"], "b1_int8_ms": lb["1"]["deployed"],
            f"b{batch}_fp_ms": lb[str(batch)]["fp_eager"], f"b{batch}_fp_c_ms": lb[str(batch)]["fp_compiled"],
            f"b{batch}_sim_ms": lb[str(batch)]["simulated"], f"b{batch}_int8_ms": lb[str(batch)]["deployed"],
            "int8_x": d["latency_speedup_vs_fp_compiled"][str(batch)],
            "stock_x": round(lat["fp_compiled"] / lat["stock"], 3), "int8_x_again": round(lat["fp_compiled"] / lat["int8"], 3),
            "sample_s_fp": d["sampling"]["seconds_per_batch"]["fp_eager"], "sample_s_fp_c": d["sampling"]["seconds_per_batch"]["fp_compiled"],
            "sample_s_sim": d["sampling"]["seconds_per_batch"]["simulated"], "sample_s_int8": d["sampling"]["seconds_per_batch"]["deployed"],
        })
    cols = list(rows[0])
    table = print_table(rows, cols, f"deployment on digits, seeds {args.seeds}, {torch.get_num_threads()} threads "
                                    "(latency: medians of interleaved calls; *_x: speed-up vs compiled FP32)")
    write_json(args.out / "results.json", {"rows": rows, "table": table, "raw": raw, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
