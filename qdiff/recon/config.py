"""Typed reconstruction settings (the ``recon/`` config group). Defaults are the paper's (Appendix A)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qdiff.errors import ConfigError, check_switches, config_from_dict

#: Named budgets; each equals a file of the ``recon/`` config group (tests/test_api.py composes and compares).
#: paper: Appendix A, 20k AdaRound + 5k LSQ iterations (``recon=default``). cpu: 20x fewer iterations with
#: learning rates scaled so that AdaRound still ends fully hard (``recon=cpu``, the digits runs; the measured
#: basis is in conf/recon/cpu.yaml): with the paper's 1e-3 at 1000 iterations only ~55 % of the rounding
#: variables end decided.
PRESETS: dict[str, dict] = {
    "paper": {},
    "cpu": {"weight_iters": 1000, "act_iters": 200, "weight_lr": 5e-2, "act_lr": 5e-4, "capture_batch_size": 256,
            "output_bias_match": True, "probe_samples": 32},
}
#: The ``recon/`` config file of each preset.
PRESET_FILES = {"paper": "default", "cpu": "cpu"}


#: Settings that never change a reconstruction's result (left out of cache keys and work-folder identities).
RESULT_NEUTRAL = ("resume", "lightning_progress", "stop_when_hard", "workers", "launcher", "worker_params",
                  "worker_retries")

#: Where a unit's inputs come from, per phase (weights = AdaRound, acts = LSQ).
INPUT_SOURCES = {"quantized": ("quantized", "quantized"), "fp": ("fp", "fp"),
                 "fp_then_quantized": ("fp", "quantized")}
#: What ``recon.workers > 1`` does with ``input_source=quantized`` (the paper's sequential mode cannot run in
#: parallel): every unit on FP inputs, AdaRound and LSQ both spread over the workers. Measured (docs/parallel.md,
#: digits W4A8, 3 reconstruction x 2 sampling seeds): fp recovers 0.995 / 1.000 / 0.982 of linear's FID gap and
#: fp_then_quantized (LSQ in order on quantized inputs, a sequential refinement) 0.992 / 1.002 / 0.976: the
#: refinement gains nothing here and is SD v1.4's makespan bound (5.0 h against 1.2 h on 16 GPUs).
PARALLEL_INPUT_SOURCE = "fp"


@dataclass
class ReconConfig:
    #: AdaRound iterations per block/layer for the weights (paper: 20k).
    weight_iters: int = 20000
    #: LSQ iterations per block/layer for the activation step sizes (paper: 5k).
    act_iters: int = 5000
    #: Calibration samples per iteration (paper: 32).
    batch_size: int = 32
    #: Adam learning rate of the AdaRound rounding variables.
    weight_lr: float = 1e-3
    #: Adam learning rate of the LSQ step sizes.
    act_lr: float = 4e-5
    #: Weight of the AdaRound rounding regulariser (0.01).
    round_weight: float = 0.01
    #: Regulariser temperature annealed from b_start to b_end after the warm-up.
    b_start: float = 20.0
    b_end: float = 2.0
    #: Fraction of weight iterations without the regulariser (0.2).
    warmup: float = 0.2
    #: block: residual/transformer blocks jointly, other layers alone (paper); layer: every layer alone.
    granularity: str = "block"
    #: Extra blocks for networks outside the registry: regexes on module names (re.fullmatch).
    block_patterns: list = field(default_factory=list)
    #: Where a block's inputs come from: quantized (model with the earlier blocks already quantized; the paper), fp
    #: (the FP model's: every unit independent, so they can run in parallel), or fp_then_quantized (AdaRound on FP
    #: inputs, in parallel; then the activation step sizes in order on quantized inputs).
    input_source: str = "quantized"
    #: Calibration samples used (None = all N). Inputs and FP targets of the current block are cached.
    num_samples: int | None = None
    #: Forward batch size when capturing a block's inputs and FP targets (no gradients; larger is faster on CPU).
    capture_batch_size: int = 64
    #: Keep the per-block cache in memory or stream it from disk (bounded RAM for large N).
    cache_storage: str = "memory"
    #: Lightning precision of the reconstruction loops: 32-true | bf16-mixed (GPU) | 16-mixed.
    precision: str = "32-true"
    #: Checkpoint after each block and resume an interrupted reconstruction with the same settings.
    resume: bool = True
    #: Seed of the reconstruction's batch sampling (per block: seed + block index).
    seed: int = 0
    #: Shift the output layer's (FP) bias per channel so that samples from the calibration noise have FP's
    #: per-channel mean (secant steps on whole sampling runs). False = the paper.
    output_bias_match: bool = False
    #: Calibration trajectories replayed to the end (same noise, sampler and T) that score the bias match.
    probe_samples: int = 64
    #: End a unit's AdaRound loop once every rounding variable is at exactly 0 or 1 (checked every 25 steps).
    #: Exact, not a heuristic: from then on no gradient reaches the rounding variables and Adam's momentum only
    #: moves them further out, so the rounding equals a run to ``weight_iters``. False: always run all steps.
    stop_when_hard: bool = True
    #: Lightning's own progress bar for every unit loop (off: one reconstruction bar shows unit, step and loss).
    lightning_progress: bool = False
    #: Parallel reconstruction: the unit steps that only need FP inputs are split over this many jobs (1: all in
    #: this process). With input_source=quantized, workers > 1 switches to PARALLEL_INPUT_SOURCE (said in the log).
    #: Needs a work folder (the jobs write their units' checkpoints there; on SLURM it must be on a shared disk).
    workers: int = 1
    #: Where the jobs run, through submitit: local (processes on this machine) or slurm (a job array).
    launcher: str = "local"
    #: submitit executor parameters of each job (e.g. slurm_partition, timeout_min, cpus_per_task, gpus_per_node).
    worker_params: dict | None = None
    #: Times a failed or killed job's unfinished units are resubmitted before the reconstruction stops.
    worker_retries: int = 1

    def source(self, phase: str) -> str:
        """Where the units' inputs come from in ``phase`` (``weights`` or ``acts``): quantized or fp."""
        return INPUT_SOURCES[self.input_source][phase == "acts"]

    def result_settings(self) -> dict:
        """The settings that determine the result (what a cache key or a work folder records)."""
        return {k: v for k, v in asdict(self).items() if k not in RESULT_NEUTRAL}

    @classmethod
    def preset(cls, name: str, **overrides) -> "ReconConfig":
        """A named budget (``"paper"`` or ``"cpu"``, as ``recon=default`` / ``recon=cpu``), with ``overrides``.

        Use ``"cpu"`` for short budgets: the paper's learning rate leaves AdaRound undecided below ~20k
        iterations. ``ReconConfig.preset("cpu", weight_iters=1000)`` keeps its learning rates.
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown recon preset {name!r}; known: {', '.join(PRESETS)}")
        return config_from_dict(cls, {**PRESETS[name], **overrides}, "recon")

    def __post_init__(self) -> None:
        if self.weight_iters < 0 or self.act_iters < 0:
            raise ConfigError("recon.weight_iters and recon.act_iters must be >= 0")
        if self.batch_size <= 0:
            raise ConfigError(f"recon.batch_size must be > 0, got {self.batch_size}")
        if self.weight_lr <= 0 or self.act_lr <= 0 or self.round_weight < 0:
            raise ConfigError("recon learning rates must be > 0 and recon.round_weight >= 0")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"recon.warmup must be in [0, 1), got {self.warmup}")
        if self.granularity not in ("block", "layer"):
            raise ConfigError(f"recon.granularity must be block or layer, got '{self.granularity}'")
        if self.input_source not in INPUT_SOURCES:
            raise ConfigError(f"recon.input_source must be one of {', '.join(INPUT_SOURCES)}, got '{self.input_source}'")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"recon.workers must be an integer >= 1, got {self.workers!r}")
        if self.launcher not in ("local", "slurm"):
            raise ConfigError(f"recon.launcher must be local or slurm, got '{self.launcher}'")
        if not isinstance(self.worker_retries, int) or self.worker_retries < 0:
            raise ConfigError(f"recon.worker_retries must be an integer >= 0, got {self.worker_retries!r}")
        if self.worker_params is not None and not hasattr(self.worker_params, "keys"):
            raise ConfigError(f"recon.worker_params must be a mapping of submitit parameters, got {self.worker_params!r}")
        self.worker_params = dict(self.worker_params or {})
        if self.workers > 1 and self.input_source == "quantized":
            self.input_source = PARALLEL_INPUT_SOURCE
        if self.cache_storage not in ("memory", "disk"):
            raise ConfigError(f"recon.cache_storage must be memory or disk, got '{self.cache_storage}'")
        if self.precision not in ("32-true", "32", "bf16-mixed", "16-mixed"):
            raise ConfigError(f"recon.precision must be 32-true, bf16-mixed or 16-mixed, got '{self.precision}'")
        if self.capture_batch_size <= 0:
            raise ConfigError(f"recon.capture_batch_size must be > 0, got {self.capture_batch_size}")
        if self.probe_samples <= 0:
            raise ConfigError(f"recon.probe_samples must be > 0, got {self.probe_samples}")
        check_switches(self, "recon")
        if self.num_samples is not None and self.num_samples <= 0:
            raise ConfigError(f"recon.num_samples must be > 0 or null, got {self.num_samples}")
