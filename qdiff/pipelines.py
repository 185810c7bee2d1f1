"""Diffusers pipelines in a few lines: quantize the denoiser in place, save and load the pipeline.

    pipe = qdiff.quantize_pipeline(pipe, qdiff.QuantConfig(weight_bits=4, act_bits=8),
                                   calib=qdiff.CalibConfig(T=50, c=2, n=64), prompts=captions)
    pipe("a photo of a cat")                       # runs as before, with the quantized UNet or transformer
    qdiff.save_pipeline(pipe, "sd-w4a8/")          # other components: save_pretrained; the denoiser: qdiff.export
    pipe = qdiff.load_pipeline("sd-w4a8/")         # diffusers' from_pretrained + qdiff.load_deployed

Calibration uses what the pipeline itself samples with: its scheduler (class and config), its default number
of steps (when ``calib.T`` is unset), its default guidance scale and its own encoders. UNet pipelines (SD, DDPM,
DDIM) go through :func:`qdiff.calibration_data` with the pipeline's ``encode_prompt``; transformer pipelines (DiT,
PixArt, SD3, FLUX, Sana) run their own ``__call__`` while qdiff records the transformer's inputs
(:mod:`qdiff.calib.from_pipeline`). Only the denoiser is quantized; the VAE and the text encoders stay full precision.
"""
from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from qdiff.calib.config import CalibConfig
from qdiff.errors import CheckpointError, ConfigError, config_from_dict
from qdiff.quant.config import QuantConfig

UNSUPPORTED = ("for other pipelines, build the data with qdiff.calibration_data(denoiser, pipe.scheduler, ...) and "
               "quantize the denoiser with qdiff.quantize")


def _call_default(pipe: Any, name: str) -> Any:
    """The default of ``pipe.__call__``'s argument ``name`` (what ``pipe(...)`` uses when not given), else None."""
    p = inspect.signature(pipe.__call__).parameters.get(name)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def _is_text_guided(pipe: Any) -> bool:
    """Whether a UNet pipeline's UNet takes text conditioning, checked against what qdiff knows how to encode."""
    takes_text = "encoder_hidden_states" in inspect.signature(pipe.unet.forward).parameters
    if not takes_text:
        return False
    encode = getattr(pipe, "encode_prompt", None)
    params = inspect.signature(encode).parameters if encode is not None else {}
    if not {"prompt", "device", "num_images_per_prompt", "do_classifier_free_guidance"} <= set(params):
        raise ConfigError(f"quantize_pipeline: {type(pipe).__name__} conditions its UNet in a way qdiff does not "
                          f"encode (supported: unconditional and Stable Diffusion-style text pipelines); {UNSUPPORTED}")
    return True


def _sample_shape(unet: torch.nn.Module) -> tuple[int, ...]:
    """(C, H, W) of what the sampler denoises: the UNet's input channels and sample size (latents for LDMs)."""
    config = getattr(unet, "config", None)
    size = getattr(config, "sample_size", None)
    if size is None or getattr(config, "in_channels", None) is None:
        raise ConfigError("quantize_pipeline: the UNet's config has no sample_size/in_channels; "
                          "give sample_shape=(C, H, W)")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return (int(config.in_channels), *map(int, hw))


