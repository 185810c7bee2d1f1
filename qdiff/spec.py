"""The whole run's settings, validated in one place before any expensive work starts (:func:`build_spec`,
then :func:`check_inputs` for what needs files: weights, reference images, captions)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from qdiff.calib.config import CalibConfig
from qdiff.deploy.config import DeployConfig
from qdiff.errors import ConfigError, config_from_dict
from qdiff.eval.config import EvalConfig
from qdiff.models.config import ModelConfig
from qdiff.quant.config import QuantConfig
from qdiff.recon.config import ReconConfig
from qdiff.sampling.config import SamplerConfig

log = logging.getLogger("qdiff")

#: The embedded models, scored on the bundled digits with the bundled digits classifier (no files to check).
EMBEDDED_DIGITS = ("digits", "digits_dit")


@dataclass
class RunSpec:
    model: ModelConfig
    sampler: SamplerConfig
    quant: QuantConfig
    calib: CalibConfig
    recon: ReconConfig
    deploy: DeployConfig
    eval: EvalConfig
    seed: int
    device: torch.device
    output_dir: Path
    cache_dir: Path
    task_name: str
    deterministic: bool = False


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else must exist on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}' is not a torch device (use auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available on this machine (use device=auto)")
    return dev


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse mixed precisions the device cannot run (Lightning would silently switch 16-mixed to bf16 on CPU)."""
    if precision == "16-mixed" and device.type != "cuda":
        raise ConfigError(f"recon.precision=16-mixed needs a CUDA device (Lightning has no fp16 AMP on {device.type}); "
                          "use bf16-mixed or 32-true")
    if precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"recon.precision=bf16-mixed: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                          "use 16-mixed or 32-true")


def build_spec(cfg) -> RunSpec:
    """Typed, validated settings from a composed Hydra config (a DictConfig or a plain dict)."""
    from omegaconf import DictConfig, OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    from qdiff.models import check_model_name

    model = config_from_dict(ModelConfig, c.get("model"), "model")
    check_model_name(model.name)
    sampler = config_from_dict(SamplerConfig, c.get("sampler"), "sampler")
    calib = config_from_dict(CalibConfig, c.get("calib"), "calib").resolve(sampler.steps)
    quant = config_from_dict(QuantConfig, c.get("quant"), "quant")
    if quant.enabled and calib.c > calib.T:  # FP runs collect no calibration data
        raise ConfigError(f"calib.c ({calib.c}) must be <= calib.T ({calib.T})")
    seed = c.get("seed", 0)
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    deterministic = c.get("deterministic", False)
    if not isinstance(deterministic, bool):
        raise ConfigError(f"deterministic must be true or false, got {deterministic!r}")
    paths = c.get("paths") or {}
    if "output_dir" not in paths:
        raise ConfigError("paths.output_dir is not set")
    device = resolve_device(str(c.get("device", "auto")))
    recon = config_from_dict(ReconConfig, c.get("recon"), "recon")
    check_precision(recon.precision, device)
    deploy = config_from_dict(DeployConfig, c.get("deploy"), "deploy")
    if deploy.enabled and not quant.enabled:
        raise ConfigError(f"deploy.backend={deploy.backend} deploys a quantized model; this run is full precision (quant=fp)")
    if deploy.backend == "int8":
        from qdiff.deploy.int8 import refused_settings

        refused = refused_settings(quant)
        if refused:
            raise ConfigError(f"deploy.backend=int8 cannot run {refused[0]}; turn it off or use deploy.backend=simulated "
                              "(checked before any work)")
    return RunSpec(
        model=model,
        sampler=sampler,
        quant=quant,
        calib=calib,
        recon=recon,
        deploy=deploy,
        eval=config_from_dict(EvalConfig, c.get("eval"), "eval"),
        seed=seed,
        device=device,
        output_dir=Path(paths["output_dir"]),
        cache_dir=Path(paths.get("cache_dir") or Path(paths["output_dir"]) / "cache"),
        task_name=str(c.get("task_name", "qdiff")),
        deterministic=deterministic,
    )


def check_inputs(spec: RunSpec) -> dict:
    """Checks that need files or the network, done before any model is loaded; returns what they resolved
    (``inception_weights``, ``clip``) for the stages that use it."""
    from qdiff.models.paper import PAPER_MODELS, check_source

    out: dict = {}
    paper = PAPER_MODELS.get(spec.model.name)
    if paper is not None:
        check_source(spec.model)  # weights first: a missing model is the one thing to fix before anything else
    digits = spec.model.name in EMBEDDED_DIGITS
    if not digits and (spec.eval.fid or spec.eval.isc):
        from qdiff.eval.fidelity import resolve_inception_weights

        out["inception_weights"] = resolve_inception_weights(spec.eval.inception_weights, spec.cache_dir / "eval")
        if spec.eval.fid and spec.model.reference is None:
            raise ConfigError(f"{spec.model.name}: FID needs real images; set model.reference=/path/to/images (or eval.fid=false)")
    if paper is not None and paper.text is not None:
        from qdiff.models.prompts import load_captions

        load_captions(_captions_path(spec))
        if spec.eval.clip_score:
            from qdiff.eval.clip import resolve_clip_model

            out["clip"] = resolve_clip_model(spec.eval.clip_model)
            if out["clip"][1]:
                log.warning("CLIP score will be skipped: %s", out["clip"][1])
    if digits and spec.eval.digits_classifier is not None:
        if not Path(spec.eval.digits_classifier).is_file():
            raise ConfigError(f"eval.digits_classifier not found: {spec.eval.digits_classifier}")
    return out


def _captions_path(spec: RunSpec) -> str:
    if spec.model.prompts is None:
        raise ConfigError(f"{spec.model.name} is text-guided: set model.prompts=/path/to/captions (COCO JSON/TSV/TXT)")
    return spec.model.prompts


def run_prompts(model, spec: RunSpec, n: int, seed: int) -> list | None:
    """What conditions ``n`` samples: captions drawn with ``seed`` from ``model.prompts`` for a text-guided model,
    class labels 0, 1, ..., 9, 0, ... (every class equally often) for a class-conditional one, else None."""
    if model.is_class_conditional:
        return class_labels(model.num_classes, n)
    if not model.is_text_guided:
        return None
    from qdiff.models.prompts import load_captions, sample_prompts

    return sample_prompts(load_captions(_captions_path(spec)), n, seed)


def class_labels(num_classes: int, n: int) -> list[int]:
    """``n`` labels cycling through the classes: balanced, like the real data FID compares against."""
    return [i % num_classes for i in range(n)]


def conditions_key(prompts) -> str:
    """A hash of a run's prompts or class labels (part of cache keys)."""
    import hashlib

    return hashlib.sha256("\n".join(map(str, prompts or [])).encode()).hexdigest()
