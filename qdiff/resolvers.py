"""OmegaConf resolvers the config files use; registered by ``run.py`` before Hydra composes (light: no torch)."""
from __future__ import annotations


def for_method(method: str, wanted: str, value):
    """``value`` when the quant group's ``method`` is ``wanted``, else None: lets a ``quant/`` file give a default
    transform to one method only (``smooth: ${qdiff_for:${.method},qdiff,0.5}``), so that ``quant.method=linear``
    stays the plain baseline."""
    return value if method == wanted else None


def at_a4_dynamic(act_bits, act_dynamic, value, otherwise):
    """``value`` at 4-bit per-token dynamic activations (``quant=w4a4``'s default method), else ``otherwise``: lets
    ``recon/cpu.yaml`` give that setting its own measured budget (``${qdiff_a4_dynamic:${quant.act_bits},
    ${quant.act_dynamic},500,1000}``)."""
    return value if act_bits == 4 and act_dynamic else otherwise


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("qdiff_for"):
        OmegaConf.register_new_resolver("qdiff_for", for_method)
    if not OmegaConf.has_resolver("qdiff_a4_dynamic"):
        OmegaConf.register_new_resolver("qdiff_a4_dynamic", at_a4_dynamic)