@torch.no_grad()
def _text_conditioning(pipe: Any, prompts: Sequence[str] | None, n_traj: int, cfg: bool, batch: int,
                       device: torch.device) -> tuple[dict, dict | None]:
    """Prompt embeddings from the pipeline's own ``encode_prompt``; the empty prompt's as the CFG branch."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or len(prompts) < n_traj:
        raise ConfigError(f"quantize_pipeline: {type(pipe).__name__} is text-guided: calibration needs one prompt per "
                          f"trajectory, {n_traj}; got {len(prompts or [])} (prompts=[...])")
    cond, uncond = [], None
    for s in range(0, n_traj, batch):
        out = pipe.encode_prompt(list(prompts[s:min(n_traj, s + batch)]), device, 1, cfg)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ConfigError(f"quantize_pipeline: {type(pipe).__name__}.encode_prompt returns more than (prompt, "
                              f"negative) embeddings; {UNSUPPORTED}")
        cond.append(out[0])
        uncond = out[1][:1] if cfg else None  # the empty prompt: one row serves every trajectory
    return {"encoder_hidden_states": torch.cat(cond)}, None if uncond is None else {"encoder_hidden_states": uncond}


def denoiser_name(pipe: Any) -> str:
    """The pipeline's noise predictor: ``unet`` (SD, DDPM, DDIM) or ``transformer`` (DiT, PixArt, SD3, FLUX, Sana)."""
    for name in ("unet", "transformer"):
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            return name
    raise ConfigError(f"quantize_pipeline needs a diffusers pipeline with a .unet or a .transformer, got "
                      f"{type(pipe).__name__}; {UNSUPPORTED}")


def quantize_pipeline(pipe: Any, config: QuantConfig, calib: CalibConfig | dict | None = None, recon=None,
                      prompts: Sequence[str] | None = None, guidance_scale: float | None = None,
                      eta: float | None = None, sample_shape: Sequence[int] | None = None,
                      work_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                      device: torch.device | str | None = None, progress: bool = True,
                      class_labels: Sequence[int] | None = None, call_kwargs: dict | None = None) -> Any:
    """Quantize the pipeline's denoiser (``pipe.unet`` or ``pipe.transformer``) with data from the pipeline's own
    sampler and put it back; returns ``pipe``.

    ``calib``: the paper's (T, c, n) as a :class:`~qdiff.calib.CalibConfig` (or a dict of its fields); T unset =
    the pipeline's default ``num_inference_steps``. Text pipelines need ``prompts`` (one per trajectory, n);
    class-conditional ones (DiT) take ``class_labels`` (default: the classes in turn); ``guidance_scale`` defaults
    to the pipeline's own, and with guidance > 1 the unconditional branch is calibrated too. ``recon``,
    ``work_dir``: as in :func:`qdiff.quantize`. Afterwards ``pipe(...)`` runs with the quantized denoiser, whose
    ``qdiff_report`` says what reconstruction did and which data it used.

    UNet pipelines: the data comes from :func:`qdiff.calibration_data` with the pipeline's scheduler and encoder
    (``cache_dir``: where the set is kept for reuse; None: a temporary folder; ``eta``, ``sample_shape``).
    Transformer pipelines: the pipeline's own ``__call__`` runs the trajectories and the transformer's inputs are
    recorded (:func:`qdiff.calib.from_pipeline.pipeline_calibration`: each pipeline's conditioning, packing and
    timestep conventions as they are); ``call_kwargs`` go to every such call (e.g. ``height``, ``width``,
    ``max_sequence_length``), and the set lives in memory.
    """
    from qdiff.api import quantize

    name = denoiser_name(pipe)
    net = getattr(pipe, name)
    if getattr(pipe, "scheduler", None) is None:
        raise ConfigError(f"quantize_pipeline needs a pipeline with a .scheduler, got {type(pipe).__name__}")
    dtype = next(net.parameters()).dtype
    if dtype != torch.float32:
        raise ConfigError(f"quantize_pipeline: pipe.{name} is {dtype}; qdiff calibrates and reconstructs in float32 "
                          "(load the pipeline with torch_dtype=torch.float32, or call pipe.to(torch.float32))")
    calib = calib if isinstance(calib, CalibConfig) else config_from_dict(CalibConfig, calib, "calib")
    T = calib.T if calib.T is not None else _call_default(pipe, "num_inference_steps")
    if T is None:
        raise ConfigError(f"quantize_pipeline: calib.T is not set and {type(pipe).__name__} has no default "
                          "num_inference_steps; give CalibConfig(T=...)")
    calib = replace(calib, T=T).checked()
    guidance = float(guidance_scale if guidance_scale is not None else (_call_default(pipe, "guidance_scale") or 1.0))
    device = torch.device(device) if device is not None else pipe.device
    if name == "unet":
        if class_labels is not None or call_kwargs:
            raise ConfigError("quantize_pipeline: class_labels and call_kwargs are for transformer pipelines")
        data, report = _unet_calibration(pipe, calib, prompts, guidance, eta, sample_shape, cache_dir, device, progress)
    else:
        data, report = _transformer_calibration(pipe, calib, prompts, class_labels, guidance, call_kwargs or {}, device,
                                                progress)
    qnet = quantize(net, config, data, recon, device=device, work_dir=work_dir, progress=progress)
    if hasattr(qnet, "qdiff_report"):
        qnet.qdiff_report["calibration"] = report
    setattr(pipe, name, qnet)
    return pipe


