"""Samplers: diffusers schedulers driving any noise predictor."""
from qdiff.sampling.config import FROM_CONFIG, SAMPLERS, SamplerConfig
from qdiff.sampling.samplers import (build_scheduler, denoise, generate, generate_batch, guided_eps, initial_noise,
                                     scheduler_config_of)

__all__ = ["FROM_CONFIG", "SAMPLERS", "SamplerConfig", "build_scheduler", "denoise", "generate", "generate_batch", "guided_eps",
           "initial_noise", "scheduler_config_of"]
