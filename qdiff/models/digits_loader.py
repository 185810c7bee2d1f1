"""Registry entry for the embedded ``digits`` model."""
from __future__ import annotations

from qdiff.io import CheckpointError, load_into, load_state_dict_file
from qdiff.models import register_model
from qdiff.models.base import DiffusionModel, ModelConfigError, WeightsNotFoundError
from qdiff.models.config import ModelConfig
from qdiff.models.digits import IMAGE_SIZE, SCHEDULER_CONFIG, UNET_CONFIG, UNET_WEIGHTS, load_digits_images


@register_model("digits")
def load_digits(cfg: ModelConfig) -> DiffusionModel:
    from diffusers import UNet2DModel

    unknown = set(cfg.arch) - set(UNET_CONFIG)
    if unknown:
        raise ModelConfigError(f"digits: unknown model.arch keys {sorted(unknown)}; known: {sorted(UNET_CONFIG)}")
    arch = {**UNET_CONFIG, **cfg.arch}
    unet = UNet2DModel(**arch)
    source = "random-init"
    if not cfg.random_init:
        path = cfg.source or str(UNET_WEIGHTS)
        try:
            state = load_state_dict_file(path)
        except CheckpointError as e:
            if "not found" in str(e):
                raise WeightsNotFoundError(
                    f"digits: weights not found at {path}; make them with `python experiments/train_digits.py` "
                    "(~20 min on 2 CPU cores) or use model.random_init=true"
                ) from None
            raise
        load_into(unet, state, "digits UNet")
        source = path
    unet.eval().requires_grad_(False)
    return DiffusionModel(
        name="digits",
        unet=unet,
        scheduler_config=dict(SCHEDULER_CONFIG),
        sample_shape=(arch["in_channels"], IMAGE_SIZE, IMAGE_SIZE),
        eval_kind="digits",
        real_images=load_digits_images,
        meta={"source": source, "n_params_unet": sum(p.numel() for p in unet.parameters())},
    )
