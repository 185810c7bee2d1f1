"""Q-Diffusion on digits (issue 4; the paper's Table 2 and its central claim): recovered share of the FID gap.

For each bit setting runs linear (round-to-nearest) and qdiff with the given reconstruction budget, then
reports FID/IS, gap recovered = 1 - (FID_qdiff - FID_fp) / (FID_linear - FID_fp) (paper: 0.988 on
CIFAR-10 W4A8), and the cost (calibration, reconstruction, total seconds). With several --seeds, every
model is evaluated on each sampling seed (the reconstruction is cached by its settings, so extra seeds
cost only sampling) and the table gives mean and standard deviation over seeds. Runs that already have
a metrics.json under --out are reused. Prints a Markdown table, writes JSON.

    python experiments/bench_qdiff.py [--bits w4a8 w4a32 w8a8 w8a32] [--seeds 0 1 2] [--tag cpu] [Hydra overrides ...]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import ROOT, gap_recovered, print_table, run_one, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", nargs="+", default=["w4a8", "w4a32"])
    p.add_argument("--tag", default="default", help="names the qdiff runs of this budget/setting")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling/evaluation seeds")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "qdiff")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for the qdiff runs (e.g. recon.weight_iters=2000)")
    args = p.parse_args()
    rows = []

    def stat(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    for bits in args.bits:
        per_seed, costs = [], None
        for seed in args.seeds:
            sfx = "" if seed == 0 else f"_seed{seed}"
            lin = run_one([f"quant={bits}", "quant.method=linear", f"seed={seed}"],
                          args.out.parent / "linear" / f"linear_{bits}{sfx}")  # shared with bench_linear
            q = run_one([f"quant={bits}", "quant.method=qdiff", f"seed={seed}", *args.overrides],
                        args.out / f"qdiff_{bits}_{args.tag}{sfx}")
            per_seed.append((q["fp"]["fid"], q["fp"]["is"], lin["fid"], lin["is"], q["fid"], q["is"],
                             gap_recovered(q["fid"], q["fp"]["fid"], lin["fid"])))
            costs = costs or q  # cost of the run that built the reconstruction (later seeds reuse it)
        cols = list(zip(*per_seed))
        (fp, fp_sd), (lin_fid, lin_sd), (q_fid, q_sd), (recov, recov_sd) = (stat(list(cols[i])) for i in (0, 2, 4, 6))
        rec = costs.get("reconstruction", {})
        label = q["quant"]
        rows += [
            {"bits": label, "method": "fp", "FID": fp, "FID_sd": fp_sd, "IS": statistics.mean(cols[1])},
            {"bits": label, "method": "linear", "FID": lin_fid, "FID_sd": lin_sd, "IS": statistics.mean(cols[3])},
            {"bits": label, "method": f"qdiff[{args.tag}]", "FID": q_fid, "FID_sd": q_sd, "IS": statistics.mean(cols[5]),
             "recovered": recov, "recovered_sd": recov_sd, "recovered_per_seed": [round(v, 4) for v in cols[6]],
             "calib_s": costs["cost"]["seconds"].get("calib_data", 0.0), "recon_s": rec.get("seconds_total", 0.0),
             "total_s": costs["cost"]["total_seconds"], "overrides": " ".join(args.overrides)},
        ]
    table = print_table(rows, ["bits", "method", "FID", "FID_sd", "IS", "recovered", "recovered_sd", "recon_s", "total_s"],
                        f"Q-Diffusion vs linear on digits [{args.tag}], seeds {args.seeds} (mean, sd over seeds)")
    write_json(args.out / f"results_{args.tag}.json", {"rows": rows, "table": table, "overrides": args.overrides, "seeds": args.seeds})


if __name__ == "__main__":
    main()
