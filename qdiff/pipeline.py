"""One run: load -> calibration data -> quantize -> reconstruct -> sample -> evaluate -> report.

``run(cfg)`` returns ``(metrics, objects)``; every stage is timed and the peak memory recorded. All
settings are validated by :func:`qdiff.spec.build_spec` before the first stage starts.
"""
from __future__ import annotations

import logging
import platform
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from qdiff.errors import ConfigError
from qdiff.io import write_json
from qdiff.spec import RunSpec, build_spec
from qdiff.tracking import NullTracker

log = logging.getLogger("qdiff")


class Stages:
    """Wall time and peak memory of each pipeline stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self.peak_gpu_mb: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        log.info("stage %s ...", name)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        self.peak_rss_mb[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if self.device.type == "cuda":
            self.peak_gpu_mb[name] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        log.info("stage %s done in %.1f s", name, self.seconds[name])

    def summary(self) -> dict:
        out = {"seconds": dict(self.seconds), "total_seconds": round(sum(self.seconds.values()), 2),
               "peak_rss_mb": max(self.peak_rss_mb.values(), default=0.0), "peak_rss_mb_by_stage": dict(self.peak_rss_mb)}
        if self.peak_gpu_mb:
            out["peak_gpu_mb"] = max(self.peak_gpu_mb.values())
            out["peak_gpu_mb_by_stage"] = dict(self.peak_gpu_mb)
        return out


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def eval_kind(model_name: str) -> str:
    return "digits" if model_name == "digits" else "inception"


def preflight(spec: RunSpec) -> dict:
    """Checks that need files or the network, done before any model is loaded."""
    out: dict = {}
    if (spec.output_dir / "metrics.json").exists():
        raise ConfigError(f"{spec.output_dir} already holds a finished run; refusing to overwrite it")
    from qdiff.models.paper import PAPER_MODELS, check_source

    paper = PAPER_MODELS.get(spec.model.name)
    if paper is not None:
        check_source(spec.model)  # weights first: a missing model is the one thing to fix before anything else
    if eval_kind(spec.model.name) == "inception" and (spec.eval.fid or spec.eval.isc):
        from qdiff.eval.fidelity import resolve_inception_weights

        out["inception_weights"] = resolve_inception_weights(spec.eval.inception_weights, spec.cache_dir / "eval")
        if spec.eval.fid and spec.model.reference is None:
            raise ConfigError(f"{spec.model.name}: FID needs real images; set model.reference=/path/to/images (or eval.fid=false)")
    if paper is not None and paper.text is not None:
        if spec.model.prompts is None:
            raise ConfigError(f"{spec.model.name} is text-guided: set model.prompts=/path/to/captions (COCO JSON/TSV/TXT)")
        from qdiff.models.prompts import load_captions

        load_captions(spec.model.prompts)
        if spec.eval.clip_score:
            from qdiff.eval.clip import resolve_clip_model

            out["clip"] = resolve_clip_model(spec.eval.clip_model)
            if out["clip"][1]:
                log.warning("CLIP score will be skipped: %s", out["clip"][1])
    if spec.model.name == "digits" and spec.eval.digits_classifier is not None:
        if not Path(spec.eval.digits_classifier).is_file():
            raise ConfigError(f"eval.digits_classifier not found: {spec.eval.digits_classifier}")
    return out


def run(cfg, tracker: NullTracker | None = None) -> tuple[dict, dict]:
    """Run the whole pipeline for a composed config; returns (metrics, objects)."""
    from qdiff.runtime import tune_allocator

    tune_allocator()
    spec = build_spec(cfg)
    tracker = tracker or NullTracker()
    pre = preflight(spec)
    out_dir = spec.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(spec.seed)
    st = Stages(spec.device)
    objects: dict = {"spec": spec}

    # load
    from qdiff.models import load_model
    from qdiff.models.base import fingerprint

    with st("load"):
        model = load_model(spec.model).to(spec.device)
        model.meta.setdefault("fingerprint", fingerprint(model.unet))
        real = model.real_images() if model.real_images is not None and spec.eval.fid else None
    objects["model"] = model
    prompts = _prompts(model, spec, spec.eval.n_samples, spec.seed)
    unet = model.unet
    extra: dict = {}

    if spec.quant.enabled:
        # calibration data
        from qdiff.cachelock import cache_lock
        from qdiff.calib import collect_calibration
        from qdiff.calib.data import calibration_key

        with st("calib_data"):
            calib_prompts = _prompts(model, spec, spec.calib.n if spec.calib.mode == "uniform" else spec.calib.N, spec.calib.seed)
            # concurrent jobs of a sweep share the cache: one collects, the others wait and reuse it
            with cache_lock(spec.cache_dir / "calib" / f"{calibration_key(model, spec.sampler, spec.calib, calib_prompts)}.lock",
                            "calibration data"):
                calib, hit = collect_calibration(model, spec.sampler, spec.calib, spec.cache_dir, spec.device, calib_prompts)
        extra["calibration"] = {"N": len(calib), "entries": calib.n_entries, "cache_hit": hit, "key": calib.meta["key"],
                                "T": spec.calib.T, "c": spec.calib.c, "n": spec.calib.n, "mode": spec.calib.mode}
        objects["calib"] = calib

        # quantize
        from qdiff.api import prepare

        def forward(m, x, t, cond):
            return model.eps(m, x, t, cond)

        with st("quantize"):
            qunet, specs = prepare(model.unet, spec.quant, calib.get([0, min(1, len(calib) - 1)], spec.device))
            if spec.quant.method == "linear" and spec.quant.quantizes_acts:
                from qdiff.quant.act_init import init_act_quantizers

                init_act_quantizers(qunet, forward, calib, spec.quant.resolved_scale_method, spec.quant.lp,
                                    seed=spec.recon.seed, device=spec.device)
        extra["quant_layers"] = _quant_summary(specs)

        # reconstruct
        if spec.quant.method == "qdiff":
            from qdiff.recon import reconstruct

            work_dir = spec.cache_dir / "recon" / recon_key(model, spec, extra["calibration"]["key"], specs)
            with st("reconstruct"), cache_lock(work_dir.with_name(work_dir.name + ".lock"), "reconstruction"):
                extra["reconstruction"] = reconstruct(
                    model.unet, qunet, calib, spec.quant, spec.recon, forward=forward, device=spec.device,
                    work_dir=work_dir, logger=tracker.lightning_logger(), probe=_probe(model, spec))
            extra["reconstruction"]["work_dir"] = str(work_dir)
        from qdiff.quant.serialize import save_quantized

        save_quantized(qunet, spec.quant, specs, out_dir / "quantized_unet",
                       extra={"model": spec.model.name, "fingerprint": model.meta["fingerprint"]})
        unet = qunet
        objects["qunet"] = qunet

    # sample
    from qdiff.sampling import generate

    with st("sample"):
        samples = generate(model, unet, spec.sampler, spec.eval.n_samples, spec.seed, spec.device, prompts,
                           desc=f"sampling {spec.quant.method} {spec.quant.label}")
    objects["samples"] = samples

    # evaluate
    from qdiff.eval.fidelity import compute_metrics

    def score(images: torch.Tensor) -> dict:
        if real is None:
            return {}
        return compute_metrics(images, real, model.eval_kind, spec.eval, spec.device, pre.get("inception_weights"), seed=spec.seed)

    with st("evaluate"):
        scores = score(samples)
        fp_samples = None
        if spec.quant.enabled:
            fp_samples, fp_hit = fp_reference(model, spec, prompts)
            extra["fp"] = {**score(fp_samples), "cache_hit": fp_hit}
        if model.is_text_guided:
            from qdiff.eval.text import evaluate_text

            text = evaluate_text(model, unet, spec, prompts, samples, fp_samples, out_dir, pre.get("clip", (None, None)),
                                 tracker)
            if "clip_score" in text:
                scores["clip_score"] = text["clip_score"]
            if "fp_clip_score" in text:
                extra["fp"]["clip_score"] = text["fp_clip_score"]
            extra["text_eval"] = text["text_eval"]
        if spec.quant.enabled and spec.eval.analysis:
            extra["analysis"] = _analysis(model, unet, spec, prompts, out_dir, tracker)

    # report
    metrics = {
        **scores,
        "n_samples": spec.eval.n_samples,
        "model": spec.model.name,
        "sampler": spec.sampler.name,
        "steps": spec.sampler.steps,
        "quant": spec.quant.label,
        "method": spec.quant.method,
        "weight_bits": spec.quant.weight_bits if spec.quant.method != "fp" else 32,
        "act_bits": spec.quant.act_bits if spec.quant.method != "fp" else 32,
        "split": spec.quant.split,
        "calib_mode": spec.calib.mode,
        "seed": spec.seed,
        **extra,
        "cost": st.summary(),
        "model_meta": model.meta,
        "device": str(spec.device),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "task_name": spec.task_name,
        "output_dir": str(out_dir),
    }
    _write_outputs(out_dir, samples, spec, metrics, tracker)
    return metrics, objects


def _probe(model, spec: RunSpec):
    """Sampler runs from the calibration noise (final latents) that score the output bias match, when asked for."""
    if not spec.recon.output_bias_match:
        return None
    from dataclasses import replace

    from qdiff.sampling import generate

    n = spec.recon.probe_samples
    sampler = replace(spec.sampler, steps=spec.calib.T)
    prompts = _prompts(model, spec, n, spec.calib.seed)

    def probe(unet):
        return generate(model, unet, sampler, n, spec.calib.seed, spec.device, prompts, progress=False, return_latents=True)

    return probe


def recon_key(model, spec: RunSpec, calib_key: str, specs) -> str:
    """Reconstruction work directory key: everything that determines its result (not resume/progress flags)."""
    import hashlib
    import json
    from dataclasses import asdict

    recon = {k: v for k, v in asdict(spec.recon).items() if k != "resume"}
    ident = {"weights": model.meta["fingerprint"], "calib": calib_key, "quant": asdict(spec.quant), "recon": recon,
             "layers": [asdict(s) for s in specs], "device": spec.device.type}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fp_reference(model, spec: RunSpec, prompts) -> tuple[torch.Tensor, bool]:
    """FP samples for the same sampler/seed/count, cached by key (a quantized run compares against them)."""
    import hashlib
    import json
    from dataclasses import asdict

    from safetensors.torch import load_file, save_file

    from qdiff.eval.fidelity import to_uint8
    from qdiff.sampling import generate

    ident = {"weights": model.meta["fingerprint"], "sampler": asdict(spec.sampler), "n": spec.eval.n_samples,
             "seed": spec.seed, "prompts": hashlib.sha256("\n".join(prompts or []).encode()).hexdigest()}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    f = spec.cache_dir / "fp_samples" / f"{key}.safetensors"
    if f.exists():
        return load_file(str(f))["samples"].float() / 127.5 - 1, True
    images = generate(model, model.unet, spec.sampler, spec.eval.n_samples, spec.seed, spec.device, prompts,
                      desc="sampling fp reference")
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    save_file({"samples": to_uint8(images).contiguous()}, str(tmp))
    tmp.replace(f)
    return to_uint8(images).float() / 127.5 - 1, False


def _quant_summary(specs) -> dict:
    return {
        "n_layers": len(specs),
        "n_split_layers": sum(1 for s in specs if s.split),
        "split_layers": {s.name: s.split for s in specs if s.split},
        "weight_bits_hist": _hist(s.weight_bits for s in specs),
        "act_bits_hist": _hist(s.act_bits for s in specs),
    }


def _hist(values) -> dict:
    out: dict = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def _analysis(model, qunet, spec: RunSpec, prompts, out_dir: Path, tracker) -> dict:
    """Per-step MSE (Fig. 2) and FP activation ranges over timesteps (Figs. 3/6) as CSV + PNG."""
    from qdiff.quant.analysis import activation_ranges, plot_activation_ranges, plot_step_mse, step_mse

    n = min(spec.eval.analysis_batch, spec.eval.n_samples)
    mse = step_mse(model, model.unet, qunet, spec.sampler, n, spec.seed, spec.device, prompts)
    mse.to_csv(out_dir / "step_mse.csv", index=False)
    plot_step_mse({f"{spec.quant.method} {spec.quant.label}": mse}, out_dir / "step_mse.png")
    ranges = activation_ranges(model, model.unet, spec.sampler, min(n, 16), spec.seed, spec.device, prompts)
    ranges.to_csv(out_dir / "act_ranges.csv", index=False)
    plot_activation_ranges(ranges, out_dir / "act_ranges.png")
    tracker.log_table("step_mse_table", out_dir / "step_mse.csv", curve=("step", "mse_accumulated"))
    tracker.log_image("step_mse", out_dir / "step_mse.png")
    tracker.log_image("act_ranges", out_dir / "act_ranges.png")
    return {"step_mse_mean": float(mse["mse_accumulated"].mean()), "step_mse_last": float(mse["mse_accumulated"].iloc[-1]),
            "step_mse_local_mean": float(mse["mse_local"].mean())}


def _prompts(model, spec: RunSpec, n: int, seed: int) -> list[str] | None:
    if not model.is_text_guided:
        return None
    from qdiff.models.prompts import load_captions, sample_prompts

    if spec.model.prompts is None:
        raise ConfigError(f"{spec.model.name} is text-guided: set model.prompts=/path/to/captions (COCO JSON/TSV/TXT)")
    return sample_prompts(load_captions(spec.model.prompts), n, seed)


def _write_outputs(out_dir: Path, samples: torch.Tensor, spec: RunSpec, metrics: dict, tracker) -> None:
    from safetensors.torch import save_file

    from qdiff.eval.fidelity import to_uint8
    from qdiff.eval.figures import save_grid

    grid = out_dir / "samples.png"
    save_grid(samples, grid, spec.eval.grid_size)
    if spec.eval.save_samples:
        save_file({"samples": to_uint8(samples).contiguous()}, str(out_dir / "samples.safetensors"))
    write_json(out_dir / "metrics.json", metrics)
    tracker.log_metrics(metrics)
    if grid.exists():
        tracker.log_image("samples", grid, caption=f"{spec.model.name} {spec.quant.method} {spec.quant.label}")
