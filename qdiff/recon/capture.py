"""Inputs and FP targets of one reconstruction unit, captured over the calibration set.

For unit u, the quantized model (earlier units already reconstructed) runs up to u and its call
arguments are recorded (or, with ``input_source=fp``, the FP model's); the FP model runs through u and
its output is the target. Both forwards stop right after u (no wasted compute). Tensors whose leading
dimension is the batch are stored per sample, in memory or in memory-mapped files on disk; arguments that
are the calibration conditioning itself (e.g. SD's text embeddings) are re-read from the calibration
set instead of being copied.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qdiff.errors import DataError
from qdiff.finite import first_bad_row, kind
from qdiff.io import NpyRowWriter, read_rows
from qdiff.models.base import eps


class _Stop(Exception):
    pass


class _NonFinite(Exception):
    """A captured tensor holds NaN/Inf: (slot, row of the unit cache, what)."""


class UnitCache:
    """Per-sample tensors of one unit: named slots -> [N, ...] (RAM tensors, or .npy files on disk that are
    written with positioned writes and read back memory-mapped, so resident memory stays bounded)."""

    def __init__(self, n: int, storage: str, root: Path | None) -> None:
        self.n = n
        self.storage = storage
        self.root = root
        self.slots: dict[str, Any] = {}
        self.writers: dict[str, NpyRowWriter] = {}
        self.cond_refs: dict[str, str] = {}    # slot -> calibration cond key it aliases
        self.constants: dict[str, Any] = {}    # non-batched call arguments
        self.arg_names: list[str] = []         # positional slots in order
        self.kwarg_names: list[str] = []
        if storage == "disk":
            assert root is not None
            if root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True)

    def write(self, slot: str, rows: slice, value: torch.Tensor) -> None:
        v = value.detach()
        bad = first_bad_row(v)
        if bad is not None:  # before it reaches the cache: a unit never trains on broken numbers
            raise _NonFinite(slot, rows.start + bad, kind(v[bad]))
        if self.storage == "disk":
            if slot not in self.writers:
                self.writers[slot] = NpyRowWriter(self.root / f"{slot}.npy", (self.n, *v.shape[1:]))
                self.slots[slot] = None  # opened for reading once written
            self.writers[slot].write(rows, v.float().cpu().numpy())
            return
        if slot not in self.slots:
            self.slots[slot] = torch.empty((self.n, *v.shape[1:]), dtype=v.dtype, device=v.device)
        self.slots[slot][rows] = v

    def read(self, slot: str, idx: np.ndarray, device) -> torch.Tensor:
        if self.storage == "disk":
            if self.slots[slot] is None:
                self.writers.pop(slot).close()
                self.slots[slot] = np.load(self.root / f"{slot}.npy", mmap_mode="r")
            return torch.from_numpy(read_rows(self.slots[slot], idx)).to(device)
        store = self.slots[slot]
        return store[torch.as_tensor(idx, device=store.device)].to(device)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()
        self.slots.clear()
        if self.storage == "disk" and self.root is not None and self.root.exists():
            shutil.rmtree(self.root)


def _is_batched(v: Any, b: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b


@torch.no_grad()
def capture_unit(unit_name: str, fp_model: nn.Module, q_model: nn.Module, calib, sample_idx: np.ndarray,
                 batch_size: int, device, storage: str = "memory", root: Path | None = None,
                 input_source: str = "quantized", progress: bool = True) -> UnitCache:
    """Run both models over the chosen calibration inputs and cache (unit inputs, FP unit output)."""
    cache = UnitCache(len(sample_idx), storage, root)
    fp_mod = fp_model.get_submodule(unit_name)
    src_model = q_model if input_source == "quantized" else fp_model
    src_mod = src_model.get_submodule(unit_name)
    state: dict = {}

    def record_inputs(_m, args, kwargs):
        b, rows, cond = state["b"], state["rows"], state["cond"]
        cond_ids = {id(v): k for k, v in cond.items()}
        if not cache.arg_names and not cache.kwarg_names and not cache.constants:
            cache.arg_names = [f"arg{i}" for i in range(len(args))]
            cache.kwarg_names = list(kwargs)
        for name, v in list(zip(cache.arg_names, args)) + [(f"kw_{k}", kwargs[k]) for k in cache.kwarg_names]:
            if id(v) in cond_ids:
                cache.cond_refs[name] = cond_ids[id(v)]
            elif _is_batched(v, b):
                cache.write(name, rows, v)
            elif name not in cache.constants:
                cache.constants[name] = v
        if src_model is not fp_model:
            raise _Stop

    def record_output(_m, _args, _kwargs, out):
        for slot, o in zip(target_slots(len(unit_outputs(out))), unit_outputs(out)):
            cache.write(slot, state["rows"], o)
        raise _Stop

    h_in = src_mod.register_forward_pre_hook(record_inputs, with_kwargs=True)
    h_out = fp_mod.register_forward_hook(record_output, with_kwargs=True)
    try:
        _capture_rows(cache, state, fp_model, src_model, calib, sample_idx, batch_size, device, unit_name, progress)
    except _NonFinite as e:
        cache.close()
        slot, row, what = e.args
        raise DataError(non_finite_message(unit_name, slot, what, calib, int(sample_idx[row]), input_source)) from None
    finally:
        h_in.remove()
        h_out.remove()
    if "target" not in cache.slots:
        raise RuntimeError(f"unit {unit_name} never ran on the calibration inputs")
    return cache


def unit_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor a unit returns: one for UNet blocks and layers, both streams for SD3's and FLUX's blocks
    (``(encoder_hidden_states, hidden_states)``; the last SD3 block's text stream is None and left out)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "sample"):
        return [out.sample]
    return [o for o in out if isinstance(o, torch.Tensor)]


def target_slots(n: int) -> list[str]:
    """Cache slots of a unit's FP outputs: ``target`` (the first), ``target_1``, ..."""
    return ["target"] + [f"target_{i}" for i in range(1, n)]


