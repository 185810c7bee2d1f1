"""The whole run's settings, validated in one place before any expensive work starts."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qdiff.calib.config import CalibConfig
from qdiff.errors import ConfigError, config_from_dict
from qdiff.eval.config import EvalConfig
from qdiff.models.config import ModelConfig
from qdiff.quant.config import QuantConfig
from qdiff.recon.config import ReconConfig
from qdiff.sampling.config import SamplerConfig


@dataclass
class RunSpec:
    model: ModelConfig
    sampler: SamplerConfig
    quant: QuantConfig
    calib: CalibConfig
    recon: ReconConfig
    eval: EvalConfig
    seed: int
    device: torch.device
    output_dir: Path
    cache_dir: Path
    task_name: str


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
    paths = c.get("paths") or {}
    if "output_dir" not in paths:
        raise ConfigError("paths.output_dir is not set")
    device = resolve_device(str(c.get("device", "auto")))
    recon = config_from_dict(ReconConfig, c.get("recon"), "recon")
    check_precision(recon.precision, device)
    return RunSpec(
        model=model,
        sampler=sampler,
        quant=quant,
        calib=calib,
        recon=recon,
        eval=config_from_dict(EvalConfig, c.get("eval"), "eval"),
        seed=seed,
        device=device,
        output_dir=Path(paths["output_dir"]),
        cache_dir=Path(paths.get("cache_dir") or Path(paths["output_dir"]) / "cache"),
        task_name=str(c.get("task_name", "qdiff")),
    )
