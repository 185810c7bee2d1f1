"""Timestep-aware calibration data (paper §3.2, Algorithm 1), collected once and cached on disk.

The FP sampler runs for T steps; the inputs of the kept steps (x_t, t and the conditioning, including
the unconditional branch of classifier-free guidance) are written into ``.npy`` files as they are
produced and read back memory-mapped, so neither collection nor later use holds the whole set in RAM.
A set is keyed by everything that determines it and reused by any run with the same key.

The conditioning is any dict of per-trajectory tensors (``model(x_t, t, **cond)``): a text-guided model's
prompt embeddings (:class:`PromptConditioning`) or tensors given by the caller
(:func:`qdiff.calib.calibration_data`). Each key is one ``.npy`` per branch; ``encoder_hidden_states`` keeps
the first format's file names (``cond.npy``, ``uncond.npy``), so sets collected before stay valid.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from qdiff.cache import Entry
from qdiff.calib.checks import conditioning_broken, diverges, sampler_diverged
from qdiff.calib.config import CalibConfig
from qdiff.finite import ABSURD_X, max_abs
from qdiff.io import NpyRowWriter, read_rows, write_json
from qdiff.models.base import DiffusionModel, fingerprint
from qdiff.sampling.config import SamplerConfig
from qdiff.sampling.samplers import Trajectory, batch_generator, initial_noise, prompt_conditioning

log = logging.getLogger("qdiff")

#: Bumped when what a stored set holds changes, so that older cache entries are not misread.
FORMAT = 2
#: The text-guided models' conditioning key (stored under the first format's file names).
TEXT_KEY = "encoder_hidden_states"


def cond_file(key: str, branch: str) -> str:
    """File of conditioning ``key`` for ``branch`` ("cond" or "uncond") inside a stored set."""
    return f"{branch}.npy" if key == TEXT_KEY else f"{branch}.{key}.npy"


class CalibrationSet:
    """N stored model inputs; with CFG every entry is used twice (conditional and unconditional)."""

    #: The temporary folder holding a set made without a cache folder (removed with the set), else None.
    tmpdir: object | None = None

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.meta = json.loads((self.root / "meta.json").read_text())
        self.x = np.load(self.root / "x.npy", mmap_mode="r")
        self.t = np.load(self.root / "t.npy")
        self.step = np.load(self.root / "step.npy")
        layout = self.meta.get("cond", _first_format_layout(self.root))
        #: Per key: stored rows [n_entries, ...] of the conditional branch, and the dtype the model gets.
        self.conds = {k: np.load(self.root / cond_file(k, "cond"), mmap_mode="r") for k in layout}
        self.cond_dtypes = {k: getattr(torch, v["dtype"]) for k, v in layout.items()}
        #: Per key: the unconditional branch, one shared row [1, ...] or one row per entry; None without CFG.
        self.uncond_kind = {k: v["uncond"] for k, v in layout.items() if v["uncond"]}
        unconds = {k: np.load(self.root / cond_file(k, "uncond"), mmap_mode=None if kind == "shared" else "r")
                   for k, kind in self.uncond_kind.items()}
        self.unconds = unconds or None

    def __reduce__(self):
        """Pickled as its folder (a parallel reconstruction's jobs reopen it; memory maps are not copied, and a set in a
        temporary folder is never removed by a copy)."""
        return CalibrationSet, (self.root,)

    @property
    def cond(self) -> np.ndarray | None:
        """The text conditioning rows (``encoder_hidden_states``) of a text-guided set, else None."""
        return self.conds.get(TEXT_KEY)

    @property
    def uncond(self) -> np.ndarray | None:
        """The unconditional branch of the text conditioning, else None."""
        return None if self.unconds is None else self.unconds.get(TEXT_KEY)

    @property
    def n_entries(self) -> int:
        return int(self.x.shape[0])

    def __len__(self) -> int:
        """Model inputs: entries, doubled when the unconditional branch is stored too."""
        return self.n_entries * (2 if self.unconds is not None else 1)

    def _uncond_rows(self, key: str, entry: np.ndarray) -> torch.Tensor:
        u = self.unconds[key]
        return torch.from_numpy(u if self.uncond_kind[key] == "shared" else read_rows(u, entry))

    def get(self, idx: Sequence[int], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Batch (x, t, cond) for input indices ``idx`` (indices >= n_entries are the unconditional branch)."""
        idx = np.asarray(idx, dtype=np.int64)
        entry = idx % self.n_entries
        x = torch.from_numpy(read_rows(self.x, entry))
        t = torch.from_numpy(self.t[entry])
        cond: dict = {}
        for k, rows in self.conds.items():
            c = torch.from_numpy(read_rows(rows, entry))
            if self.unconds is not None:
                is_u = torch.from_numpy(idx >= self.n_entries).view(-1, *[1] * (c.dim() - 1))
                c = torch.where(is_u, self._uncond_rows(k, entry).expand_as(c), c)
            cond[k] = c.to(self.cond_dtypes[k]).to(device)
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

        Same noise, conditioning, sampler and T as the collection (all in ``meta``), so an FP and a quantized
        UNet can be compared on whole sampling runs (the output bias match's probe).
        """
        m = self.meta
        n = min(n, m["n_trajectories"])
        device = next(unet.parameters()).device
        noise = initial_noise(m["sample_shape"], m["n_trajectories"], m["calib"]["seed"])[:n]
        cond = uncond = None
        if self.conds:  # trajectory j's conditioning is row j (the first kept step)
            first = np.arange(n)
            cond = {k: torch.from_numpy(read_rows(a, first)).to(self.cond_dtypes[k]).to(device)
                    for k, a in self.conds.items()}
            if self.unconds is not None:
                uncond = {k: self._uncond_rows(k, first).to(self.cond_dtypes[k]).to(device).expand_as(cond[k])
                          for k in self.unconds}
        traj = Trajectory(m["scheduler_config"], m["guidance"], unet, SamplerConfig(**m["sampler"]), noise.to(device),
                          cond, uncond, batch_generator(m["calib"]["seed"], 0))
        for _ in traj:
            pass
        return traj.x.float().cpu()


def _first_format_layout(root: Path) -> dict:
    """The conditioning layout of a set written before ``meta["cond"]`` existed (text conditioning only)."""
    if not (root / "cond.npy").exists():
        return {}
    return {TEXT_KEY: {"dtype": "float32", "uncond": "shared" if (root / "uncond.npy").exists() else None}}


class Conditioning(Protocol):
    """Where a collection's conditioning comes from: ``batch(start, end, device) -> (cond, uncond)`` per batch
    of trajectories; ``guidance`` is the CFG strength; ``shared_uncond``: the unconditional branch is one row."""

    guidance: float
    shared_uncond: bool

    def batch(self, start: int, end: int, device) -> tuple[dict | None, dict | None]: ...


class PromptConditioning:
    """A text-guided :class:`DiffusionModel`'s prompts through its encoder (the empty prompt as the unconditional
    branch), a class-conditional one's labels (the null class as the unconditional branch), nothing for
    unconditional models."""

    shared_uncond = True

    def __init__(self, model: DiffusionModel, prompts: Sequence | None, n_traj: int) -> None:
        if model.is_conditional and (prompts is None or len(prompts) < n_traj):
            raise ValueError(f"{model.name}: calibration needs {n_traj} prompts or class labels")
        self.model, self.prompts = model, list(prompts) if prompts is not None else None
        self.guidance = model.guidance_scale if model.is_conditional else 1.0
        # with guidance 1 the unconditional branch is never used by the sampler, so it is not stored either
        self.uses_uncond = model.is_conditional and self.guidance != 1.0

    def batch(self, start: int, end: int, device) -> tuple[dict | None, dict | None]:
        cond, uncond = prompt_conditioning(self.model, self.prompts[start:end] if self.prompts else [], device)
        return cond, uncond if self.uses_uncond or self.model.is_text_guided else None


class _CondWriter:
    """Conditioning rows written beside ``x`` as they are produced; ``layout`` (per key: dtype, uncond) goes
    into meta.json."""

    def __init__(self, root: Path, n_rows: int, shared_uncond: bool) -> None:
        self.root, self.n_rows, self.shared = root, n_rows, shared_uncond
        self.writers: dict[tuple[str, str], NpyRowWriter] | None = None
        self.layout: dict[str, dict] = {}

    def _open(self, cond: dict, uncond: dict | None) -> None:
        self.writers = {}
        for k, v in cond.items():
            self.writers["cond", k] = NpyRowWriter(self.root / cond_file(k, "cond"), (self.n_rows, *v.shape[1:]))
            self.layout[k] = {"dtype": str(v.dtype).removeprefix("torch."), "uncond": None}
            if uncond is None:
                continue
            if self.shared:
                np.save(self.root / cond_file(k, "uncond"), uncond[k][:1].float().cpu().numpy())
            else:
                self.writers["uncond", k] = NpyRowWriter(self.root / cond_file(k, "uncond"),
                                                         (self.n_rows, *v.shape[1:]))
            self.layout[k]["uncond"] = "shared" if self.shared else "rows"

    def write(self, rows: slice, cond: dict | None, uncond: dict | None) -> None:
        if cond is None:
            return
        if self.writers is None:
            self._open(cond, uncond)
        for (branch, k), w in self.writers.items():
            w.write(rows, (cond if branch == "cond" else uncond)[k].float().cpu().numpy())

    def close(self) -> None:
        for w in (self.writers or {}).values():
            w.close()


def calibration_ident(model: DiffusionModel, sampler: SamplerConfig, calib: CalibConfig, prompts: Sequence[str] | None) -> dict:
    """Everything that determines a calibration set (its cache key hashes this)."""
    return {
        "format": FORMAT, "model": model.name, "weights": model.meta.get("fingerprint") or fingerprint(model.unet),
        "sampler": sampler.name, "eta": sampler.eta, "T": calib.T, "c": calib.c, "n": calib.n,
        "mode": calib.mode, "seed": calib.seed, "guidance": model.guidance_scale if model.is_conditional else None,
        "prompts": hashlib.sha256("\n".join(map(str, prompts)).encode()).hexdigest() if prompts else None,
        "scheduler": model.scheduler_config,
    }


def collect_calibration(model: DiffusionModel, sampler: SamplerConfig, calib: CalibConfig, cache_dir: Path,
                        device: torch.device | str = "cpu", prompts: Sequence[str] | None = None,
                        progress: bool = True) -> tuple[CalibrationSet, bool]:
    """The calibration set for these settings, from the cache or freshly collected; returns (set, cache_hit).

    Concurrent jobs of a sweep share the cache: one collects while the others wait, then reuse it.
    """
    calib.checked()
    conditioning = PromptConditioning(model, prompts, calib.n_trajectories)
    entry = Entry(cache_dir, "calib", calibration_ident(model, sampler, calib, prompts))
    return cached_collection(entry, model, sampler, calib, conditioning, device, progress)


def cached_collection(entry: Entry, model: DiffusionModel, sampler: SamplerConfig, calib: CalibConfig,
                      conditioning: Conditioning, device, progress: bool) -> tuple[CalibrationSet, bool]:
    """The set at ``entry`` when complete, else collected into it (under the entry's lock); (set, cache_hit)."""
    with entry.locked("calibration data"):
        if calib.cache and (entry.path / "COMPLETE").exists():
            return CalibrationSet(entry.path), True
        if entry.path.exists():
            shutil.rmtree(entry.path)  # an interrupted collection, or caching off: start over
        try:
            _collect(model, sampler, calib, entry, device, conditioning, progress)
        except BaseException:
            shutil.rmtree(entry.path, ignore_errors=True)  # never leave a partial set (diverged, killed, disk full)
            raise
    return CalibrationSet(entry.path), False


@torch.no_grad()
def _collect(model: DiffusionModel, sampler: SamplerConfig, calib: CalibConfig, entry: Entry, device,
             conditioning: Conditioning, progress: bool) -> None:
    """Run the FP sampler for T steps and write the inputs of the kept steps (Algorithm 1) into ``entry``."""
    root = entry.path
    root.mkdir(parents=True)
    csampler = replace(sampler, steps=calib.T)
    T, c, n = calib.T, calib.c, calib.n
    if calib.mode == "uniform":
        kept = [i for i in range(T) if (T - i) % c == 0]    # timestep numbers t = T..1 with t % c == 0
    else:
        kept = [T - 1] if calib.mode == "t0" else [0]
    n_traj = calib.n_trajectories
    N = n_traj * len(kept)
    kept_pos = {s: k for k, s in enumerate(kept)}
    x_out = NpyRowWriter(root / "x.npy", (N, *model.sample_shape))
    t_arr = np.zeros(N, dtype=np.int64)
    step_arr = np.zeros(N, dtype=np.int64)
    cond_out = _CondWriter(root, N, conditioning.shared_uncond)
    noise = initial_noise(model.sample_shape, n_traj, calib.seed)
    peak = (0.0, 0)  # the largest |x_t| seen and its step: a diverging sampler grows it before it overflows
    bar = tqdm(total=n_traj, desc=f"calibration data ({calib.mode}, T={T}, c={c}, n={n})", unit="traj", disable=not progress)
    for start in range(0, n_traj, calib.batch_size):
        end = min(n_traj, start + calib.batch_size)
        cond, uncond = conditioning.batch(start, end, device)
        conditioning_broken(cond, uncond, start)
        traj = Trajectory(model.scheduler_config, conditioning.guidance, model.unet, csampler, noise[start:end].to(device),
                          cond, uncond, batch_generator(calib.seed, start))
        for step in traj:
            sampler_diverged(step, start, T, peak, model.scheduler_config)
            peak = max(peak, (max_abs(step.x_in), step.index))
            if step.index not in kept_pos:
                continue
            rows = slice(kept_pos[step.index] * n_traj + start, kept_pos[step.index] * n_traj + end)
            x_out.write(rows, step.x_in.float().cpu().numpy())
            t_arr[rows] = step.t.cpu().numpy()
            step_arr[rows] = step.index
            cond_out.write(rows, cond, uncond)
            if step.index == kept[-1]:
                break
        bar.update(end - start)
    bar.close()
    x_out.close()
    cond_out.close()
    if peak[0] > ABSURD_X:
        log.warning("calibration data: |x_t| reached %.3g at step %d of %d, far beyond what a diffusion sampler makes "
                    "from unit-variance noise and data (a few units); probably %s", peak[0], peak[1] + 1, T,
                    diverges(model.scheduler_config))
    np.save(root / "t.npy", t_arr)
    np.save(root / "step.npy", step_arr)
    write_json(root / "meta.json", {
        "key": entry.key, "ident": entry.ident, "calib": asdict(calib), "sampler": asdict(csampler), "model": model.name,
        "N": N, "kept_steps": kept, "text_guided": model.is_text_guided, "n_trajectories": n_traj,
        "sample_shape": list(model.sample_shape), "scheduler_config": model.scheduler_config,
        "guidance": conditioning.guidance, "cond": cond_out.layout})
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
