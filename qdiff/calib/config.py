"""Typed calibration-data settings (the ``calib/`` config group): the paper's (T, c, n), Algorithm 1."""
from __future__ import annotations

from dataclasses import dataclass

from qdiff.errors import ConfigError

MODES = ("uniform", "t0", "tmax")


@dataclass
class CalibConfig:
    #: uniform: n inputs every c steps (the paper's timestep-aware set); t0: all N inputs from the last
    #: denoising step (Table 1's "calibrated at t=0"); tmax: all N from the first (pure-noise) step.
    mode: str = "uniform"
    #: Denoising steps of the FP sampler that produces the data; None = the sampler's steps.
    T: int | None = None
    #: Keep the inputs of every c-th step (steps whose timestep number t = T..1 satisfies t % c == 0).
    c: int = 5
    #: Intermediate inputs kept per kept step (= trajectories sampled).
    n: int = 64
    #: Seed of the calibration trajectories (independent of the evaluation seed).
    seed: int = 1234
    #: Trajectories denoised together while collecting.
    batch_size: int = 256
    #: Reuse a cached set with the same key (model, sampler, T, c, n, mode, seed, prompts).
    cache: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown calib.mode '{self.mode}'; known: {', '.join(MODES)}")
        if self.T is not None and self.T <= 0:
            raise ConfigError(f"calib.T must be > 0, got {self.T}")
        if self.c <= 0:
            raise ConfigError(f"calib.c must be > 0, got {self.c}")
        if self.n <= 0:
            raise ConfigError(f"calib.n must be > 0, got {self.n}")
        if self.batch_size <= 0:
            raise ConfigError(f"calib.batch_size must be > 0, got {self.batch_size}")

    def resolve(self, sampler_steps: int) -> "CalibConfig":
        """Fix T from the sampler when unset. ``c <= T`` is checked where data is collected (an FP run collects none)."""
        from dataclasses import replace

        return replace(self, T=self.T if self.T is not None else sampler_steps)

    def checked(self) -> "CalibConfig":
        """This config, ready to collect data: T set and c <= T (one clear line otherwise)."""
        if self.T is None:
            raise ConfigError("calib.T is not set: give it, or resolve it from the sampler's steps (CalibConfig.resolve)")
        if self.c > self.T:
            raise ConfigError(f"calib.c ({self.c}) must be <= calib.T ({self.T})")
        return self

    @property
    def n_trajectories(self) -> int:
        """FP sampling runs the collection makes: n (uniform), or all N from one step (t0, tmax)."""
        return self.n if self.mode == "uniform" else self.N

    @property
    def kept_steps(self) -> int:
        if self.T is None:
            raise ConfigError("calib.T is not set: give it, or resolve it from the sampler's steps (CalibConfig.resolve)")
        return self.T // self.c

    @property
    def N(self) -> int:
        """Size of the calibration set, N = n * floor(T / c) (Table 5)."""
        return self.n * self.kept_steps
