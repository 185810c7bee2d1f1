"""Quantize diffusers pipelines in a few lines: an unconditional DDIM pipeline and a text-guided Stable Diffusion one.

    python experiments/examples/example_diffusers_pipeline.py      # ~1.5 min on 2 CPU cores, offline

Both pipelines are tiny and random-init (``qdiff.testing.tiny_pipeline``; with real weights the same lines
take ``DDIMPipeline.from_pretrained("google/ddpm-cifar10-32")`` or ``StableDiffusionPipeline.from_pretrained(...)``).
For each: ``qdiff.quantize_pipeline`` calibrates with the pipeline's own scheduler, steps, guidance scale and
text encoder, reconstructs the UNet at W4A8 and puts it back; ``pipe(...)`` then runs as before.
``qdiff.save_pipeline`` / ``qdiff.load_pipeline`` write and read a diffusers folder whose ``unet/`` is the
packed qdiff artifact. Printed: calibration data, reconstruction, how far the quantized pipeline's images
are from FP's from the same generator (next to round-to-nearest's; with random weights both are about equal,
the images being noise: ``example_custom_unet.py`` compares on a trained network), the saved size and that the
reloaded pipeline gives the same images.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle on a white table", "a blue square in the sky", "a green triangle near a lake",
           "a yellow star above a house"]


def images(pipe, text: bool, steps: int) -> torch.Tensor:
    """Two images from a fixed generator (prompts for text pipelines), as a tensor in [0, 1]."""
    args = ([PROMPTS[0], PROMPTS[1]],) if text else ()
    kwargs = {} if text else {"batch_size": 2}
    out = pipe(*args, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)
    return torch.from_numpy(out.images)


def example(kind: str, out: Path, weight_iters: int) -> None:
    import qdiff

    t0 = time.perf_counter()
    pipe = qdiff.testing.tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    text = kind == "stable_diffusion"
    steps = 10
    fp = images(pipe, text, steps)
    pipe = qdiff.quantize_pipeline(
        pipe, qdiff.QuantConfig(method="qdiff", weight_bits=4, act_bits=8),
        calib=qdiff.CalibConfig(T=steps, c=2, n=len(PROMPTS)),   # T = the steps the pipeline will run
        recon=qdiff.ReconConfig.preset("cpu", weight_iters=weight_iters, act_iters=weight_iters // 5),
        prompts=PROMPTS if text else None, work_dir=out / f"{kind}_recon", progress=False)
    rep = pipe.unet.qdiff_report
    cal = rep["calibration"]
    n_quant = sum(isinstance(m, qdiff.quant.QuantLayer) for m in pipe.unet.modules())
    print(f"== {type(pipe).__name__} ({kind}) ==")
    print(f"  calibration: {cal['N']} UNet inputs from {cal['scheduler']} T={cal['T']} c={cal['c']} n={cal['n']}, "
          f"guidance {cal['guidance']}" + (" (conditional + unconditional branch)" if text else ""))
    print(f"  reconstruction: {n_quant} quantized layers in {rep['n_units']} units, "
          f"rounding decided {rep['hard_fraction_mean']:.0%}, {rep['seconds']['reconstruct']:.0f} s")
    q = images(pipe, text, steps)
    linear = qdiff.testing.tiny_pipeline(kind)         # the round-to-nearest baseline at the same bits, for scale
    linear.set_progress_bar_config(disable=True)
    linear = qdiff.quantize_pipeline(linear, qdiff.QuantConfig(method="linear", weight_bits=4, act_bits=8),
                                     calib=qdiff.CalibConfig(T=steps, c=2, n=len(PROMPTS)),
                                     prompts=PROMPTS if text else None, progress=False)
    lin = images(linear, text, steps)
    print(f"  pipe(...) with the quantized UNet: images {tuple(q.shape)}; mean |image - FP image| from the same "
          f"generator: Q-Diffusion {float((q - fp).abs().mean()):.4f}, linear {float((lin - fp).abs().mean()):.4f}")
    sizes = qdiff.save_pipeline(pipe, out / kind, overwrite=True)  # this script's own folder
    loaded = qdiff.load_pipeline(out / kind)
    loaded.set_progress_bar_config(disable=True)
    same = torch.equal(images(loaded, text, steps), q)
    print(f"  saved to {out / kind}: UNet artifact {sizes['artifact_bytes']:,} bytes ({sizes['ratio_to_fp32']:.3f} of "
          f"FP32); qdiff.load_pipeline gives the same images: {same}  [{time.perf_counter() - t0:.0f} s]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weight-iters", type=int, default=200, help="AdaRound iterations per unit (paper: 20k)")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "examples" / "pipelines")
    args = ap.parse_args()
    torch.manual_seed(0)
    for kind in ("ddim", "stable_diffusion"):
        example(kind, args.out, args.weight_iters)


if __name__ == "__main__":
    main()
