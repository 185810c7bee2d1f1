"""Peak memory of calibration-data collection as the set grows (the paper's N = n * T / c).

Calibration inputs are written into memory-mapped ``.npy`` files as the FP sampler produces them, so the
process's own memory should not grow with N. For each n (fixed T and c) a fresh subprocess builds a reduced
LDM-8 UNet with large latents (4 x 32 x 32 by default: 16 KiB per input), collects the set with
:func:`qdiff.calib.collect_calibration`, then streams the whole set back in batches (what reconstruction does),
and reports:

* ``anon_*``: peak anonymous memory above the baseline (RssAnon from /proc, sampled every 5 ms): the
  process's own allocations (tensors, arrays). Bounded means this stays flat as N grows.
* ``file_*``: peak file-backed resident pages (RssFile): pages of the memory-mapped set that are currently
  mapped. They are page cache, reclaimable by the kernel, and not a copy of the data.
* ``maxrss``: getrusage's peak RSS (anonymous + file-backed), what the pipeline's ``cost.peak_rss_mb`` shows.
* ``py_peak``: tracemalloc's peak of Python/NumPy allocations during collection.
* ``noise``: the starting noise of all n trajectories, drawn up front so that a trajectory's noise does not
  depend on the batch size: the one part of collection that grows with n (= N * c / T), not with N.

The forward passes' activations scale with ``--batch-size`` (calib.batch_size), which is therefore fixed
across rows (64 by default, so that the smallest n fills a batch too).

    python experiments/benchmarks/bench_calib_memory.py [--n 64 256 1024 4096] [--T 4] [--c 1] [--size 32]
                                             [--batch-size 64] [--out outputs/bench/calib_memory]

Prints a Markdown table and writes ``results.json`` to ``--out``. Uses one CPU thread per child.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, print_table, write_json

MB = 2 ** 20


def _status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0])
    return out


class _Sampler(threading.Thread):
    """Peak RssAnon / RssFile / VmRSS of this process, sampled every ``period`` seconds."""

    def __init__(self, period: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.period, self.stop, self.peak = period, threading.Event(), {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}

    def run(self) -> None:
        while not self.stop.is_set():
            for k, v in _status_kb().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self.period)

    def finish(self) -> dict[str, int]:
        self.stop.set()
        self.join()
        for k, v in _status_kb().items():
            self.peak[k] = max(self.peak[k], v)
        return self.peak


def child(n: int, T: int, c: int, size: int, batch_size: int, work: Path) -> dict:
    """One measurement in this (fresh) process."""
    import resource
    import tracemalloc

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from qdiff.calib import CalibConfig, collect_calibration
    from qdiff.models import ModelConfig, load_model
    from qdiff.sampling import SamplerConfig

    arch = dict(block_out_channels=[32, 32], layers_per_block=1, sample_size=size,
                down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                vae_block_out_channels=[32, 32], vae_down_block_types=["DownEncoderBlock2D"] * 2,
                vae_up_block_types=["UpDecoderBlock2D"] * 2, vae_layers_per_block=1)
    torch.manual_seed(0)
    model = load_model(ModelConfig(name="ldm_church", random_init=True, arch=arch))
    sampler = SamplerConfig(name="ddim", steps=T)
    cfg = CalibConfig(T=T, c=c, n=n, batch_size=batch_size, cache=False)
    with torch.no_grad():  # warm up kernels and allocator before the baseline
        model.unet(torch.randn(min(batch_size, n), *model.sample_shape), torch.full((min(batch_size, n),), 500))
    base = _status_kb()

    sampler_thread = _Sampler()
    sampler_thread.start()
    tracemalloc.start()
    t0 = time.perf_counter()
    calib, _ = collect_calibration(model, sampler, cfg, work, progress=False)
    seconds = time.perf_counter() - t0
    py_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    collect_peak = sampler_thread.finish()
    collect_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    read_thread = _Sampler()
    read_thread.start()
    t0 = time.perf_counter()
    total = 0.0
    for x, _, _ in calib.batches(batch_size):
        total += float(x.sum())
    read_seconds = time.perf_counter() - t0
    read_peak = read_thread.finish()

    disk = sum(f.stat().st_size for f in calib.root.iterdir())
    return {
        "n": n, "T": T, "c": c, "N": len(calib), "entry_kib": int(np.prod(model.sample_shape)) * 4 / 1024,
        "noise_mb": n * int(np.prod(model.sample_shape)) * 4 / MB,
        "disk_mb": disk / MB, "collect_s": seconds, "read_s": read_seconds,
        "base_rss_mb": base["VmRSS"] / 1024,
        "anon_collect_mb": (collect_peak["RssAnon"] - base["RssAnon"]) / 1024,
        "file_collect_mb": (collect_peak["RssFile"] - base["RssFile"]) / 1024,
        "anon_read_mb": (read_peak["RssAnon"] - base["RssAnon"]) / 1024,
        "file_read_mb": (read_peak["RssFile"] - base["RssFile"]) / 1024,
        "maxrss_mb": collect_maxrss / 1024, "py_peak_mb": py_peak / MB, "checksum": total,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[64, 256, 1024, 4096], help="inputs per kept step")
    p.add_argument("--T", type=int, default=4, help="denoising steps of the calibration sampler")
    p.add_argument("--c", type=int, default=1, help="keep every c-th step")
    p.add_argument("--size", type=int, default=32, help="latent side (latents are 4 x size x size)")
    p.add_argument("--batch-size", type=int, default=64, help="calib.batch_size (trajectories denoised together)")
    p.add_argument("--work", type=Path, default=None, help="where the sets are written (default: a temp dir, removed)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "calib_memory")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child is not None:
        print(json.dumps(child(args.child, args.T, args.c, args.size, args.batch_size, args.work)))
        return

    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for n in args.n:
        work = Path(tempfile.mkdtemp(prefix="calib_mem_", dir=args.work))
        try:
            cmd = [sys.executable, __file__, "--child", str(n), "--T", str(args.T), "--c", str(args.c),
                   "--size", str(args.size), "--batch-size", str(args.batch_size), "--work", str(work)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if r.returncode != 0:
                sys.exit(f"child n={n} failed:\n{r.stderr[-3000:]}")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"n={n}: N={rows[-1]['N']}, {rows[-1]['disk_mb']:.0f} MB on disk, "
                  f"anon +{rows[-1]['anon_collect_mb']:.0f} MB", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    cols = ["n", "N", "disk_mb", "collect_s", "noise_mb", "anon_collect_mb", "file_collect_mb", "maxrss_mb", "py_peak_mb",
            "anon_read_mb", "file_read_mb", "read_s"]
    table = print_table(rows, cols, f"Calibration-data collection, reduced LDM-8 UNet, latents 4x{args.size}x{args.size} "
                                    f"({rows[0]['entry_kib']:.0f} KiB/input), T={args.T}, c={args.c}, "
                                    f"calib.batch_size={args.batch_size}; memory above a post-load baseline")
    growth = rows[-1]["disk_mb"] / max(rows[0]["disk_mb"], 1e-9)
    anon = [r["anon_collect_mb"] for r in rows]
    summary = {"set_growth_x": growth, "anon_collect_mb_min": min(anon), "anon_collect_mb_max": max(anon)}
    print(f"set size grew {growth:.0f}x; anonymous memory during collection stayed within "
          f"{min(anon):.0f}-{max(anon):.0f} MB above baseline", flush=True)
    write_json(args.out / "results.json", {"rows": rows, "table": table, "summary": summary,
                                           "settings": {k: v for k, v in vars(args).items() if k != "child"}})


if __name__ == "__main__":
    main()
