"""Q-Diffusion on digits (the paper's Table 2 and its central claim): the recovered share of linear's FID gap.

For each bit setting runs linear (round-to-nearest) and qdiff with the given reconstruction budget on every
reconstruction seed (``--recon-seeds``, i.e. ``recon.seed``: the AdaRound/LSQ batch order) and evaluates each on
every sampling seed (``--seeds``; the reconstruction is cached by its settings, so extra sampling seeds cost only
sampling). Per (reconstruction, sampling seed): FID of FP, linear and qdiff on the same noise, and the recovered
share 1 - (FID_qdiff - FID_fp) / (FID_linear - FID_fp) (paper: 0.988 on CIFAR-10 W4A8) with a paired bootstrap
interval (``Scorer.recovered_share``: one resample of noise indices applied to all three sets). The table gives,
per reconstruction, the mean over sampling seeds and the lowest interval bound; the cost of the run that built it.
Runs that already have a metrics.json under --out are reused. Prints a Markdown table, writes JSON.

    python experiments/bench_qdiff.py [--bits w4a8 w4a32] [--seeds 0 1] [--recon-seeds 0 1 2] [--tag cpu] [overrides ...]
    python experiments/bench_qdiff.py --common model=digits_dit --out outputs/bench/dit/qdiff ...   # the digits DiT
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import ROOT, compose, print_table, run_one, write_json


def fp_samples(overrides: list[str], out_dir: Path, models: dict):
    """The run's FP reference samples (the cached set every quantized run of that seed is compared with) and its
    spec; ``models`` caches the loaded FP model by its config, so it is loaded once."""
    from qdiff.stages.sample import fp_reference
    from qdiff.models import load_model
    from qdiff.spec import build_spec, run_prompts

    spec = build_spec(compose(overrides, out_dir))
    key = repr(spec.model)
    if key not in models:
        models[key] = load_model(spec.model)
    model = models[key]
    return fp_reference(model, spec, run_prompts(model, spec, spec.eval.n_samples, spec.seed))[0], spec, model


def run_dirs(out: Path, bits: str, tag: str, recon_seed: int, seed: int) -> tuple[Path, Path]:
    """(qdiff run, linear run) folders of one setting; the linear runs are shared with bench_linear."""
    sfx = "" if seed == 0 else f"_seed{seed}"
    rsfx = "" if recon_seed == 0 else f"_rs{recon_seed}"
    return out / f"qdiff_{bits}_{tag}{rsfx}{sfx}", out.parent / "linear" / f"linear_{bits}{sfx}"


def samples_of(run_dir: Path):
    from qdiff.io import load_state_dict_file

    return load_state_dict_file(run_dir / "samples.safetensors")["samples"].float() / 127.5 - 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", nargs="+", default=["w4a8", "w4a32"])
    p.add_argument("--tag", default="default", help="names the qdiff runs of this budget/setting")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling/evaluation seeds")
    p.add_argument("--recon-seeds", type=int, nargs="+", default=[0], help="reconstruction seeds (recon.seed)")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples for the recovered share's interval")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "qdiff")
    p.add_argument("--common", default="", help="Hydra overrides for every run, FP and linear too (space-separated)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for the qdiff runs (e.g. recon.weight_iters=2000)")
    args = p.parse_args()
    from qdiff.eval.fidelity import Scorer

    rows, scorer, common, models = [], None, args.common.split(), {}
    for bits in args.bits:
        for rs in args.recon_seeds:
            per_seed, cost = [], None
            for seed in args.seeds:
                q_dir, lin_dir = run_dirs(args.out, bits, args.tag, rs, seed)
                lin = run_one([f"quant={bits}", "quant.method=linear", f"seed={seed}", *common], lin_dir)
                q = run_one([f"quant={bits}", "quant.method=qdiff", f"seed={seed}", f"recon.seed={rs}", *common, *args.overrides],
                            q_dir)
                fp, spec, model = fp_samples([f"quant={bits}", f"seed={seed}", *common], q_dir, models)
                if scorer is None:
                    scorer = Scorer(model.real_images(), "digits", spec.eval)
                rec = scorer.recovered_share(samples_of(q_dir), samples_of(lin_dir), fp, args.bootstrap)
                per_seed.append({"seed": seed, "fp": q["fp"]["fid"], "linear": lin["fid"], "qdiff": q["fid"], **rec,
                                 "qdiff_ci95": q.get("fid_ci95"), "mse_vs_fp": q.get("mse_vs_fp"),
                                 "kid": q.get("kid"), "precision": q.get("precision"), "recall": q.get("recall")})
                cost = cost or q  # the run that built the reconstruction (later seeds reuse it)
            recs = [r["recovered"] for r in per_seed]
            recon = cost.get("reconstruction", {})
            rows.append({
                "bits": q["quant"], "recon_seed": rs, "FP": statistics.mean(r["fp"] for r in per_seed),
                "linear": statistics.mean(r["linear"] for r in per_seed), "qdiff": statistics.mean(r["qdiff"] for r in per_seed),
                "recovered": statistics.mean(recs), "lowest_ci95": min(r["recovered_ci95"][0] for r in per_seed),
                "per_seed": " ".join(f"{r['recovered']:.3f} [{r['recovered_ci95'][0]:.3f}, {r['recovered_ci95'][1]:.3f}]"
                                     for r in per_seed),
                "mse_vs_fp": statistics.mean(r["mse_vs_fp"] for r in per_seed),
                "recon_s": recon.get("seconds_total", 0.0), "total_s": cost["cost"]["total_seconds"], "seeds": per_seed,
            })
    table = print_table(rows, ["bits", "recon_seed", "FP", "linear", "qdiff", "recovered", "lowest_ci95", "per_seed",
                               "mse_vs_fp", "recon_s", "total_s"],
                        f"Q-Diffusion vs linear on digits [{args.tag}], sampling seeds {args.seeds} "
                        f"{' '.join(common)} (FID; recovered: mean over sampling seeds, per seed with its paired bootstrap 95% interval)")
    write_json(args.out / f"results_{args.tag}.json", {"rows": rows, "table": table, "overrides": args.overrides,
                                                       "seeds": args.seeds, "recon_seeds": args.recon_seeds})


if __name__ == "__main__":
    main()
