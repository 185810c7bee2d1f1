"""Samplers: diffusers schedulers driving any noise predictor."""
from qdiff.sampling.config import SAMPLERS, SamplerConfig
from qdiff.sampling.samplers import build_scheduler, denoise, generate, guided_eps, initial_noise

__all__ = ["SAMPLERS", "SamplerConfig", "build_scheduler", "denoise", "generate", "guided_eps", "initial_noise"]
