"""Registry entries for the embedded models: ``digits`` (a UNet) and ``digits_dit`` (a class-conditional DiT)."""
from __future__ import annotations

from qdiff.io import CheckpointError, load_into, load_state_dict_file
from qdiff.models import register_model
from qdiff.models.base import DiffusionModel, ModelConfigError, WeightsNotFoundError
from qdiff.models.config import ModelConfig
from qdiff.models.digits import (DIT_CONFIG, DIT_WEIGHTS, IMAGE_SIZE, NUM_CLASSES, SCHEDULER_CONFIG, UNET_CONFIG,
                                 UNET_WEIGHTS, load_digits_images)


def _network(name: str, cls, config: dict, cfg: ModelConfig, weights, make: str, what: str):
    """The embedded network ``name`` with ``model.arch`` applied, its bundled (or ``model.source``) weights loaded
    unless ``model.random_init``; returns (network, where its weights came from)."""
    unknown = set(cfg.arch) - set(config)
    if unknown:
        raise ModelConfigError(f"{name}: unknown model.arch keys {sorted(unknown)}; known: {sorted(config)}")
    arch = {**config, **cfg.arch}
    net = cls(**arch)
    source = "random-init"
    if not cfg.random_init:
        path = cfg.source or str(weights)
        try:
            state = load_state_dict_file(path)
        except CheckpointError as e:
            if "not found" in str(e):
                raise WeightsNotFoundError(f"{name}: weights not found at {path}; make them with {make} or use "
                                           "model.random_init=true") from None
            raise
        load_into(net, state, what)
        source = path
    return net.eval().requires_grad_(False), arch, source


@register_model("digits")
def load_digits(cfg: ModelConfig) -> DiffusionModel:
    from diffusers import UNet2DModel

    unet, arch, source = _network("digits", UNet2DModel, UNET_CONFIG, cfg, UNET_WEIGHTS,
                                  "`python experiments/training/train_digits.py` (~20 min on 2 CPU cores)", "digits UNet")
    return _digits_model("digits", unet, arch, source)


@register_model("digits_dit")
def load_digits_dit(cfg: ModelConfig) -> DiffusionModel:
    """The embedded DiT: class-conditional (labels 0-9, null class 10), sampled with classifier-free guidance
    (``model.guidance_scale``), evaluated on the same digits metric as the UNet."""
    from diffusers import DiTTransformer2DModel

    net, arch, source = _network("digits_dit", DiTTransformer2DModel, DIT_CONFIG, cfg, DIT_WEIGHTS,
                                 "`python experiments/training/train_digits_dit.py` (~30 min on 2 CPU cores)", "digits DiT")
    return _digits_model("digits_dit", net, arch, source, guidance_scale=cfg.guidance_scale, num_classes=NUM_CLASSES)


def _digits_model(name: str, net, arch: dict, source: str, **extra) -> DiffusionModel:
    """An embedded network as a DiffusionModel: the digits schedule, 16x16 samples, the digits metric."""
    return DiffusionModel(name=name, unet=net, scheduler_config=dict(SCHEDULER_CONFIG),
                          sample_shape=(arch["in_channels"], IMAGE_SIZE, IMAGE_SIZE), eval_kind="digits",
                          real_images=load_digits_images,
                          meta={"source": source, "n_params_unet": sum(p.numel() for p in net.parameters())}, **extra)