def _unet_calibration(pipe: Any, calib: CalibConfig, prompts, guidance: float, eta, sample_shape, cache_dir, device,
                      progress: bool):
    """The set of a UNet pipeline, from :func:`qdiff.calibration_data` with the pipeline's scheduler and encoder."""
    from qdiff.calib.from_model import calibration_data

    text = _is_text_guided(pipe)
    if prompts and not text:
        raise ConfigError(f"quantize_pipeline: {type(pipe).__name__} is unconditional; leave prompts out")
    cfg = text and guidance > 1.0  # as diffusers: guidance <= 1 runs the conditional branch alone
    cond, uncond = (_text_conditioning(pipe, prompts, calib.n_trajectories, cfg, calib.batch_size, device) if text
                    else (None, None))
    data = calibration_data(pipe.unet, pipe.scheduler, sample_shape or _sample_shape(pipe.unet), T=calib.T, c=calib.c,
                            n=calib.n, cond=cond, uncond=uncond, guidance_scale=guidance if cfg else 1.0,
                            seed=calib.seed, cache_dir=cache_dir, device=device, mode=calib.mode,
                            eta=eta if eta is not None else float(_call_default(pipe, "eta") or 0.0),
                            batch_size=calib.batch_size, cache=calib.cache, progress=progress)
    return data, {"T": calib.T, "c": calib.c, "n": calib.n, "mode": calib.mode, "N": len(data), "key": data.meta["key"],
                  "scheduler": data.meta["scheduler_config"]["_class_name"], "guidance": data.meta["guidance"]}


def _transformer_calibration(pipe: Any, calib: CalibConfig, prompts, class_labels, guidance: float, call_kwargs: dict,
                             device, progress: bool):
    """The set of a transformer pipeline: its own ``__call__`` in batches of trajectories, inputs recorded."""
    from qdiff.calib.from_pipeline import pipeline_calibration

    if calib.mode != "uniform":
        raise ConfigError(f"quantize_pipeline: calib.mode={calib.mode} is not available for transformer pipelines "
                          "(their data comes from the pipeline's own loop); use the paper's uniform schedule")
    params = inspect.signature(pipe.__call__).parameters
    n = calib.n
    if "class_labels" in params:  # DiT: class-conditional, the null class is the pipeline's own
        if prompts:
            raise ConfigError(f"quantize_pipeline: {type(pipe).__name__} is class-conditional; give class_labels, "
                              "not prompts")
        classes = int(getattr(pipe.transformer.config, "num_embeds_ada_norm", None) or 1000)
        items = list(class_labels) if class_labels is not None else [i % classes for i in range(n)]
        key, what = "class_labels", "class label"
    elif "prompt" in params:
        if class_labels is not None:
            raise ConfigError(f"quantize_pipeline: {type(pipe).__name__} is text-guided; give prompts, not class_labels")
        items = [prompts] if isinstance(prompts, str) else list(prompts or [])
        key, what = "prompt", "prompt"
    else:
        raise ConfigError(f"quantize_pipeline: {type(pipe).__name__} takes neither prompts nor class labels; {UNSUPPORTED}")
    if len(items) < n:
        raise ConfigError(f"quantize_pipeline: {type(pipe).__name__} needs one {what} per calibration trajectory, "
                          f"{n}; got {len(items)} ({key}s=[...])")
    extra = {"guidance_scale": guidance} if "guidance_scale" in params else {}
    calls = [{key: items[s:min(n, s + calib.batch_size)], **extra, **call_kwargs} for s in range(0, n, calib.batch_size)]
    data = pipeline_calibration(pipe, "transformer", calls, calib.T, calib.c, seed=calib.seed, device=device,
                                progress=progress)
    return data, {"T": calib.T, "c": calib.c, "n": n, "mode": calib.mode, "N": len(data), "source": "pipeline",
                  "scheduler": type(pipe.scheduler).__name__, "guidance": guidance,
                  "rows_per_step": data.meta["rows_per_step"], "constants": data.meta["constants"]}


