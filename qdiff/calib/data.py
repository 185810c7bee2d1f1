"""Timestep-aware calibration data (paper §3.2, Algorithm 1), collected once and cached on disk.

The FP sampler runs for T steps; the inputs of the kept steps (x_t, t and the conditioning, including
the unconditional branch of classifier-free guidance) are written into ``.npy`` files as they are
produced and read back memory-mapped, so neither collection nor later use holds the whole set in RAM.
A set is keyed by everything that determines it and reused by any run with the same key.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from qdiff.cache import Entry
from qdiff.calib.config import CalibConfig
from qdiff.errors import ConfigError
from qdiff.io import NpyRowWriter, read_rows, write_json
from qdiff.models.base import DiffusionModel, fingerprint
from qdiff.sampling.config import SamplerConfig
from qdiff.sampling.samplers import Trajectory, batch_generator, initial_noise, prompt_conditioning

#: Bumped when what a stored set holds changes, so that older cache entries are not misread.
FORMAT = 2


class CalibrationSet:
    """N stored model inputs; with CFG every entry is used twice (conditional and unconditional)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.meta = json.loads((self.root / "meta.json").read_text())
        self.x = np.load(self.root / "x.npy", mmap_mode="r")
        self.t = np.load(self.root / "t.npy")
        self.step = np.load(self.root / "step.npy")
        self.cond = np.load(self.root / "cond.npy", mmap_mode="r") if (self.root / "cond.npy").exists() else None
        self.uncond = np.load(self.root / "uncond.npy") if (self.root / "uncond.npy").exists() else None

    @property
    def n_entries(self) -> int:
        return int(self.x.shape[0])

    def __len__(self) -> int:
        """Model inputs: entries, doubled when the unconditional branch is stored too."""
        return self.n_entries * (2 if self.uncond is not None else 1)

    def get(self, idx: Sequence[int], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Batch (x, t, cond) for input indices ``idx`` (indices >= n_entries are the unconditional branch)."""
        idx = np.asarray(idx, dtype=np.int64)
        entry = idx % self.n_entries
        x = torch.from_numpy(read_rows(self.x, entry))
        t = torch.from_numpy(self.t[entry])
        cond: dict = {}
        if self.cond is not None:
            c = torch.from_numpy(read_rows(self.cond, entry))
            if self.uncond is not None:
                is_u = torch.from_numpy(idx >= self.n_entries)
                c = torch.where(is_u[:, None, None], torch.from_numpy(self.uncond).expand_as(c), c)
            cond = {"encoder_hidden_states": c.to(device)}
        return x.to(device), t.to(device), cond

    def batches(self, batch_size: int, indices: Sequence[int] | None = None,
                device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        idx = np.arange(len(self)) if indices is None else np.asarray(indices)
        for i in range(0, len(idx), batch_size):
            yield self.get(idx[i:i + batch_size], device)

    def timesteps(self) -> np.ndarray:
        return np.unique(self.t)

    @torch.no_grad()
    def final_latents(self, unet: torch.nn.Module, n: int) -> torch.Tensor:
        """Final samples of the first ``n`` calibration trajectories, replayed to the end with ``unet``.

        Same noise, prompts, sampler and T as the collection (all in ``meta``), so an FP and a quantized
        UNet can be compared on whole sampling runs (the output bias match's probe).
        """
        m = self.meta
        n = min(n, m["n_trajectories"])
        device = next(unet.parameters()).device
        noise = initial_noise(m["sample_shape"], m["n_trajectories"], m["calib"]["seed"])[:n]
        cond = uncond = None
        if self.cond is not None:  # trajectory j's conditioning is row j (the first kept step)
            c = torch.from_numpy(np.ascontiguousarray(self.cond[:n])).to(device)
            cond = {"encoder_hidden_states": c}
            uncond = {"encoder_hidden_states": torch.from_numpy(self.uncond).to(device).expand_as(c)}
        traj = Trajectory(m["scheduler_config"], m["guidance"], unet, SamplerConfig(**m["sampler"]), noise.to(device),
                          cond, uncond, batch_generator(m["calib"]["seed"], 0))
        for _ in traj:
            pass
        return traj.x.float().cpu()


def calibration_ident(model: DiffusionModel, sampler: SamplerConfig, calib: CalibConfig, prompts: Sequence[str] | None) -> dict:
    """Everything that determines a calibration set (its cache key hashes this)."""
    return {
        "format": FORMAT, "model": model.name, "weights": model.meta.get("fingerprint") or fingerprint(model.unet),
        "sampler": sampler.name, "eta": sampler.eta, "T": calib.T, "c": calib.c, "n": calib.n,
        "mode": calib.mode, "seed": calib.seed, "guidance": model.guidance_scale if model.is_text_guided else None,
        "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest() if prompts else None,
        "scheduler": model.scheduler_config,
    }


def collect_calibration(model: DiffusionModel, sampler: SamplerConfig, calib: CalibConfig, cache_dir: Path,
                        device: torch.device | str = "cpu", prompts: Sequence[str] | None = None,
                        progress: bool = True) -> tuple[CalibrationSet, bool]:
    """The calibration set for these settings, from the cache or freshly collected; returns (set, cache_hit).

    Concurrent jobs of a sweep share the cache: one collects while the others wait, then reuse it.
    """
    if calib.T is None:
        raise ConfigError("calib.T is not set: give it, or resolve it from the sampler's steps (CalibConfig.resolve)")
    if calib.c > calib.T:
        raise ConfigError(f"calib.c ({calib.c}) must be <= calib.T ({calib.T})")
    entry = Entry(cache_dir, "calib", calibration_ident(model, sampler, calib, prompts))
    with entry.locked("calibration data"):
        if calib.cache and (entry.path / "COMPLETE").exists():
            return CalibrationSet(entry.path), True
        if entry.path.exists():
            shutil.rmtree(entry.path)  # an interrupted collection, or caching off: start over
        _collect(model, sampler, calib, entry, device, prompts, progress)
    return CalibrationSet(entry.path), False


@torch.no_grad()
def _collect(model: DiffusionModel, sampler: SamplerConfig, calib: CalibConfig, entry: Entry, device,
             prompts: Sequence[str] | None, progress: bool) -> None:
    """Run the FP sampler for T steps and write the inputs of the kept steps (Algorithm 1) into ``entry``."""
    root = entry.path
    root.mkdir(parents=True)
    csampler = replace(sampler, steps=calib.T)
    T, c, n = calib.T, calib.c, calib.n
    if calib.mode == "uniform":
        kept = [i for i in range(T) if (T - i) % c == 0]    # timestep numbers t = T..1 with t % c == 0
        n_traj = n
    else:
        kept = [T - 1] if calib.mode == "t0" else [0]
        n_traj = calib.N
    N = n_traj * len(kept)
    kept_pos = {s: k for k, s in enumerate(kept)}
    x_out = NpyRowWriter(root / "x.npy", (N, *model.sample_shape))
    t_arr = np.zeros(N, dtype=np.int64)
    step_arr = np.zeros(N, dtype=np.int64)
    cond_out = None
    text_prompts = list(prompts) if prompts is not None else None
    if model.is_text_guided and (text_prompts is None or len(text_prompts) < n_traj):
        raise ValueError(f"{model.name}: calibration needs {n_traj} prompts")
    noise = initial_noise(model.sample_shape, n_traj, calib.seed)
    bar = tqdm(total=n_traj, desc=f"calibration data ({calib.mode}, T={T}, c={c}, n={n})", unit="traj", disable=not progress)
    for start in range(0, n_traj, calib.batch_size):
        end = min(n_traj, start + calib.batch_size)
        cond, uncond = prompt_conditioning(model, text_prompts[start:end] if text_prompts else [], device)
        if cond is not None and cond_out is None:
            e = cond["encoder_hidden_states"]
            cond_out = NpyRowWriter(root / "cond.npy", (N, *e.shape[1:]))
            np.save(root / "uncond.npy", uncond["encoder_hidden_states"][:1].float().cpu().numpy())
        traj = Trajectory(model.scheduler_config, model.guidance_scale, model.unet, csampler, noise[start:end].to(device),
                          cond, uncond, batch_generator(calib.seed, start))
        for step in traj:
            if step.index not in kept_pos:
                continue
            rows = slice(kept_pos[step.index] * n_traj + start, kept_pos[step.index] * n_traj + end)
            x_out.write(rows, step.x_in.float().cpu().numpy())
            t_arr[rows] = step.t.cpu().numpy()
            step_arr[rows] = step.index
            if cond is not None:
                cond_out.write(rows, cond["encoder_hidden_states"].float().cpu().numpy())
            if step.index == kept[-1]:
                break
        bar.update(end - start)
    bar.close()
    x_out.close()
    if cond_out is not None:
        cond_out.close()
    np.save(root / "t.npy", t_arr)
    np.save(root / "step.npy", step_arr)
    write_json(root / "meta.json", {
        "key": entry.key, "ident": entry.ident, "calib": asdict(calib), "sampler": asdict(csampler), "model": model.name,
        "N": N, "kept_steps": kept, "text_guided": model.is_text_guided, "n_trajectories": n_traj,
        "sample_shape": list(model.sample_shape), "scheduler_config": model.scheduler_config,
        "guidance": model.guidance_scale if model.is_text_guided else 1.0})
    (root / "COMPLETE").write_text("ok\n")


class TensorCalibration:
    """In-memory calibration inputs with the :class:`CalibrationSet` interface (for the Python API/tests)."""

    def __init__(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> None:
        if x.shape[0] != t.shape[0]:
            raise ValueError(f"calibration x and t disagree on N: {x.shape[0]} vs {t.shape[0]}")
        self.x, self.t, self.cond = x.cpu(), t.cpu(), {k: v.cpu() for k, v in (cond or {}).items()}
        self.step = np.zeros(len(t), dtype=np.int64)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def get(self, idx: Sequence[int], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, dict]:
        i = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return self.x[i].to(device), self.t[i].to(device), {k: v[i].to(device) for k, v in self.cond.items()}

    def batches(self, batch_size: int, indices: Sequence[int] | None = None, device: torch.device | str = "cpu"):
        idx = np.arange(len(self)) if indices is None else np.asarray(indices)
        for s in range(0, len(idx), batch_size):
            yield self.get(idx[s:s + batch_size], device)

    def timesteps(self) -> np.ndarray:
        return np.unique(self.t.numpy())
