"""Linear-quantization baseline on the embedded digits model (issue 3; the paper's "Linear Quant" rows).

Runs FP and channel-wise round-to-nearest W8A32, W4A32, W8A8, W4A8 with the default sampler (DDIM-100,
1024 samples), and reports FID, IS, the per-step FP-vs-quantized MSE (Fig. 2) and sampling time relative
to FP (target: simulated-quant sampling <= 1.5x FP). Prints a Markdown table, writes JSON.

    python experiments/bench_linear.py [--out outputs/bench/linear] [--n-samples 1024]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import ROOT, print_table, run_one, write_json

SETTINGS = [("fp", "fp"), ("linear", "w8a32"), ("linear", "w4a32"), ("linear", "w8a8"), ("linear", "w4a8")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "linear")
    p.add_argument("--n-samples", type=int, default=1024)
    args = p.parse_args()
    rows = []
    for method, quant in SETTINGS:
        ov = [f"quant={quant}", f"eval.n_samples={args.n_samples}"] + ([f"quant.method={method}"] if quant != "fp" else [])
        m = run_one(ov, args.out / f"{method}_{quant}")
        rows.append({"method": method, "bits": m["quant"], "FID": m["fid"], "IS": m["is"],
                     "sample_s": m["cost"]["seconds"]["sample"],
                     "step_mse_mean": m.get("analysis", {}).get("step_mse_mean", 0.0),
                     "step_mse_last": m.get("analysis", {}).get("step_mse_last", 0.0),
                     "output_dir": m["output_dir"]})
    fp_time = rows[0]["sample_s"]
    for r in rows:
        r["time_vs_fp"] = r["sample_s"] / fp_time
    table = print_table(rows, ["method", "bits", "FID", "IS", "step_mse_mean", "step_mse_last", "sample_s", "time_vs_fp"],
                        f"Linear quantization on digits (DDIM-100, {args.n_samples} samples)")
    write_json(args.out / "results.json", {"rows": rows, "table": table})


if __name__ == "__main__":
    main()
