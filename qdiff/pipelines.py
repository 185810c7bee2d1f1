"""Diffusers pipelines in a few lines: quantize ``pipe.unet`` in place, save and load the pipeline.

    pipe = qdiff.quantize_pipeline(pipe, qdiff.QuantConfig(weight_bits=4, act_bits=8),
                                   calib=qdiff.CalibConfig(T=50, c=2, n=64), prompts=captions)
    pipe("a photo of a cat")                       # runs as before, with the quantized UNet
    qdiff.save_pipeline(pipe, "sd-w4a8/")          # other components: save_pretrained; the UNet: qdiff.export
    pipe = qdiff.load_pipeline("sd-w4a8/")         # diffusers' from_pretrained + qdiff.load_deployed

Calibration uses what the pipeline itself samples with: its scheduler (class and config), its default number
of steps (when ``calib.T`` is unset), its default guidance scale and, for text pipelines, its own
``encode_prompt`` (tokenizer + text encoder) for the prompts and for classifier-free guidance's empty prompt.
Only the UNet is quantized; the VAE and the text encoder stay full precision.
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

UNSUPPORTED = ("for other pipelines, build the data with qdiff.calibration_data(pipe.unet, pipe.scheduler, ...) and "
               "quantize pipe.unet with qdiff.quantize")


def _call_default(pipe: Any, name: str) -> Any:
    """The default of ``pipe.__call__``'s argument ``name`` (what ``pipe(...)`` uses when not given), else None."""
    p = inspect.signature(pipe.__call__).parameters.get(name)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def _is_text_guided(pipe: Any) -> bool:
    """Whether the pipeline's UNet takes text conditioning, checked against what qdiff knows how to encode."""
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


def quantize_pipeline(pipe: Any, config: QuantConfig, calib: CalibConfig | dict | None = None, recon=None,
                      prompts: Sequence[str] | None = None, guidance_scale: float | None = None,
                      eta: float | None = None, sample_shape: Sequence[int] | None = None,
                      work_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                      device: torch.device | str | None = None, progress: bool = True) -> Any:
    """Quantize ``pipe.unet`` with data from the pipeline's own sampler and put it back; returns ``pipe``.

    ``calib``: the paper's (T, c, n) as a :class:`~qdiff.calib.CalibConfig` (or a dict of its fields); T unset =
    the pipeline's default ``num_inference_steps``. Text pipelines need ``prompts`` (one per trajectory, n);
    ``guidance_scale`` defaults to the pipeline's own, and with guidance > 1 the unconditional branch is
    calibrated too. ``recon``, ``work_dir``: as in :func:`qdiff.quantize`; ``cache_dir``: where the calibration
    set is kept for reuse (None: a temporary folder). Afterwards ``pipe(...)`` runs with the quantized UNet,
    whose ``qdiff_report`` says what reconstruction did and which data it used.
    """
    from qdiff.api import quantize
    from qdiff.calib.from_model import calibration_data

    if getattr(pipe, "unet", None) is None or getattr(pipe, "scheduler", None) is None:
        raise ConfigError(f"quantize_pipeline needs a diffusers pipeline with .unet and .scheduler, got "
                          f"{type(pipe).__name__}; {UNSUPPORTED}")
    dtype = next(pipe.unet.parameters()).dtype
    if dtype != torch.float32:
        raise ConfigError(f"quantize_pipeline: pipe.unet is {dtype}; qdiff calibrates and reconstructs in float32 "
                          "(load the pipeline with torch_dtype=torch.float32, or call pipe.to(torch.float32))")
    calib = calib if isinstance(calib, CalibConfig) else config_from_dict(CalibConfig, calib, "calib")
    T = calib.T if calib.T is not None else _call_default(pipe, "num_inference_steps")
    if T is None:
        raise ConfigError(f"quantize_pipeline: calib.T is not set and {type(pipe).__name__} has no default "
                          "num_inference_steps; give CalibConfig(T=...)")
    calib = replace(calib, T=T).checked()
    text = _is_text_guided(pipe)
    if prompts and not text:
        raise ConfigError(f"quantize_pipeline: {type(pipe).__name__} is unconditional; leave prompts out")
    guidance = float(guidance_scale if guidance_scale is not None else (_call_default(pipe, "guidance_scale") or 1.0))
    cfg = text and guidance > 1.0  # as diffusers: guidance <= 1 runs the conditional branch alone
    device = torch.device(device) if device is not None else pipe.device
    cond, uncond = (_text_conditioning(pipe, prompts, calib.n_trajectories, cfg, calib.batch_size, device) if text
                    else (None, None))
    data = calibration_data(pipe.unet, pipe.scheduler, sample_shape or _sample_shape(pipe.unet), T=calib.T, c=calib.c,
                            n=calib.n, cond=cond, uncond=uncond, guidance_scale=guidance if cfg else 1.0,
                            seed=calib.seed, cache_dir=cache_dir, device=device, mode=calib.mode,
                            eta=eta if eta is not None else float(_call_default(pipe, "eta") or 0.0),
                            batch_size=calib.batch_size, cache=calib.cache, progress=progress)
    qunet = quantize(pipe.unet, config, data, recon, device=device, work_dir=work_dir, progress=progress)
    if hasattr(qunet, "qdiff_report"):
        qunet.qdiff_report["calibration"] = {
            "T": calib.T, "c": calib.c, "n": calib.n, "mode": calib.mode, "N": len(data), "key": data.meta["key"],
            "scheduler": data.meta["scheduler_config"]["_class_name"], "guidance": data.meta["guidance"]}
    pipe.unet = qunet
    return pipe


