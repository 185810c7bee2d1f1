"""Q-Diffusion on digits (issue 4; the paper's Table 2 and its central claim): recovered share of the FID gap.

For each bit setting runs linear (round-to-nearest) and qdiff with the given reconstruction budget, then
reports FID/IS, gap recovered = 1 - (FID_qdiff - FID_fp) / (FID_linear - FID_fp) (paper: 0.988 on
CIFAR-10 W4A8), and the cost (calibration, reconstruction, total seconds). Runs that already have a
metrics.json under --out are reused. Prints a Markdown table, writes JSON.

    python experiments/bench_qdiff.py [--bits w4a8 w4a32 w8a8 w8a32] [--tag default] [extra Hydra overrides ...]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import ROOT, gap_recovered, print_table, run_one, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", nargs="+", default=["w4a8", "w4a32"])
    p.add_argument("--tag", default="default", help="names the qdiff runs of this budget/setting")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "qdiff")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for the qdiff runs (e.g. recon.weight_iters=2000)")
    args = p.parse_args()
    rows = []
    for bits in args.bits:
        lin = run_one([f"quant={bits}", "quant.method=linear"], args.out.parent / "linear" / f"linear_{bits}")  # shared with bench_linear
        q = run_one([f"quant={bits}", "quant.method=qdiff", *args.overrides], args.out / f"qdiff_{bits}_{args.tag}")
        fp = q["fp"]["fid"]
        rec = q.get("reconstruction", {})
        rows += [
            {"bits": q["quant"], "method": "fp", "FID": fp, "IS": q["fp"]["is"]},
            {"bits": q["quant"], "method": "linear", "FID": lin["fid"], "IS": lin["is"]},
            {"bits": q["quant"], "method": f"qdiff[{args.tag}]", "FID": q["fid"], "IS": q["is"],
             "recovered": gap_recovered(q["fid"], fp, lin["fid"]),
             "calib_s": q["cost"]["seconds"].get("calib_data", 0.0), "recon_s": rec.get("seconds_total", 0.0),
             "total_s": q["cost"]["total_seconds"], "overrides": " ".join(args.overrides)},
        ]
    table = print_table(rows, ["bits", "method", "FID", "IS", "recovered", "calib_s", "recon_s", "total_s"],
                        f"Q-Diffusion vs linear on digits [{args.tag}]")
    write_json(args.out / f"results_{args.tag}.json", {"rows": rows, "table": table, "overrides": args.overrides})


if __name__ == "__main__":
    main()
