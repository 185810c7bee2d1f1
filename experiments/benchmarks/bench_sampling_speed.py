"""Simulated-quantization sampling cost vs FP on the digits model (target: quantized <= 1.5x FP).

FP and quantized samplers run interleaved in one process (--repeats rounds, median reported) so that
background load affects both alike. Prints a table, writes JSON.

    python experiments/benchmarks/bench_sampling_speed.py [--n 256] [--steps 100] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from common import ROOT, interleaved_ms, print_table, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "sampling_speed")
    args = p.parse_args()

    import qdiff
    from qdiff.models import ModelConfig, load_model
    from qdiff.sampling import SamplerConfig, generate, initial_noise

    model = load_model(ModelConfig(name="digits"))
    x = initial_noise(model.sample_shape, 256, 0)
    t = torch.randint(0, 1000, (256,), generator=torch.Generator().manual_seed(0))
    cfg = SamplerConfig(name="ddim", steps=args.steps, batch_size=args.n)
    variants = {"FP": model.unet}
    for bits in ("w8a32", "w4a32", "w4a8"):
        wb, ab = int(bits[1]), int(bits[3:])
        variants[bits.upper()] = qdiff.quantize(model.unet, qdiff.QuantConfig(method="linear", weight_bits=wb, act_bits=ab),
                                                (x, t), progress=False)
    calls = {name: (lambda u=unet: generate(model, u, cfg, args.n, seed=0, progress=False)) for name, unet in variants.items()}
    times = {k: [ms / 1e3 for ms in v] for k, v in interleaved_ms(calls, args.repeats, warmup=0).items()}
    fp = statistics.median(times["FP"])
    rows = [{"model": k, "seconds": statistics.median(v), "vs_fp": statistics.median(v) / fp,
             "per_step_ms": 1000 * statistics.median(v) / args.steps} for k, v in times.items()]
    table = print_table(rows, ["model", "seconds", "vs_fp", "per_step_ms"],
                        f"DDIM-{args.steps} sampling of {args.n} digits, {torch.get_num_threads()} threads, median of {args.repeats}")
    write_json(args.out / "results.json", {"rows": rows, "raw": times, "table": table, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
