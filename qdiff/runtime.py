"""Process-level concerns of a run: seeding, per-stage time and memory, and CPU allocator tuning.

Allocator: tuned for many short-lived, tens-of-MB activation tensors.

glibc's malloc serves allocations above its mmap threshold with fresh mmap()s and returns freed memory
at the top of the heap to the OS. A sampler that allocates and frees ~10-30 MB activations hundreds of
times per step then spends its time in page faults: on the digits model, 2 cores, DDIM sampling ran 15%
slower and took 8x more minor page faults (1.9 M vs 0.24 M for 256 samples x 10 steps). Raising both
thresholds keeps that memory in the process for reuse; peak memory is unchanged.
Set ``QDIFF_MALLOC_TUNING=0`` to leave the allocator alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import torch

log = logging.getLogger("qdiff")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20   # glibc's upper limit for this setting on 64-bit systems
TRIM_THRESHOLD = 1 << 30
_done: bool | None = None


def tune_allocator() -> bool:
    """Apply the thresholds once per process (glibc on Linux only); returns whether they are in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux") or os.environ.get("QDIFF_MALLOC_TUNING", "1") == "0":
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return _done
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc tuning %s", "on" if _done else "refused by libc")
    return _done


def deterministic_kernels(on: bool = True) -> None:
    """Deterministic GPU kernels: the same inputs give the same bits on every call. On a GPU some default kernels
    are not (found on an H200: cuDNN's ConvTranspose2d forward changed in the last bit between two identical calls, so
    a model and its re-loaded artifact differed); CPU kernels already are. Costs some GPU speed; ops with no
    deterministic kernel warn instead of failing."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS needs it before its first call
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on, warn_only=True)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Stages:
    """Wall time and peak memory of each pipeline stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self.peak_gpu_mb: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        log.info("stage %s ...", name)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        self.peak_rss_mb[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if self.device.type == "cuda":
            self.peak_gpu_mb[name] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        log.info("stage %s done in %.1f s", name, self.seconds[name])

    def split(self, name: str, parts: dict[str, float]) -> None:
        """Report stage ``name`` as ``parts`` (e.g. quantize = wrapping + reconstruction, timed by the API)."""
        rest = self.seconds.pop(name) - sum(parts.values())
        peaks = [(d, d.pop(name)) for d in (self.peak_rss_mb, self.peak_gpu_mb) if name in d]
        for i, (k, v) in enumerate(parts.items()):
            self.seconds[k] = round(v + (rest if i == 0 else 0.0), 2)  # the API's untimed remainder goes to the first
            for d, peak in peaks:
                d[k] = peak

    def summary(self) -> dict:
        out = {"seconds": dict(self.seconds), "total_seconds": round(sum(self.seconds.values()), 2),
               "peak_rss_mb": max(self.peak_rss_mb.values(), default=0.0), "peak_rss_mb_by_stage": dict(self.peak_rss_mb)}
        if self.peak_gpu_mb:
            out["peak_gpu_mb"] = max(self.peak_gpu_mb.values())
            out["peak_gpu_mb_by_stage"] = dict(self.peak_gpu_mb)
        return out


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA), so wall-clock times measure it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_ms(calls: dict, rounds: int, device: torch.device | str = "cpu", warmup: int = 1) -> dict[str, list[float]]:
    """Milliseconds of each named call, ``rounds`` times each, in a rotating order (no call is always first, so
    drift and caches hit all alike), the device synchronised around every call; ``warmup`` untimed calls each
    first (compiles). The one timing helper of the deploy stage and every benchmark: compare the medians."""
    names = list(calls)
    for k in names:
        for _ in range(warmup):
            calls[k]()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            calls[k]()
            sync(device)  # a GPU call returns before its kernels finish
            times[k].append(1e3 * (time.perf_counter() - t0))
    return times


def medians(times: dict[str, list[float]], digits: int = 3) -> dict[str, float]:
    """The median of each name's times."""
    import statistics

    return {k: round(statistics.median(v), digits) for k, v in times.items()}
