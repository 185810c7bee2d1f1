"""Which digits-classifier layer makes a digits FID readable from one run (issue 15)?

For every candidate layer of the classifier (``DigitsClassifier.layers``) measures, with the default sampler:
* the real-vs-real floor: FID between two random halves of the 1797 real digits (--splits splits);
* the FP spread: FP FID over --seeds sampling seeds at --n samples (and at n/2);
* the signal: linear W4A8's FID minus FP's on the same seed (paired), i.e. the gap the method has to close.
The readable layer has a small spread and floor against that gap: targets spread <= 3 % and floor <= 1/20.
Samples are cached under --out (FP and linear W4A8 per seed), so re-running only recomputes the metrics.

    python experiments/metric_layers.py [--seeds 0 1 2] [--n 1024]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from common import ROOT, print_table, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--splits", type=int, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "metric_layers")
    args = p.parse_args()

    import qdiff
    from qdiff.cache import save_tensors
    from qdiff.calib import CalibConfig, collect_calibration
    from qdiff.eval.config import DIGITS_LAYERS, EvalConfig
    from qdiff.eval.fidelity import Scorer
    from qdiff.io import load_state_dict_file
    from qdiff.models import ModelConfig, load_model
    from qdiff.sampling import SamplerConfig, generate

    model = load_model(ModelConfig(name="digits"))
    real = model.real_images()
    sampler = SamplerConfig(name="ddim", steps=100)

    def samples(kind: str, seed: int) -> torch.Tensor:
        f = args.out / f"{kind}_seed{seed}_n{args.n}.safetensors"
        if f.exists():
            return load_state_dict_file(f)["x"]
        unet = model.unet
        if kind == "linear_w4a8":
            calib, _ = collect_calibration(model, sampler, CalibConfig(T=100, c=5, n=64), ROOT / "outputs" / "cache")
            unet = qdiff.quantize(model.unet, qdiff.QuantConfig(method="linear", weight_bits=4, act_bits=8), calib)
        x = generate(model, unet, sampler, args.n, seed, desc=f"{kind} seed {seed}")
        save_tensors(f, {"x": x})
        return x

    sets = {(k, s): samples(k, s) for k in ("fp", "linear_w4a8") for s in args.seeds}
    rows, raw = [], {}
    for layer in DIGITS_LAYERS:
        cfg = EvalConfig(n_samples=args.n, digits_feature=layer, isc=False, kid=False, prc=False, bootstrap=0)
        half = len(real) // 2
        floor = []
        for s in range(args.splits):
            perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(s))
            floor.append(Scorer(real[perm[half:]], "digits", cfg).fid(Scorer(real[perm[:half]], "digits", cfg).real))
        scorer = Scorer(real, "digits", cfg)
        fid = {k: scorer.fid(scorer.features(x)[layer]) for k, x in sets.items()}
        fid_half = {s: scorer.fid(scorer.features(sets[("fp", s)][: args.n // 2])[layer]) for s in args.seeds}
        fp = [fid[("fp", s)] for s in args.seeds]
        gap = [fid[("linear_w4a8", s)] - fid[("fp", s)] for s in args.seeds]
        g = statistics.mean(gap)
        rows.append({"layer": layer, "dim": int(scorer.real.shape[1]), "floor": statistics.mean(floor),
                     "floor_sd": statistics.stdev(floor), "FP": statistics.mean(fp), "FP_sd": statistics.stdev(fp),
                     f"FP_sd_n{args.n // 2}": statistics.stdev(fid_half.values()), "gap": g, "gap_sd": statistics.stdev(gap),
                     "FP_sd/gap": statistics.stdev(fp) / g, "floor/gap": statistics.mean(floor) / g})
        raw[layer] = {"floor": floor, "fid": {f"{k}_seed{s}": v for (k, s), v in fid.items()},
                      "fp_half": {str(s): v for s, v in fid_half.items()}}
    table = print_table(rows, list(rows[0]), f"digits FID by classifier layer: floor (real halves, {args.splits} splits), "
                                             f"FP over seeds {args.seeds} at n={args.n}, linear W4A8 - FP (paired)")
    write_json(args.out / "results.json", {"rows": rows, "raw": raw, "table": table, "seeds": args.seeds, "n": args.n})


if __name__ == "__main__":
    main()
