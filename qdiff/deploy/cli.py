"""``python -m qdiff.deploy <run_dir or artifact> [--out DIR] [--check int8]``: a run's deployable artifact.

Every quantized run writes its model as a packed artifact (``<run_dir>/quantized_unet``: safetensors + JSON,
see :mod:`qdiff.deploy.artifact`). This command verifies it rebuilds from the files alone, prints its size
against FP32 and its layer table's bit widths, copies it to ``--out`` for shipping, and with ``--check int8``
runs it on the int8 backend next to the simulated model (relative L2 of eps at t = 10, 500, 990, and the int8
kernels inductor produced). In Python, ``qdiff.export(qmodel, path)`` writes an artifact. (``python -m
qdiff.export`` is the old spelling of this command: it still works, with a deprecation warning.)
"""
from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path


def _artifact_dir(path: Path) -> Path:
    return path / "quantized_unet" if (path / "quantized_unet" / "deploy.json").is_file() else path


def check(path: Path, backend: str) -> dict:
    """Relative L2 of ``backend``'s eps vs the simulated model's on seeded noise at three timesteps."""
    import torch

    from qdiff.deploy import load_deployed
    from qdiff.deploy.artifact import Artifact
    from qdiff.models import eps

    shape = Artifact(path).meta["extra"].get("sample_shape")
    if shape is None:
        raise SystemExit(f"error: {path} does not record its sample shape (deploy.json extra.sample_shape)")
    sim, other = load_deployed(path, "simulated"), load_deployed(path, backend)
    x = torch.randn((8, *shape), generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.no_grad():
        for step in (10, 500, 990):
            t = torch.full((8,), step)
            ref = eps(sim, x, t)
            out[f"rel_l2_t{step}"] = float((eps(other, x, t) - ref).norm() / ref.norm())
    out["kernels"] = getattr(other, "kernels", {})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qdiff.deploy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a run directory (holding quantized_unet/) or an artifact directory")
    p.add_argument("--out", type=Path, help="copy the verified artifact here")
    p.add_argument("--check", choices=["int8"], help="also run it on this backend against the simulated model")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it is not empty (refused otherwise)")
    args = p.parse_args(argv)
    from qdiff.cache import publish_folder
    from qdiff.deploy import artifact_sizes
    from qdiff.deploy.artifact import Artifact, refuse_nonempty
    from qdiff.deploy.simulated import load_simulated
    from qdiff.errors import QDiffError

    src = _artifact_dir(args.path)
    try:
        if args.out:
            refuse_nonempty(args.out, args.overwrite, "--out")
        art = Artifact(src)
        load_simulated(art)
    except QDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sizes = artifact_sizes(src)
    bits = Counter(f"W{s.weight_bits}A{s.act_bits}" for s in art.specs)
    print(f"{src}: {art.meta['architecture']['class']}, {len(art.specs)} quantized layers "
          f"({', '.join(f'{n} {k}' for k, n in sorted(bits.items()))}; {sum(1 for s in art.specs if s.split)} split)")
    print(f"  {sizes['artifact_bytes']:,} bytes = {sizes['ratio_to_fp32']:.3f} of the FP32 weights ({sizes['fp32_bytes']:,} bytes); "
          "rebuilds from the artifact alone")
    if args.check:
        for k, v in check(src, args.check).items():
            print(f"  {args.check} {k}: {v}")
    if args.out:
        with publish_folder(args.out, args.overwrite, "--out") as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        print(f"  copied to {args.out}")
    return 0
