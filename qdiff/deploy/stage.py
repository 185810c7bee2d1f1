"""The deploy stage of a run: the exported artifact loaded back with the configured backend; with ``deploy.timing``
also the latency and sampling-time measurements of FP eager, FP compiled, the simulated model and the deployed
artifact, always interleaved (every round calls each variant once, in a rotating order) so that background load
affects all alike; medians are reported."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from qdiff.models.base import eps


def deploy(model, qunet: nn.Module, artifact: Path, spec) -> tuple[nn.Module, dict[str, nn.Module], dict]:
    """Load the exported artifact with the configured backend; returns (deployed, timing variants, report). The
    variants and the latency table only with ``deploy.timing`` (else the variants are empty)."""
    from qdiff.deploy import artifact_sizes, load_deployed
    from qdiff.deploy.int8 import compile_fp

    cfg = spec.deploy
    t0 = time.perf_counter()
    options = {"compile": cfg.compile} if cfg.backend == "int8" else {}
    deployed = load_deployed(artifact, backend=cfg.backend, device=spec.device, **options)
    report = {"backend": cfg.backend, **artifact_sizes(artifact), "load_seconds": round(time.perf_counter() - t0, 2),
              "kernels": getattr(deployed, "kernels", {})}  # the backend's own dict: filled as shapes compile
    if not cfg.timing:
        return deployed, {}, report
    variants = {"fp_eager": model.unet, "simulated": qunet, "deployed": deployed}
    if spec.device.type == "cpu":
        variants["fp_compiled"] = compile_fp(model.unet)
    x, t, cond = _example(model, spec)
    batches = cfg.latency_batches or sorted({1, spec.sampler.batch_size})
    report["latency_ms"] = {str(b): latency_ms(variants, x[:b], t[:b], {k: v[:b] for k, v in cond.items()},
                                               cfg.latency_repeats) for b in batches}
    report["latency_speedup_vs_fp_compiled"] = {
        b: round(r["fp_compiled"] / r["deployed"], 3) for b, r in report["latency_ms"].items() if "fp_compiled" in r}
    return deployed, variants, report


def _example(model, spec) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A sampler-batch of model inputs (noise at a mid timestep; the prompts' encodings for text models)."""
    n = max(spec.deploy.latency_batches or [spec.sampler.batch_size])
    g = torch.Generator().manual_seed(spec.seed)
    x = torch.randn((n, *model.sample_shape), generator=g).to(spec.device)
    t = torch.full((n,), 500, device=spec.device)
    cond = {}
    if model.is_text_guided:
        cond = model.text_conditioning([""] * n, spec.device)
    elif model.is_class_conditional:
        cond = {"class_labels": torch.arange(n, device=spec.device) % model.num_classes}
    return x, t, cond


@torch.no_grad()
def latency_ms(variants: dict[str, nn.Module], x: torch.Tensor, t: torch.Tensor, cond: dict, repeats: int) -> dict:
    """Median milliseconds of one noise estimate per variant (after one warm-up call each, which compiles)."""
    from qdiff.runtime import interleaved_ms, medians

    return medians(interleaved_ms({k: (lambda u=u: eps(u, x, t, cond)) for k, u in variants.items()}, repeats, x.device))


@torch.no_grad()
def sample_interleaved(model, variants: dict[str, nn.Module], full: tuple[str, ...], spec, prompts, timed_batches: int,
                       progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Sample ``eval.n_samples`` with the ``full`` variants and the first ``timed_batches`` sampler batches with the
    others, batch by batch in a rotating order; returns (samples of the full variants, sampling-time report)."""
    from tqdm.auto import tqdm

    from qdiff.sampling import generate_batch, initial_noise

    n, bs = spec.eval.n_samples, spec.sampler.batch_size
    noise = initial_noise(model.sample_shape, n, spec.seed)
    n_batches = (n + bs - 1) // bs
    for name in variants:  # warm-up on the first batch's shape (compiles), not timed
        generate_batch(model, variants[name], _one_step(spec.sampler), noise, 0, spec.seed, spec.device, prompts)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in full}
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    bar = tqdm(total=n_batches, desc="sampling (simulated, deployed; FP timed)", unit="batch", disable=not progress)
    for b in range(n_batches):
        for k in names[b % len(names):] + names[:b % len(names)]:
            if k not in full and b >= timed_batches:
                continue
            t0 = time.perf_counter()
            images = generate_batch(model, variants[k], spec.sampler, noise, b, spec.seed, spec.device, prompts)
            seconds[k].append(time.perf_counter() - t0)
            if k in full:
                out[k].append(images)
        bar.update(1)
    bar.close()
    per_batch = {k: round(statistics.median(v[:timed_batches]), 3) for k, v in seconds.items()}
    report = {"seconds_per_batch": per_batch, "batch_size": bs, "timed_batches": timed_batches,
              "seconds_total": {k: round(sum(seconds[k]), 2) for k in full},
              "speedup_vs_fp_compiled": round(per_batch["fp_compiled"] / per_batch["deployed"], 3) if "fp_compiled" in per_batch else None,
              "speedup_vs_fp_eager": round(per_batch["fp_eager"] / per_batch["deployed"], 3)}
    return {k: torch.cat(v) for k, v in out.items()}, report


def _one_step(sampler):
    from dataclasses import replace

    return replace(sampler, steps=1)
