"""Model loaders: a registry from ``model.name`` to a function building a :class:`DiffusionModel`."""
from __future__ import annotations

from typing import Callable

from qdiff.models.base import DiffusionModel, ModelConfigError, WeightsNotFoundError, eps, unwrap_output
from qdiff.models.config import ModelConfig

MODEL_REGISTRY: dict[str, Callable[[ModelConfig], DiffusionModel]] = {}


def register_model(name: str) -> Callable:
    """Register a loader ``fn(cfg: ModelConfig) -> DiffusionModel`` under ``name``."""

    def deco(fn: Callable[[ModelConfig], DiffusionModel]) -> Callable[[ModelConfig], DiffusionModel]:
        MODEL_REGISTRY[name] = fn
        return fn

    return deco


def check_model_name(name: str) -> None:
    _import_loaders()
    if name not in MODEL_REGISTRY:
        raise ModelConfigError(f"unknown model '{name}'; known: {', '.join(sorted(MODEL_REGISTRY))}")


def load_model(cfg: ModelConfig) -> DiffusionModel:
    """Build the model named by ``cfg.name`` (weights from ``cfg.source`` or random init)."""
    check_model_name(cfg.name)
    return MODEL_REGISTRY[cfg.name](cfg)


def _import_loaders() -> None:
    # Loaders register themselves on import; importing here keeps `import qdiff` light.
    from qdiff.models import digits_loader  # noqa: F401

    from qdiff.models import paper  # noqa: F401


__all__ = [
    "DiffusionModel", "ModelConfig", "ModelConfigError", "WeightsNotFoundError", "MODEL_REGISTRY",
    "register_model", "load_model", "check_model_name", "eps", "unwrap_output",
]
