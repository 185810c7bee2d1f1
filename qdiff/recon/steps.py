"""The steps of a reconstruction (paper Algorithm 1, plus whole-model steps beyond it).

Every step follows one small protocol (:class:`Step`): a stable ``name`` (its checkpoint id), ``run``
(does the work on the quantized model and returns a :class:`StepReport`), ``state`` (the tensors that
hold its result) and ``restore`` (puts a saved result back). The engine only orders, checkpoints and
resumes them; adding a step never touches it.

* :class:`WeightRounding`  AdaRound of one unit's weight rounding, activations FP     ``weights:<unit>``
* :class:`ActRangeInit`    every activation quantizer's range from calibration data   ``act_init``
* :class:`ActStepSize`     LSQ of one unit's activation step sizes                    ``acts:<unit>``
* :class:`OutputBiasMatch` the output layer's bias on whole sampling runs             ``output_bias:<layer>``
"""
from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from qdiff.errors import DataError
from qdiff.quant.config import QuantConfig
from qdiff.quant.layers import QuantLayer
from qdiff.quant.wrap import act_quantizers, activations_fp
from qdiff.recon.capture import (UnitCache, capture_unit, row_timesteps, target_slots, unit_call_args, unit_outputs,
                                 uses_timesteps)
from qdiff.recon.config import ReconConfig
from qdiff.recon.units import Unit

log = logging.getLogger("qdiff")
EVAL_ROWS = 256


@dataclass
class StepReport:
    step: str
    unit: str
    kind: str
    n_layers: int
    capture_seconds: float = 0.0
    optimize_seconds: float = 0.0
    mse_before: float | None = None
    mse_after: float | None = None
    hard_fraction: float | None = None
    #: Optimisation steps run (AdaRound may end early once the rounding is decided: recon.stop_when_hard).
    iterations: int | None = None
    resumed: bool = False
    #: The job that ran the step in a parallel reconstruction (None: this process).
    worker: str | None = None
    #: Step-specific results kept with the checkpoint (e.g. the bias match's shift), JSON-serialisable.
    extra: dict = field(default_factory=dict)


@dataclass
class Context:
    """What every step works on: the FP model, its quantized copy (changed in place), the data and settings."""

    fp_model: nn.Module
    q_model: nn.Module
    calib: Any
    qcfg: QuantConfig
    cfg: ReconConfig
    device: torch.device
    #: Calibration rows the unit steps train on (``recon.num_samples`` of them, seeded).
    sample_idx: np.ndarray
    #: Folder for disk-streamed unit caches (``recon.cache_storage=disk``), else None.
    disk: Path | None = None
    #: Lightning logger (W&B) or False; callbacks shown by the engine's progress bar.
    logger: Any = False
    callbacks: list = field(default_factory=list)


class Step(Protocol):
    name: str

    def run(self, ctx: Context) -> StepReport: ...

    def state(self, ctx: Context) -> dict[str, torch.Tensor]: ...

    def restore(self, ctx: Context, state: dict[str, torch.Tensor]) -> None: ...


def _load_module_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    module.load_state_dict(state, strict=True)
    for m in module.modules():
        if isinstance(m, QuantLayer):
            m.invalidate_cache()


