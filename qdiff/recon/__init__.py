"""Block reconstruction: one engine ordering steps (AdaRound, activation init, LSQ, output bias), resumable."""
from qdiff.recon.config import ReconConfig
from qdiff.recon.engine import reconstruct
from qdiff.recon.units import BLOCK_REGISTRY, Unit, find_units, register_block

__all__ = ["ReconConfig", "reconstruct", "BLOCK_REGISTRY", "Unit", "find_units", "register_block"]
