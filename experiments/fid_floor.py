"""How stable is digits FID? The real-vs-real noise floor and the spread of FP FID across seeds and sample counts.

* floor: FID between two random halves of the 1797 real digits, over --splits random splits;
* spread: FP samples (default sampler, DDIM-100) for --seeds seeds, FID against all real digits on the
  first 256 / 512 / 1024 / 2048 samples of each seed.
Prints both tables and writes JSON; the README quotes them and the default eval.n_samples follows from them.

    python experiments/fid_floor.py [--seeds 3] [--max-n 2048]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from common import ROOT, print_table, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-n", type=int, default=2048)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "fid_floor")
    args = p.parse_args()

    from qdiff.eval.config import EvalConfig
    from qdiff.eval.fidelity import compute_metrics
    from qdiff.models import ModelConfig, load_model
    from qdiff.models.digits import load_digits_images
    from qdiff.sampling import SamplerConfig, generate

    real = load_digits_images()
    half = len(real) // 2
    floor = []
    for s in range(args.splits):
        perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(s))
        floor.append(compute_metrics(real[perm[:half]], real[perm[half:]], "digits", EvalConfig(n_samples=half))["fid"])
    floor_row = {"what": f"real vs real halves ({half} vs {len(real) - half}), {args.splits} splits",
                 "mean": statistics.mean(floor), "std": statistics.stdev(floor), "min": min(floor), "max": max(floor)}
    print_table([floor_row], ["what", "mean", "std", "min", "max"], "FID noise floor")

    model = load_model(ModelConfig(name="digits"))
    sampler = SamplerConfig(name="ddim", steps=args.steps)
    counts = [n for n in (256, 512, 1024, 2048, 4096) if n <= args.max_n]
    per_seed = {}
    for seed in range(args.seeds):
        x = generate(model, model.unet, sampler, args.max_n, seed, desc=f"FP samples seed {seed}")
        per_seed[seed] = {n: compute_metrics(x[:n], real, "digits", EvalConfig(n_samples=n, isc_splits=min(10, n // 64)))
                          for n in counts}
    rows = []
    for n in counts:
        fids = [per_seed[s][n]["fid"] for s in per_seed]
        iss = [per_seed[s][n]["is"] for s in per_seed]
        rows.append({"n_samples": n, "FID_mean": statistics.mean(fids), "FID_std": statistics.pstdev(fids),
                     "FID_range": max(fids) - min(fids), "IS_mean": statistics.mean(iss), "IS_std": statistics.pstdev(iss)})
    table = print_table(rows, ["n_samples", "FID_mean", "FID_std", "FID_range", "IS_mean", "IS_std"],
                        f"FP FID across {args.seeds} seeds (DDIM-{args.steps})")
    write_json(args.out / "results.json", {"floor": floor_row, "floor_values": floor, "spread": rows, "table": table,
                                           "per_seed": {str(k): {str(n): v for n, v in d.items()} for k, d in per_seed.items()}})


if __name__ == "__main__":
    main()
