"""qdiff: post-training quantization of diffusion models (Q-Diffusion), with experiment orchestration.

    import qdiff
    qmodel = qdiff.quantize(unet, qdiff.QuantConfig(method="qdiff", weight_bits=4, act_bits=8), calib_data)

Importing ``qdiff`` is light; heavy dependencies load on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "quantize":
        from qdiff.api import quantize

        return quantize
    if name == "QuantConfig":
        from qdiff.quant.config import QuantConfig

        return QuantConfig
    if name == "ReconConfig":
        from qdiff.recon.config import ReconConfig

        return ReconConfig
    if name in ("export", "load_deployed"):
        from qdiff import deploy

        return getattr(deploy, name)
    raise AttributeError(f"module 'qdiff' has no attribute {name!r}")


__all__ = ["quantize", "QuantConfig", "ReconConfig", "export", "load_deployed", "__version__"]
