"""Typed deployment settings (the ``deploy/`` config group)."""
from __future__ import annotations

from dataclasses import dataclass, field

from qdiff.errors import ConfigError, check_switches

#: none: no deployed sampling; otherwise the backend that runs the exported artifact (qdiff.deploy.BACKENDS).
TARGETS = ("none", "simulated", "int8")


@dataclass
class DeployConfig:
    #: none | simulated | int8: after reconstruction the run exports its artifact (always), loads it back with
    #: this backend in the same process, samples with it from the same noise and measures it.
    backend: str = "none"
    #: int8: torch.compile the lowered network (inductor, weight freezing); false runs PyTorch's eager int8 ops.
    compile: bool = True
    #: Also time it: UNet latency (batch 1 and the sampler's batch) and sampling time of FP eager, FP compiled, the
    #: simulated model and the artifact, interleaved. Off: the run samples with the artifact and scores it, no timing
    #: (the benchmarks experiments/benchmarks/bench_deploy.py and bench_int8_latency.py time it on a quiet machine).
    timing: bool = False
    #: Interleaved calls per variant for the UNet latency (medians reported).
    latency_repeats: int = 20
    #: Batch sizes of the UNet latency table; [] = 1 and the sampler's batch size.
    latency_batches: list = field(default_factory=list)
    #: Sampler batches (from the first) that FP eager and FP compiled also sample, in turn with the simulated
    #: and the deployed model, for the end-to-end sampling-time comparison (medians per batch reported).
    timing_batches: int = 2

    def __post_init__(self) -> None:
        if self.backend not in TARGETS:
            raise ConfigError(f"unknown deploy.backend '{self.backend}'; known: {', '.join(TARGETS)}")
        check_switches(self, "deploy")
        if self.latency_repeats < 1 or self.timing_batches < 1:
            raise ConfigError("deploy.latency_repeats and deploy.timing_batches must be >= 1")
        if not all(isinstance(b, int) and b > 0 for b in self.latency_batches):
            raise ConfigError(f"deploy.latency_batches must be positive batch sizes, got {self.latency_batches!r}")

    @property
    def enabled(self) -> bool:
        return self.backend != "none"
