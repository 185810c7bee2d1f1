"""The int8 artifact against compiled FP32 at a few batch sizes, in one process (issue 13's latency target).

Loads a run's artifact with ``backend="int8"`` and the FP digits UNet through the same export + inductor path
(``compile_fp``), then times one noise estimate per variant at each batch size: 30 interleaved rounds, rotating
order, medians (``qdiff.deploy.stage.latency_ms``). Meaningful only on a quiet machine. Prints a table, writes JSON.

    python experiments/benchmarks/bench_int8_latency.py <run_dir or artifact dir> [--batches 64 256] [--repeats 30]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import ROOT, print_table, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path)
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "int8_latency")
    args = p.parse_args()
    from qdiff.deploy import load_deployed
    from qdiff.deploy.int8 import compile_fp
    from qdiff.deploy.stage import latency_ms
    from qdiff.models import load_model
    from qdiff.models.config import ModelConfig

    path = args.artifact / "quantized_unet" if (args.artifact / "quantized_unet").is_dir() else args.artifact
    model = load_model(ModelConfig(name="digits"))
    variants = {"fp_compiled": compile_fp(model.unet), "int8": load_deployed(path, "int8")}
    rows = []
    for b in args.batches:
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(b, *model.sample_shape, generator=g), torch.full((b,), 500)
        lat = latency_ms(variants, x, t, {}, args.repeats)
        rows.append({"batch": b, "fp_compiled_ms": lat["fp_compiled"], "int8_ms": lat["int8"],
                     "speedup": round(lat["fp_compiled"] / lat["int8"], 3)})
    table = print_table(rows, list(rows[0]), f"int8 artifact vs compiled FP32, {torch.get_num_threads()} threads, "
                                             f"median of {args.repeats} interleaved calls")
    write_json(args.out / "results.json", {"rows": rows, "table": table, "artifact": str(path),
                                           "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
