"""The one reconstruction engine (paper Algorithm 1), resumable after every unit.

    for each unit (block or layer), in execution order:   AdaRound the unit's weights   ("weights")
    set every activation quantizer's range from calibration data                           ("act_init")
    for each unit, in execution order:                     LSQ the unit's act step sizes ("acts")
    optionally: match the output layer's bias on sampled trajectories (qdiff.recon.output) ("output_bias")

Each finished step writes that unit's tensors to ``work_dir`` (safetensors) and records it in
``progress.json``; a rerun with the same settings replays the finished steps and continues, so the final
weights are bit-identical to an uninterrupted run on CPU (every unit's batches have their own seed).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qdiff.io import load_state_dict_file, write_json
from qdiff.quant.config import QuantConfig
from qdiff.quant.layers import QuantLayer
from qdiff.quant.split import execution_order
from qdiff.quant.wrap import act_quantizers, set_act_quant
from qdiff.recon.capture import UnitCache, capture_unit, unit_call_args
from qdiff.recon.config import ReconConfig
from qdiff.recon.output import Probe, ProbeScore, match_output_mean, output_layer
from qdiff.recon.units import Unit, find_units

log = logging.getLogger("qdiff")
EVAL_ROWS = 256


@dataclass
class StepReport:
    step: str             # "weights:<unit>", "act_init", "acts:<unit>" or "output_bias:<layer>"
    unit: str
    kind: str
    n_layers: int
    capture_seconds: float = 0.0
    optimize_seconds: float = 0.0
    mse_before: float | None = None
    mse_after: float | None = None
    hard_fraction: float | None = None
    resumed: bool = False


class Checkpoints:
    """Per-step unit states under ``root`` (None: no checkpointing)."""

    def __init__(self, root: Path | None, resume: bool) -> None:
        self.root = root
        self.progress: dict = {"done": [], "reports": {}}
        if root is None:
            return
        if root.exists() and not resume:
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        f = root / "progress.json"
        if f.exists():
            self.progress = json.loads(f.read_text())

    def done(self, step: str) -> bool:
        return step in self.progress["done"]

    def load(self, step: str) -> dict[str, torch.Tensor]:
        return load_state_dict_file(self.root / f"{self.progress['done'].index(step):04d}.safetensors")

    def save(self, step: str, state: dict[str, torch.Tensor], report: StepReport, extra: dict | None = None) -> None:
        if extra:
            self.progress.setdefault("output", {})[step] = extra
        if self.root is None:
            self.progress["reports"][step] = asdict(report)
            return
        from safetensors.torch import save_file

        idx = len(self.progress["done"])
        tmp = self.root / f"{idx:04d}.safetensors.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
        os.replace(tmp, self.root / f"{idx:04d}.safetensors")
        self.progress["done"].append(step)
        self.progress["reports"][step] = asdict(report)
        write_json(self.root / "progress.json", self.progress)


@contextmanager
def _quiet_lightning():
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        warnings.filterwarnings("ignore", ".*srun.*")
        warnings.filterwarnings("ignore", ".*in eval mode at the start of training.*")  # intended: the unit keeps eval mode
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)


def _unit_layers(q_model: nn.Module, unit: Unit) -> list[QuantLayer]:
    m = q_model.get_submodule(unit.name)
    return [x for x in m.modules() if isinstance(x, QuantLayer)]


def _unit_act_quantizers(q_model: nn.Module, unit: Unit) -> list[nn.Parameter]:
    prefix = unit.name + "."
    return [q.scale for n, q in act_quantizers(q_model) if (n.startswith(prefix) or n.startswith(unit.name + ".aq")) and q.active]


@torch.no_grad()
def _eval_mse(unit_mod: nn.Module, cache: UnitCache, calib, sample_idx: np.ndarray, device) -> float:
    from qdiff.recon.module import lp_loss

    rows = np.arange(min(EVAL_ROWS, cache.n))
    total = 0.0
    for s in range(0, len(rows), 64):
        r = rows[s:s + 64]
        args, kwargs = unit_call_args(cache, r, calib, sample_idx, device)
        out = unit_mod(*args, **kwargs)
        out = out if isinstance(out, torch.Tensor) else out[0]
        total += float(lp_loss(out.float(), cache.read("target", r, device).float())) * len(r)
    return total / len(rows)


def reconstruct(fp_model: nn.Module, q_model: nn.Module, calib, qcfg: QuantConfig, cfg: ReconConfig,
                forward: Callable | None = None, device: torch.device | str | None = None,
                work_dir: str | Path | None = None, progress: bool = True, logger=False,
                act_init_samples: int = 256, probe: Probe | None = None) -> dict:
    """Reconstruct ``q_model`` (a wrapped copy of ``fp_model``) in place; returns a cost/quality report.

    ``probe(unet) -> final latents`` runs the sampler from fixed (calibration) noise; only
    ``cfg.output_bias_match`` needs it (see :mod:`qdiff.recon.output`).
    """
    from qdiff.api import default_forward
    from qdiff.quant.act_init import init_act_quantizers
    from qdiff.recon.module import ReconModule, trainer_for

    forward = forward or default_forward
    if cfg.output_bias_match and probe is None:
        from qdiff.errors import ConfigError

        raise ConfigError("recon.output_bias_match scores whole sampling runs: it needs a sampler probe "
                          "(the run.py pipeline passes one; API: reconstruct(..., probe=...))")
    device = torch.device(device) if device is not None else next(q_model.parameters()).device
    t_start = time.perf_counter()
    x0, t0, c0 = calib.get([0], device)
    order = execution_order(fp_model, (x0, t0), c0)
    units = find_units(q_model, order, cfg.granularity, cfg.block_patterns)
    n = min(cfg.num_samples or len(calib), len(calib))
    sample_idx = np.sort(np.random.default_rng(cfg.seed).choice(len(calib), size=n, replace=False))
    ckpt = Checkpoints(Path(work_dir) if work_dir is not None else None, cfg.resume)
    disk = Path(work_dir) / "unit_cache" if (cfg.cache_storage == "disk" and work_dir is not None) else None
    if cfg.cache_storage == "disk" and disk is None:
        raise ValueError("recon.cache_storage=disk needs a work_dir")

    steps: list[tuple[str, Unit | None]] = []
    if qcfg.quantizes_weights and cfg.weight_iters > 0:
        steps += [(f"weights:{u.name}", u) for u in units]
    if act_quantizers(q_model):
        steps.append(("act_init", None))
        if cfg.act_iters > 0:
            steps += [(f"acts:{u.name}", u) for u in units]
    out_name = output_layer(q_model, order)
    if cfg.output_bias_match and out_name is not None:
        steps.append((f"output_bias:{out_name}", Unit(out_name, "layer", q_model.get_submodule(out_name).org_type, 1)))
    score = ProbeScore(probe, fp_model) if cfg.output_bias_match else None
    output_report: dict = {}
    reports: list[StepReport] = []
    set_act_quant(q_model, False)
    bar = tqdm(steps, desc="reconstruction", unit="unit", disable=not progress)
    with _quiet_lightning():
        for i, (step, unit) in enumerate(bar):
            bar.set_postfix_str(step[:60])
            if ckpt.done(step):
                _restore(q_model, step, unit, ckpt.load(step))
                rep = StepReport(**{**ckpt.progress["reports"][step], "resumed": True})
                reports.append(rep)
                output_report.update(ckpt.progress.get("output", {}).get(step, {}))
                continue
            if step.startswith("output_bias:"):  # the last step: every unit is final
                t = time.perf_counter()
                set_act_quant(q_model, True)
                _final_weights(q_model)
                res = match_output_mean(q_model, unit.name, score)
                rep = StepReport(step, unit.name, "layer", 1, optimize_seconds=round(time.perf_counter() - t, 2))
                # the model is final here: its probe MSE is recorded with the step (a resumed run reads it back)
                result = {"bias_match": res, "layer": unit.name, "probe_mse_final": round(res.pop("probe_mse"), 6)}
                output_report.update(result)
                ckpt.save(step, q_model.get_submodule(unit.name).state_dict(), rep, extra=result)
                reports.append(rep)
                log.info("%s: probe mean deviation %s -> %s", step, res.get("mean_dev_before"), res.get("mean_dev_after"))
                continue
            if step == "act_init":
                t = time.perf_counter()
                init_act_quantizers(q_model, forward, calib, qcfg.resolved_scale_method, qcfg.lp,
                                    num_samples=act_init_samples, seed=cfg.seed, device=device, progress=progress)
                set_act_quant(q_model, True)
                rep = StepReport(step, "", "all", 0, optimize_seconds=round(time.perf_counter() - t, 2))
                state = {f"{n}.{k}": v for n, q in act_quantizers(q_model) for k, v in q.state_dict().items()}
                ckpt.save(step, state, rep)
                reports.append(rep)
                continue
            phase = step.split(":", 1)[0]
            set_act_quant(q_model, phase == "acts")
            unit_mod = q_model.get_submodule(unit.name)
            t = time.perf_counter()
            cache = capture_unit(unit.name, fp_model, q_model, forward, calib, sample_idx, cfg.capture_batch_size, device,
                                 cfg.cache_storage, disk, cfg.input_source, progress=False)
            rep = StepReport(step, unit.name, unit.kind, unit.n_layers, capture_seconds=round(time.perf_counter() - t, 2))
            rep.mse_before = _eval_mse(unit_mod, cache, calib, sample_idx, device)
            t = time.perf_counter()
            layers = _unit_layers(q_model, unit)
            seed = cfg.seed * 100_003 + 2 * i + (phase == "acts")
            if phase == "weights":
                ada = [q for layer in layers for q in layer.start_adaround()]
                params = [q.alpha for q in ada]
            else:
                ada = []
                params = _unit_act_quantizers(q_model, unit)
            if params:
                for p in params:
                    p.requires_grad_(True)
                iters = cfg.weight_iters if phase == "weights" else cfg.act_iters
                module = ReconModule(unit_mod, cache, calib, sample_idx, phase, params, cfg, iters, seed, ada)
                trainer_for(iters, device, cfg.precision, progress, logger).fit(module)
                for p in params:
                    p.requires_grad_(False)
            if ada:
                rep.hard_fraction = round(float(np.mean([q.hard_fraction() for q in ada])), 4)
                for layer in layers:
                    layer.finish_adaround()
            rep.optimize_seconds = round(time.perf_counter() - t, 2)
            rep.mse_after = _eval_mse(unit_mod, cache, calib, sample_idx, device)
            cache.close()
            ckpt.save(step, unit_mod.state_dict(), rep)
            reports.append(rep)
            log.info("%s: block MSE %.4g -> %.4g (%.1f s)", step, rep.mse_before, rep.mse_after, rep.optimize_seconds)
    bar.close()
    set_act_quant(q_model, True)
    _final_weights(q_model)
    done = [r for r in reports if not r.resumed]
    return {
        "output": output_report,
        "units": [asdict(u) for u in units],
        "n_units": len(units),
        "n_calibration_inputs": n,
        "steps": [asdict(r) for r in reports],
        "resumed_steps": sum(r.resumed for r in reports),
        "seconds_total": round(time.perf_counter() - t_start, 2),
        "seconds_capture": round(sum(r.capture_seconds for r in done), 2),
        "seconds_optimize": round(sum(r.optimize_seconds for r in done), 2),
    }


def _final_weights(q_model: nn.Module) -> None:
    """Weights are final: layers cache their fake-quantized weight again."""
    for m in q_model.modules():
        if isinstance(m, QuantLayer):
            m.cache_weights = True
            m.invalidate_cache()


def _restore(q_model: nn.Module, step: str, unit: Unit | None, state: dict[str, torch.Tensor]) -> None:
    if unit is None:  # act_init: every activation quantizer's parameters
        by_name = dict(act_quantizers(q_model))
        prefixes = {}
        for k, v in state.items():
            name, attr = k.rsplit(".", 1)
            prefixes.setdefault(name, {})[attr] = v
        for name, sd in prefixes.items():
            by_name[name].load_state_dict(sd)
        set_act_quant(q_model, True)
        return
    unit_mod = q_model.get_submodule(unit.name)
    unit_mod.load_state_dict(state, strict=True)
    for m in unit_mod.modules():
        if isinstance(m, QuantLayer):
            m.invalidate_cache()
