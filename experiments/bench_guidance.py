"""The digits DiT's classifier-free guidance scale, chosen as DiT's is: by the FP model's FID (digits metric).

For each number of DDIM steps and guidance scale: 512 FP samples (labels 0..9 in turn, seeds 0 and 1) scored against
the 1797 real digits. Prints a table, writes JSON (``outputs/bench/dit/guidance.json``).

    python experiments/bench_guidance.py [--steps 25 50] [--scales 1.0 1.5 2.0 3.0] [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import ROOT, compose, print_table, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "dit" / "guidance.json")
    args = p.parse_args()
    from qdiff.eval.fidelity import Scorer
    from qdiff.models import load_model
    from qdiff.sampling import generate
    from qdiff.spec import build_spec, run_prompts

    rows, scorer = [], None
    for steps, g in ((s, g) for s in args.steps for g in args.scales):
        spec = build_spec(compose(["model=digits_dit", f"model.guidance_scale={g}", f"sampler.steps={steps}"],
                                  args.out.parent / "guidance_run"))
        model = load_model(spec.model)
        scorer = scorer or Scorer(model.real_images(), "digits", spec.eval)
        for seed in args.seeds:
            t0 = time.perf_counter()
            images = generate(model, model.unet, spec.sampler, spec.eval.n_samples, seed, "cpu",
                              run_prompts(model, spec, spec.eval.n_samples, seed), progress=False)
            scores = scorer(images)
            rows.append({"steps": steps, "guidance": g, "seed": seed, "fid": scores["fid"], "is": scores["is"],
                         "precision": scores.get("precision"), "recall": scores.get("recall"),
                         "seconds": round(time.perf_counter() - t0, 1)})
    text = print_table(rows, ["steps", "guidance", "seed", "fid", "is", "precision", "recall", "seconds"],
                       "digits DiT, FP: FID (conv2_pool2 digits features) by DDIM steps and classifier-free guidance scale, "
                       "512 samples")
    write_json(args.out, {"rows": rows, "table": text})


if __name__ == "__main__":
    main()