def save_pipeline(pipe: Any, path: str | Path, overwrite: bool = False) -> dict:
    """Save like ``pipe.save_pretrained``, with the denoiser (``unet/`` or ``transformer/``) as a qdiff artifact;
    returns its sizes.

    Every other component is written by its own ``save_pretrained`` and ``model_index.json`` by the pipeline,
    so the folder is a diffusers folder whose denoiser holds packed integer weights instead of FP ones. A folder
    that is not empty is refused unless ``overwrite=True``; everything is written beside it and renamed into place.
    """
    from qdiff.cache import publish_folder
    from qdiff.deploy import artifact_sizes, export
    from qdiff.deploy.artifact import refuse_nonempty

    out = Path(path)
    name = denoiser_name(pipe)
    refuse_nonempty(out, overwrite, "save_pipeline")
    for key, component in pipe.components.items():
        if key != name and component is not None and not hasattr(component, "save_pretrained"):
            raise ConfigError(f"save_pipeline: component {key!r} ({type(component).__name__}) has no save_pretrained")
    with publish_folder(out, overwrite, "save_pipeline") as tmp:
        for key, component in pipe.components.items():
            if key != name and component is not None:
                component.save_pretrained(tmp / key)
        pipe.save_config(tmp)
        export(getattr(pipe, name), tmp / name, extra={"pipeline": type(pipe).__name__})
    return artifact_sizes(out / name)


def load_pipeline(path: str | Path, backend: str = "simulated", device: torch.device | str = "cpu", **kwargs) -> Any:
    """A pipeline saved by :func:`save_pipeline`: the denoiser from its artifact (``backend`` as in
    :func:`qdiff.load_deployed`), the rest by diffusers' ``from_pretrained`` (``kwargs`` go there; components saved
    as absent, e.g. SD3 without T5, are passed as None)."""
    import json

    from diffusers import DiffusionPipeline

    from qdiff.deploy import load_deployed
    from qdiff.deploy.artifact import META_FILE

    p = Path(path)
    name = next((n for n in ("unet", "transformer") if (p / n / META_FILE).is_file()), None)
    if not (p / "model_index.json").is_file() or name is None:
        raise CheckpointError(f"{p} is not a pipeline saved by qdiff.save_pipeline (needs model_index.json and "
                              f"unet/{META_FILE} or transformer/{META_FILE})")
    index = json.loads((p / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None] and k not in kwargs}
    net = load_deployed(p / name, backend=backend, device=device)
    return DiffusionPipeline.from_pretrained(str(p), **{name: net}, **absent, **kwargs).to(device)


def tiny_pipeline(kind: str = "ddim", seed: int = 0) -> Any:
    """Deprecated spelling of :func:`qdiff.testing.tiny_pipeline` (kept for one release)."""
    import warnings

    from qdiff.testing import tiny_pipeline as _tiny

    warnings.warn("qdiff.pipelines.tiny_pipeline moved to qdiff.testing.tiny_pipeline; the old name goes in the next "
                  "release", DeprecationWarning, stacklevel=2)
    return _tiny(kind, seed)
