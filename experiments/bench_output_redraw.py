"""How much of one quantized digits result is the output layer's rounding draw.

Takes one reconstruction made by bench_qdiff.py (same ``--bits``/``--tag``/``--recon-seed`` and overrides, same
folders), re-learns only the output layer's AdaRound with ``--draws`` other batch orders (from FP weights, alone,
activations FP, then the output bias match when the run used it, as the pipeline does; everything else stays as
built), and evaluates every draw on the sampling seeds: the recovered share of linear's FID gap with its paired
bootstrap interval, the final-sample MSE against FP from the same noise, and the bias match's probe MSE.
The first row is the reconstruction as built. The spread over the draws is a floor under any comparison of
single reconstructions: a difference smaller than it says nothing about the method.

    python experiments/bench_output_redraw.py --bits w4a32 --tag cpu1k --recon-seed 1 --draws 6 [--seeds 0 1] [overrides ...]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import ROOT, compose, print_table, write_json

#: Batch-order seeds of the re-drawn output layer (apart from the pipeline's: recon.seed * 100003 + position).
DRAW_SEED0 = 1_000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="w4a32")
    p.add_argument("--tag", default="cpu1k", help="the bench_qdiff.py tag of the reconstruction")
    p.add_argument("--recon-seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampling/evaluation seeds")
    p.add_argument("--bootstrap", type=int, default=100)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "qdiff")
    p.add_argument("overrides", nargs="*", help="the Hydra overrides the reconstruction was made with")
    args = p.parse_args()

    import numpy as np
    import torch

    import qdiff
    from bench_qdiff import fp_samples, run_dirs, samples_of
    from qdiff.calib import collect_calibration
    from qdiff.eval.fidelity import Scorer, to_uint8
    from qdiff.quant.split import execution_order
    from qdiff.quant.wrap import init_weight_quantizers
    from qdiff.recon.output import output_layer
    from qdiff.recon.steps import Context, OutputBiasMatch, WeightRounding
    from qdiff.recon.units import Unit
    from qdiff.sampling import generate
    from qdiff.spec import build_spec

    dirs = {s: run_dirs(args.out, args.bits, args.tag, args.recon_seed, s) for s in args.seeds}
    q_dirs, lin_dirs = {s: d[0] for s, d in dirs.items()}, {s: d[1] for s, d in dirs.items()}
    missing = [str(d) for d in [*q_dirs.values(), *lin_dirs.values()] if not (d / "samples.safetensors").exists()]
    artifact = q_dirs[args.seeds[0]] / "quantized_unet"
    if missing or not artifact.exists():
        raise SystemExit(f"missing {', '.join(missing) or artifact}: run experiments/bench_qdiff.py --bits {args.bits} "
                         f"--tag {args.tag} --recon-seeds {args.recon_seed} --seeds {' '.join(map(str, args.seeds))} first")
    spec = build_spec(compose([f"quant={args.bits}", "quant.method=qdiff", f"recon.seed={args.recon_seed}", *args.overrides],
                              q_dirs[args.seeds[0]]))
    if spec.recon.num_samples is not None:
        raise SystemExit("recon.num_samples is set: this script re-learns on every calibration row (the default)")
    models: dict = {}
    refs = {s: fp_samples([f"quant={args.bits}", f"seed={s}"], q_dirs[s], models)[0] for s in args.seeds}
    model = next(iter(models.values()))
    calib, _ = collect_calibration(model, spec.sampler, spec.calib, spec.cache_dir, spec.device, None, progress=False)
    scorer = Scorer(model.real_images(), "digits", spec.eval)
    linear = {s: samples_of(d) for s, d in lin_dirs.items()}

    def evaluate(name: str, samples: dict, probe: float | None) -> dict:
        per_seed = []
        for s in args.seeds:
            rec = scorer.recovered_share(samples[s], linear[s], refs[s], args.bootstrap)
            per_seed.append({"seed": s, **rec, "mse_vs_fp": float(((samples[s] - refs[s]) ** 2).mean())})
        row = {"draw": name, "recovered": statistics.mean(r["recovered"] for r in per_seed),
               "per_seed": " ".join(f"{r['recovered']:.3f} [{r['recovered_ci95'][0]:.3f}, {r['recovered_ci95'][1]:.3f}]"
                                    for r in per_seed),
               "mse_vs_fp": statistics.mean(r["mse_vs_fp"] for r in per_seed), "probe_mse": probe, "seeds": per_seed}
        print(f"{name}: recovered {row['recovered']:.3f} ({row['per_seed']}), MSE vs FP {row['mse_vs_fp']:.4f}", flush=True)
        return row

    rows = [evaluate("as built", {s: samples_of(d) for s, d in q_dirs.items()}, None)]
    x0, t0, c0 = calib.get([0], spec.device)
    # the layer that runs last, as the engine finds it: the FP network's execution order, the quantized model's layers
    name = output_layer(qdiff.load_deployed(artifact, device=spec.device), execution_order(model.unet, (x0, t0), c0))
    fp_layer = model.unet.get_submodule(name)
    for d in range(args.draws):
        q = qdiff.load_deployed(artifact, device=spec.device)
        layer = q.get_submodule(name)
        with torch.no_grad():  # back to FP weights and the FP bias, step sizes searched again as the pipeline does
            layer.weight.copy_(fp_layer.weight)
            if layer.bias is not None:
                layer.bias.copy_(fp_layer.bias)
        init_weight_quantizers(layer, spec.quant.resolved_scale_method, spec.quant.lp)
        ctx = Context(model.unet, q, calib, spec.quant, spec.recon, torch.device(spec.device), np.arange(len(calib)))
        WeightRounding(Unit(name, "layer", layer.org_type, 1), DRAW_SEED0 + d).run(ctx)
        probe = OutputBiasMatch(name).run(ctx).extra["probe_mse_final"] if spec.recon.output_bias_match else None
        samples = {s: to_uint8(generate(model, q, spec.sampler, len(refs[s]), s, spec.device, progress=False)).float() / 127.5 - 1
                   for s in args.seeds}
        rows.append(evaluate(f"redraw {d}", samples, probe))
    redrawn = [r["recovered"] for r in rows[1:]]
    summary = {"min": min(redrawn), "mean": statistics.mean(redrawn), "max": max(redrawn)} if redrawn else {}
    table = print_table(rows, ["draw", "recovered", "per_seed", "mse_vs_fp", "probe_mse"],
                        f"{args.bits} [{args.tag}] reconstruction seed {args.recon_seed}: the output layer ({name}) "
                        f"re-learned with {args.draws} other batch orders; sampling seeds {args.seeds}"
                        + (f"; re-drawn min / mean / max {summary['min']:.3f} / {summary['mean']:.3f} / {summary['max']:.3f}"
                           if summary else ""))
    write_json(args.out / f"redraw_{args.bits}_{args.tag}_rs{args.recon_seed}.json",
               {"rows": rows, "summary": summary, "table": table, "overrides": args.overrides, "seeds": args.seeds})


if __name__ == "__main__":
    main()