class _UnitStep:
    """A unit's parameters learned by a Lightning loop on the unit's cached inputs and FP outputs."""

    phase = ""

    def __init__(self, unit: Unit, seed: int) -> None:
        self.unit, self.seed = unit, seed
        self.name = f"{self.phase}:{unit.name}"

    def module(self, ctx: Context) -> nn.Module:
        return ctx.q_model.get_submodule(self.unit.name)

    def layers(self, ctx: Context) -> list[QuantLayer]:
        return [m for m in self.module(ctx).modules() if isinstance(m, QuantLayer)]

    def iters(self, cfg: ReconConfig) -> int:
        raise NotImplementedError

    def independent(self, cfg: ReconConfig) -> bool:
        """Whether the step needs nothing from the other units' steps of its phase (FP inputs): it may run in
        another process, at the same time as they do (:mod:`qdiff.recon.parallel`)."""
        return cfg.source(self.phase) == "fp"

    def begin(self, ctx: Context) -> tuple[list[nn.Parameter], list]:
        """Prepare the unit; returns (parameters to learn, AdaRound quantizers)."""
        raise NotImplementedError

    def end(self, ctx: Context, adaround: list, report: StepReport) -> None:
        """Fix what was learned."""

    def run(self, ctx: Context) -> StepReport:
        from qdiff.recon.module import ReconModule, trainer_for

        unit_mod = self.module(ctx)
        t = time.perf_counter()
        cache = capture_unit(self.unit.name, ctx.fp_model, ctx.q_model, ctx.calib, ctx.sample_idx, ctx.cfg.capture_batch_size,
                             ctx.device, ctx.cfg.cache_storage, ctx.disk, ctx.cfg.source(self.phase), progress=False)
        rep = StepReport(self.name, self.unit.name, self.unit.kind, self.unit.n_layers,
                         capture_seconds=round(time.perf_counter() - t, 2))
        rep.mse_before = _eval_mse(unit_mod, cache, ctx)
        t = time.perf_counter()
        params, ada = self.begin(ctx)
        if params:
            for p in params:
                p.requires_grad_(True)
            iters = self.iters(ctx.cfg)
            module = ReconModule(unit_mod, cache, ctx.calib, ctx.sample_idx, self.phase, params, ctx.cfg, iters, self.seed, ada,
                                 name=self.unit.name)
            trainer_for(iters, ctx.device, ctx.cfg.precision, ctx.cfg.lightning_progress, ctx.logger, ctx.callbacks).fit(module)
            rep.iterations = module.steps_run
            unit_mod.to(ctx.device)  # Lightning's teardown moves the module it trained to the CPU
            for p in params:
                p.requires_grad_(False)
        self.end(ctx, ada, rep)
        rep.optimize_seconds = round(time.perf_counter() - t, 2)
        rep.mse_after = _eval_mse(unit_mod, cache, ctx)
        cache.close()
        if not np.isfinite(rep.mse_after):
            raise DataError(f"reconstruction: unit '{self.unit.name}' gives a non-finite output after its {self.phase} "
                            f"step (MSE {rep.mse_after} against FP; before: {rep.mse_before:.4g})")
        log.info("%s: block MSE %.4g -> %.4g (%.1f s)", self.name, rep.mse_before, rep.mse_after, rep.optimize_seconds)
        return rep

    def state(self, ctx: Context) -> dict[str, torch.Tensor]:
        return self.module(ctx).state_dict()

    def restore(self, ctx: Context, state: dict[str, torch.Tensor]) -> None:
        _load_module_state(self.module(ctx), state)


class WeightRounding(_UnitStep):
    """AdaRound: learn whether each weight of the unit rounds down or up, with FP activations."""

    phase = "weights"

    def iters(self, cfg: ReconConfig) -> int:
        return cfg.weight_iters

    def begin(self, ctx: Context) -> tuple[list[nn.Parameter], list]:
        ada = [q for layer in self.layers(ctx) for q in layer.start_adaround()]
        return [q.alpha for q in ada], ada

    def run(self, ctx: Context) -> StepReport:
        with activations_fp(ctx.q_model):
            return super().run(ctx)

    def end(self, ctx: Context, adaround: list, report: StepReport) -> None:
        if adaround:
            report.hard_fraction = round(float(np.mean([q.hard_fraction() for q in adaround])), 4)
            for layer in self.layers(ctx):
                layer.finish_adaround()


