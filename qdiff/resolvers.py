"""OmegaConf resolvers the config files use; registered by ``run.py`` before Hydra composes (light: no torch)."""
from __future__ import annotations


def for_method(method: str, wanted: str, value):
    """``value`` when the quant group's ``method`` is ``wanted``, else None: lets a ``quant/`` file give a default
    transform to one method only (``smooth: ${qdiff_for:${.method},qdiff,0.5}``), so that ``quant.method=linear``
    stays the plain baseline."""
    return value if method == wanted else None


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("qdiff_for"):
        OmegaConf.register_new_resolver("qdiff_for", for_method)