def non_finite_message(unit: str, slot: str, what: str, calib, row: int, input_source: str) -> str:
    from qdiff.calib.checks import describe_row

    at = f"calibration {describe_row(calib, row)}"
    if slot.startswith("target"):
        return (f"reconstruction: the FP model's output of unit '{unit}' is {what} on {at} although the calibration "
                "data is finite: the FP model itself breaks on this input (check its weights and this timestep)")
    source = "quantized model (earlier units already quantized)" if input_source == "quantized" else "FP model"
    return (f"reconstruction: the input of unit '{unit}' from the {source} is {what} on {at}: "
            + ("an earlier unit's quantization broke it (see the MSE of the units before it)" if input_source == "quantized"
               else "the FP model itself breaks on this input"))


def _capture_rows(cache: UnitCache, state: dict, fp_model: nn.Module, src_model: nn.Module, calib, sample_idx: np.ndarray,
                  batch_size: int, device, unit_name: str, progress: bool) -> None:
    """Both forwards over the chosen rows, batch by batch (the hooks record into ``cache``)."""
    bar = tqdm(total=len(sample_idx), desc=f"capture {unit_name}", disable=not progress, leave=False)
    for start in range(0, len(sample_idx), batch_size):
        idx = sample_idx[start:start + batch_size]
        x, t, cond = calib.get(idx, device)
        state.update(b=x.shape[0], rows=slice(start, start + len(idx)), cond=cond)
        for model in ((src_model, fp_model) if src_model is not fp_model else (fp_model,)):
            try:
                eps(model, x, t, cond)
            except _Stop:
                pass
        bar.update(len(idx))
    bar.close()


def unit_call_args(cache: UnitCache, rows: np.ndarray, calib, sample_idx: np.ndarray, device) -> tuple[list, dict]:
    """Positional and keyword arguments of the unit for cached rows ``rows``."""
    cond = calib.get(sample_idx[rows], device)[2] if cache.cond_refs else {}

    def value(name: str):
        if name in cache.cond_refs:
            return cond[cache.cond_refs[name]]
        if name in cache.slots:
            return cache.read(name, rows, device)
        return cache.constants.get(name)

    args = [value(n) for n in cache.arg_names]
    kwargs = {n[3:]: value(n) for n in (f"kw_{k}" for k in cache.kwarg_names)}
    return args, kwargs


def uses_timesteps(unit: nn.Module) -> bool:
    """Whether the unit holds timestep-aware quantizers (which need :func:`row_timesteps` around its calls)."""
    from qdiff.quant.timegroups import TimestepQuantizer

    return any(isinstance(m, TimestepQuantizer) for m in unit.modules())


def row_timesteps(needed: bool, calib, sample_idx: np.ndarray, rows: np.ndarray):
    """A context giving a unit's timestep-aware quantizers the timesteps of cached rows (a no-op if not ``needed``)."""
    from contextlib import nullcontext

    from qdiff.quant.timegroups import timesteps

    return timesteps(calib.get(sample_idx[rows], "cpu")[1]) if needed else nullcontext()
