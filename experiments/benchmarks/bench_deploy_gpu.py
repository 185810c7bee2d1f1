"""The deployed digits artifact on a GPU (issue 13, item 5): what runs there today, measured, not guessed.

qdiff's integer backend (``backend="int8"``) lowers to PyTorch's x86 oneDNN kernels and runs on the CPU only; on
a GPU the artifact loads with ``backend="simulated"`` (the packed integers expanded to float weights, activations
fake-quantized). This script loads a run's artifact (``<run>/quantized_unet``) on the GPU with no FP checkpoint,
checks it against the same artifact on the CPU (relative L2 of eps) and times one noise estimate at batch 1, 64 and
256 against the FP UNet in fp32, fp16 and bf16 (CUDA events, interleaved rounds, medians). It also records what
``backend="int8"`` answers on that device. Prints a table, writes JSON.

    python experiments/benchmarks/bench_deploy_gpu.py <run_dir or artifact dir> [--device cuda] [--repeats 50]
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from common import ROOT, interleaved_ms, medians, print_table, write_json


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def latency_ms(variants: dict, x: torch.Tensor, t: torch.Tensor, repeats: int, device: torch.device) -> dict:
    """Median ms of one call per variant (the shared interleaved timer; 3 warm-up calls each: cuDNN autotuning)."""
    from qdiff.models.base import eps

    calls = {k: (lambda m=m, dtype=dtype: eps(m, x.to(dtype), t)) for k, (m, dtype) in variants.items()}
    return medians(interleaved_ms(calls, repeats, device, warmup=3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path, help="a run directory (its quantized_unet/) or an artifact directory")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "deploy_gpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    path = args.artifact / "quantized_unet" if (args.artifact / "quantized_unet").is_dir() else args.artifact

    import qdiff
    from qdiff.deploy import artifact_sizes
    from qdiff.errors import ConfigError
    from qdiff.models import load_model
    from qdiff.models.base import eps
    from qdiff.models.config import ModelConfig

    t0 = time.perf_counter()
    sim = qdiff.load_deployed(path, backend="simulated", device=device)
    load_s = round(time.perf_counter() - t0, 2)
    sim_cpu = qdiff.load_deployed(path, backend="simulated", device="cpu")
    try:
        qdiff.load_deployed(path, backend="int8", device=device)
        int8_answer = "loaded"
    except ConfigError as e:
        int8_answer = str(e)
    fp32 = load_model(ModelConfig(name="digits")).unet.to(device)
    variants = {"fp32": (fp32, torch.float32), "fp16": (copy.deepcopy(fp32).half(), torch.float16),
                "bf16": (copy.deepcopy(fp32).to(torch.bfloat16), torch.bfloat16), "qdiff_simulated": (sim, torch.float32)}

    g = torch.Generator().manual_seed(0)
    n = max(args.batches)
    size = sim_cpu.config.sample_size
    x = torch.randn(n, sim_cpu.config.in_channels, size, size, generator=g)
    t = torch.full((n,), 500)
    with torch.no_grad():
        e_cpu = eps(sim_cpu, x[:64], t[:64])
        e_dev = eps(sim, x[:64].to(device), t[:64].to(device))
        e_fp = eps(fp32, x[:64].to(device), t[:64].to(device))
        errors = {"simulated_device_vs_cpu": rel_l2(e_dev, e_cpu), "simulated_vs_fp32": rel_l2(e_dev, e_fp)}
        for k in ("fp16", "bf16"):
            m, dt = variants[k]
            errors[f"{k}_vs_fp32"] = rel_l2(eps(m, x[:64].to(device, dt), t[:64].to(device)).float(), e_fp)
    rows = []
    for b in args.batches:
        lat = latency_ms(variants, x[:b].to(device), t[:b].to(device), args.repeats, device)
        rows.append({"batch": b, **{f"{k}_ms": v for k, v in lat.items()},
                     "simulated_over_fp16": round(lat["qdiff_simulated"] / lat["fp16"], 3)})
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "artifact": str(path), **artifact_sizes(path), "load_seconds": load_s, "eps_rel_l2": errors,
              "int8_backend_on_device": int8_answer, "latency": rows}
    print_table(rows, list(rows[0]), title=f"digits UNet on {result['device']}: one noise estimate (median ms)")
    print({k: f"{v:.2e}" for k, v in errors.items()})
    print("backend=int8 on this device:", int8_answer)
    write_json(args.out / "results.json", result)


if __name__ == "__main__":
    main()
