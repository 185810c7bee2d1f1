"""Makespan of Stable Diffusion v1.4's W4A8 calibration on K GPUs with ``recon.workers=K`` (issue 26), from measured
per-unit costs.

Reads the H200 measurement of ``experiments/benchmarks/bench_sd_block.py`` (``docs/measurements/sd14_block_h200.json``: every one
of the 80 units' FP forward time at batch 32, the fitted optimisation-step time a + b * forward, the LSQ/AdaRound step
ratio, the whole UNet's FP and fake-quantized forward, model setup seconds) and schedules the paper's budget (20k
AdaRound + 5k LSQ steps per unit, N = 6400 calibration inputs) the way qdiff runs it:

* ``quantized`` (the paper, one process): per unit, capture N inputs through the quantized and the FP prefix, AdaRound;
  then the same with LSQ.
* ``fp`` (``recon.input_source=fp``, what ``recon.workers > 1`` does by default): AdaRound and LSQ of every unit on FP inputs (capture through the FP prefix only),
  each phase split over K jobs by :func:`qdiff.recon.parallel.split` on qdiff's own cost model; every job pays the
  model setup once per phase.
* ``fp_then_quantized``: the AdaRound phase as ``fp``, the LSQ phase in
  one process on quantized inputs (the sequential refinement).

Generating the calibration set (256 trajectories x 50 steps x 2 branches) comes first in every mode. Prints a table
(hours) with what bounds each makespan and writes JSON. Needs no GPU: it reads the measurement.

    python experiments/benchmarks/bench_makespan.py [--measurement docs/measurements/sd14_block_h200.json] [--workers 1 8 16 80]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, print_table, write_json
from qdiff.recon.parallel import STEP_MS, split


def unit_costs(m: dict, capture_batch: int = 32) -> list[dict]:
    """Seconds of each unit's pieces under the paper's budget, from the measurement ``m``."""
    paper, fwd = m["paper_budget"], m["unit_fwd_ms"]
    step_fwd = m.get("unit_step_fwd_ms", fwd)   # the forwards the step model was fitted on (bf16 for bf16-mixed steps)
    a, b, lsq_ratio = m["step_model_ms"]["a"], m["step_model_ms"]["b"], m["step_model_ms"]["lsq_over_adaround"]
    fp_total, q_total = m["fwd_ms_batch32"]["fp"], m["fwd_ms_batch32"]["fake_quant_w4a8"]
    scale = fp_total / sum(fwd.values())  # unit forwards miss the glue between units
    batches = paper["N"] / capture_batch
    rows, prefix = [], 0.0
    for name, f in fwd.items():  # execution order
        prefix += f
        step_ms = a + b * step_fwd[name]
        rows.append({
            "unit": name, "fwd_ms": f,
            "adaround_s": step_ms * paper["weight_iters"] / 1e3,
            "lsq_s": step_ms * lsq_ratio * paper["act_iters"] / 1e3,
            "capture_fp_s": batches * prefix * scale / 1e3,                            # FP prefix only
            "capture_q_s": batches * prefix * scale * (1 + q_total / fp_total) / 1e3,  # quantized and FP prefix
            "qdiff_cost": STEP_MS[0] + STEP_MS[1] * f,                                 # what qdiff balances on
        })
    return rows


def parallel_phase(units: list[dict], k: int, piece: str, capture: str, setup_s: float) -> tuple[float, float, dict]:
    """(makespan s, GPU-seconds, what bounds it) of one phase on ``k`` jobs split as qdiff splits it."""
    shares = split(units, k, cost=lambda u: u["qdiff_cost"])
    loads = [setup_s + sum(u[piece] + u[capture] for u in share) for share in shares]
    largest = max(units, key=lambda u: u[piece] + u[capture])
    return max(loads), sum(loads), {"largest_unit": largest["unit"],
                                    "largest_unit_s": round(setup_s + largest[piece] + largest[capture], 1)}


def sequential_phase(units: list[dict], piece: str, capture: str) -> tuple[float, float]:
    s = sum(u[piece] + u[capture] for u in units)
    return s, s


def schedule(m: dict, k: int, mode: str) -> dict:
    units = unit_costs(m)
    setup = m["setup_seconds"]
    gen_s = m["paper_budget_estimate_gpu_hours"]["calib_generation_h"] * 3600
    info: dict = {}
    if mode == "quantized":
        (w, w_work), (a, a_work) = sequential_phase(units, "adaround_s", "capture_q_s"), sequential_phase(units, "lsq_s", "capture_q_s")
        bound = "the sum of all units (one process)"
    else:
        w, w_work, info = parallel_phase(units, k, "adaround_s", "capture_fp_s", setup)
        if mode == "fp":
            a, a_work, _ = parallel_phase(units, k, "lsq_s", "capture_fp_s", setup)
        else:
            a, a_work = sequential_phase(units, "lsq_s", "capture_q_s")
        bound = f"the largest unit ({info['largest_unit']})" if w <= 1.05 * info["largest_unit_s"] else "total work / K"
        if mode == "fp_then_quantized" and a > w:
            bound = "the sequential LSQ pass on quantized inputs (the refinement)"
    return {"mode": mode, "K": k, "calib_h": round(gen_s / 3600, 2), "adaround_phase_h": round(w / 3600, 2),
            "lsq_phase_h": round(a / 3600, 2), "makespan_h": round((gen_s + w + a) / 3600, 2),
            "gpu_hours": round((gen_s + w_work + a_work) / 3600, 2), "bound": bound,
            "largest_unit_h": round(info["largest_unit_s"] / 3600, 2) if info else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measurement", type=Path, default=ROOT / "docs" / "measurements" / "sd14_block_h200.json")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 8, 16, 80])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "makespan" / "sd14_makespan.json")
    args = p.parse_args()
    m = json.loads(args.measurement.read_text())
    rows = [schedule(m, 1, "quantized")]
    for mode in ("fp_then_quantized", "fp"):
        rows += [schedule(m, k, mode) for k in args.workers]
    table = print_table(rows, ["mode", "K", "calib_h", "adaround_phase_h", "lsq_phase_h", "makespan_h", "gpu_hours", "largest_unit_h", "bound"],
                        f"SD v1.4 W4A8, paper budget, {m['units']} units, steps in {m.get('precision', '32-true')}, "
                        f"per-unit costs measured on {m['device']} "
                        f"({args.measurement.name}); hours")
    source = args.measurement.resolve()
    write_json(args.out, {"measurement": str(source.relative_to(ROOT) if source.is_relative_to(ROOT) else source), "rows": rows, "table": table,
                          "units": unit_costs(m)})


if __name__ == "__main__":
    main()