class ActStepSize(_UnitStep):
    """LSQ: learn the step sizes of the unit's activation quantizers (weights final)."""

    phase = "acts"

    def iters(self, cfg: ReconConfig) -> int:
        return cfg.act_iters

    def begin(self, ctx: Context) -> tuple[list[nn.Parameter], list]:
        name = self.unit.name
        return [q.scale for n, q in act_quantizers(ctx.q_model, calibrated=True)
                if (n.startswith(name + ".") or n.startswith(name + ".aq")) and q.active], []


class ActRangeInit:
    """Set every activation quantizer's range from calibration data (min-max or the Lp search)."""

    name = "act_init"

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples

    def run(self, ctx: Context) -> StepReport:
        from qdiff.quant.act_init import init_act_quantizers

        t = time.perf_counter()
        init_act_quantizers(ctx.q_model, ctx.calib, ctx.qcfg.resolved_scale_method, ctx.qcfg.lp,
                            num_samples=self.num_samples, seed=ctx.cfg.seed, device=ctx.device, progress=False)
        return StepReport(self.name, "", "all", 0, optimize_seconds=round(time.perf_counter() - t, 2))

    def state(self, ctx: Context) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": v for n, q in act_quantizers(ctx.q_model, calibrated=True) for k, v in q.state_dict().items()}

    def restore(self, ctx: Context, state: dict[str, torch.Tensor]) -> None:
        per_quantizer: dict[str, dict] = {}
        for k, v in state.items():
            name, attr = k.rsplit(".", 1)
            per_quantizer.setdefault(name, {})[attr] = v
        by_name = dict(act_quantizers(ctx.q_model, calibrated=True))
        for name, sd in per_quantizer.items():
            by_name[name].load_state_dict(sd)


class OutputBiasMatch:
    """Shift the output layer's bias so the calibration trajectories' final samples keep FP's per-channel mean."""

    def __init__(self, layer: str) -> None:
        self.layer = layer
        self.name = f"output_bias:{layer}"

    def run(self, ctx: Context) -> StepReport:
        from qdiff.recon.output import ProbeScore, match_output_mean

        t = time.perf_counter()
        n = ctx.cfg.probe_samples
        score = ProbeScore(lambda unet: ctx.calib.final_latents(unet, n), ctx.fp_model)
        period = getattr(getattr(ctx.fp_model, "config", None), "out_channels", None)  # a transformer's patch outputs
        res = match_output_mean(ctx.q_model, self.layer, score, period=period)
        rep = StepReport(self.name, self.layer, "layer", 1, optimize_seconds=round(time.perf_counter() - t, 2))
        # the model is final here: its probe MSE is recorded with the step (a resumed run reads it back)
        rep.extra = {"bias_match": res, "layer": self.layer, "probe_mse_final": round(res.pop("probe_mse"), 6)}
        log.info("%s: probe mean deviation %s -> %s", self.name, res.get("mean_dev_before"), res.get("mean_dev_after"))
        return rep

    def state(self, ctx: Context) -> dict[str, torch.Tensor]:
        return ctx.q_model.get_submodule(self.layer).state_dict()

    def restore(self, ctx: Context, state: dict[str, torch.Tensor]) -> None:
        _load_module_state(ctx.q_model.get_submodule(self.layer), state)


@torch.no_grad()
def _eval_mse(unit_mod: nn.Module, cache: UnitCache, ctx: Context) -> float:
    from qdiff.recon.module import unit_loss

    rows = np.arange(min(EVAL_ROWS, cache.n))
    timed = uses_timesteps(unit_mod)
    total = 0.0
    for s in range(0, len(rows), 64):
        r = rows[s:s + 64]
        args, kwargs = unit_call_args(cache, r, ctx.calib, ctx.sample_idx, ctx.device)
        with row_timesteps(timed, ctx.calib, ctx.sample_idx, r):
            out = unit_mod(*args, **kwargs)
        outs = unit_outputs(out)
        total += float(unit_loss(outs, [cache.read(s, r, ctx.device) for s in target_slots(len(outs))])) * len(r)
    return total / len(rows)
