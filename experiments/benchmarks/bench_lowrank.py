"""The low-rank branch's cost on the digits UNet's convolutions: the branch as qdiff runs it
(``qdiff.quant.layers.lowrank_branch``: the k x k down conv, then the rank-r up projection as one batched matmul)
against the same branch with the up projection as a 1x1 conv, beside the layer's own conv, for every distinct conv
shape of the model at the sampling batch size.

Interleaved rounds, rotating order, medians (``qdiff.runtime.interleaved_ms``); the two branches are checked to
agree within float rounding. Meaningful only on a quiet machine. Prints a table, writes JSON.

    python experiments/benchmarks/bench_lowrank.py [--batch 256] [--rank 8] [--rounds 15] [--threads 2]
"""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from common import ROOT, interleaved_ms, medians, print_table, write_json


def conv_shapes(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> list[tuple]:
    """(input shape, weight shape, kwargs) of every distinct Conv2d call of one forward."""
    seen: dict = {}

    def hook(m, inp, out):
        key = (tuple(inp[0].shape), tuple(m.weight.shape), m.stride, m.padding)
        seen.setdefault(key, {"stride": m.stride, "padding": m.padding, "calls": 0})["calls"] += 1

    hs = [m.register_forward_hook(hook) for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        unet(x, t)
    for h in hs:
        h.remove()
    return [(k[0], k[1], v) for k, v in seen.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "lowrank" / "lowrank.json")
    args = p.parse_args()
    from qdiff.models import load_model
    from qdiff.models.config import ModelConfig
    from qdiff.quant.layers import lowrank_branch

    torch.set_num_threads(args.threads)
    model = load_model(ModelConfig(name="digits"))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(args.batch, *model.sample_shape, generator=g), torch.full((args.batch,), 500)
    rows = []
    for xs, ws, kw in conv_shapes(model.unet, x, t):
        if ws[1] <= args.rank or ws[0] <= args.rank:
            continue  # no branch where the rank is not below both sizes
        a = torch.randn(xs, generator=g)
        w = torch.randn(ws, generator=g)
        down = torch.randn(args.rank, *ws[1:], generator=g)
        up = torch.randn(ws[0], args.rank, generator=g)
        ck = {"stride": kw["stride"], "padding": kw["padding"]}
        calls = {"layer conv": lambda: F.conv2d(a, w, **ck),
                 "branch, up as 1x1 conv": lambda: F.conv2d(F.conv2d(a, down, **ck), up[:, :, None, None]),
                 "branch (qdiff)": lambda: lowrank_branch(a, down, up, F.conv2d, ck, linear=False)}
        with torch.no_grad():
            err = (calls["branch, up as 1x1 conv"]() - calls["branch (qdiff)"]()).abs().max().item()
            ms = medians(interleaved_ms(calls, args.rounds))
        rows.append({"input": "x".join(map(str, xs)), "weight": "x".join(map(str, ws)), "calls": kw["calls"],
                     **{f"{k} ms": v for k, v in ms.items()},
                     "1x1 conv / qdiff": round(ms["branch, up as 1x1 conv"] / ms["branch (qdiff)"], 2), "max |diff|": err})
    names = list(calls)
    total = {k: sum(r[f"{k} ms"] * r["calls"] for r in rows) for k in names}
    cols = ["input", "weight", "calls", *(f"{k} ms" for k in names), "1x1 conv / qdiff", "max |diff|"]
    print_table(rows, cols, f"rank-{args.rank} branch on the digits UNet's convs, batch {args.batch}, {args.threads} thread(s), "
                            f"medians of {args.rounds} interleaved rounds; {platform.processor() or platform.machine()}")
    print("one forward, summed over calls (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in total.items()))
    write_json(args.out, {"batch": args.batch, "rank": args.rank, "threads": args.threads, "rounds": args.rounds,
                          "torch": torch.__version__, "rows": rows, "per_forward_ms": total})


if __name__ == "__main__":
    main()