def save_pipeline(pipe: Any, path: str | Path, overwrite: bool = False) -> dict:
    """Save like ``pipe.save_pretrained``, with the UNet as a qdiff artifact (``unet/``); returns its sizes.

    Every other component is written by its own ``save_pretrained`` and ``model_index.json`` by the pipeline,
    so the folder is a diffusers folder whose ``unet/`` holds packed integer weights instead of FP ones. A folder
    that is not empty is refused unless ``overwrite=True``; everything is written beside it and renamed into place.
    """
    from qdiff.cache import publish_folder
    from qdiff.deploy import artifact_sizes, export
    from qdiff.deploy.artifact import refuse_nonempty

    out = Path(path)
    refuse_nonempty(out, overwrite, "save_pipeline")
    for name, component in pipe.components.items():
        if name != "unet" and component is not None and not hasattr(component, "save_pretrained"):
            raise ConfigError(f"save_pipeline: component {name!r} ({type(component).__name__}) has no save_pretrained")
    with publish_folder(out, overwrite, "save_pipeline") as tmp:
        for name, component in pipe.components.items():
            if name != "unet" and component is not None:
                component.save_pretrained(tmp / name)
        pipe.save_config(tmp)
        export(pipe.unet, tmp / "unet", extra={"pipeline": type(pipe).__name__})
    return artifact_sizes(out / "unet")


def load_pipeline(path: str | Path, backend: str = "simulated", device: torch.device | str = "cpu", **kwargs) -> Any:
    """A pipeline saved by :func:`save_pipeline`: the UNet from its artifact (``backend`` as in
    :func:`qdiff.load_deployed`), the rest by diffusers' ``from_pretrained`` (``kwargs`` go there)."""
    from diffusers import DiffusionPipeline

    from qdiff.deploy import load_deployed
    from qdiff.deploy.artifact import META_FILE

    p = Path(path)
    if not (p / "model_index.json").is_file() or not (p / "unet" / META_FILE).is_file():
        raise CheckpointError(f"{p} is not a pipeline saved by qdiff.save_pipeline (needs model_index.json and "
                              f"unet/{META_FILE})")
    unet = load_deployed(p / "unet", backend=backend, device=device)
    return DiffusionPipeline.from_pretrained(str(p), unet=unet, **kwargs).to(device)


def tiny_pipeline(kind: str = "ddim", seed: int = 0) -> Any:
    """A random-init, tiny diffusers pipeline for trying the API offline in seconds (no weights, no hub).

    ``kind``: ``ddpm`` / ``ddim`` (unconditional ``UNet2DModel``, 3x16x16 images) or ``stable_diffusion``
    (``UNet2DConditionModel`` on 4x8x8 latents, a 2-layer CLIP text encoder with a character tokenizer, a
    two-block VAE: 16x16 images). Its samples are noise; its structure is the real one.
    """
    import diffusers

    kinds = ("ddpm", "ddim", "stable_diffusion")
    if kind not in kinds:
        raise ConfigError(f"tiny_pipeline: unknown kind {kind!r}; known: {', '.join(kinds)}")
    torch.manual_seed(seed)
    if kind != "stable_diffusion":
        unet = diffusers.UNet2DModel(
            sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8, attention_head_dim=8)
        pipeline, scheduler = ((diffusers.DDPMPipeline, diffusers.DDPMScheduler) if kind == "ddpm"
                               else (diffusers.DDIMPipeline, diffusers.DDIMScheduler))
        return pipeline(unet=unet.eval(), scheduler=scheduler(num_train_timesteps=1000))
    from qdiff.models.paper.text import build_text_encoder, char_tokenizer

    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                  sample_size=16)
    text_encoder = build_text_encoder(dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, projection_dim=32, max_position_embeddings=77))
    scheduler = diffusers.PNDMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, skip_prk_steps=True, steps_offset=1)
    return diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=char_tokenizer(), unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
