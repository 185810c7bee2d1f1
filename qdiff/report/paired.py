"""Paired recovered shares: each quantized run against the round-to-nearest run of the same bits and sampling seed.

Every run saves the FID features of its samples and of its FP reference, with the real set's statistics
(``eval_features.safetensors``, see :mod:`qdiff.report.run`). The three sets of one sampling seed come from the same
noises, so the share of linear's FID gap a method closes, 1 - (FID_m - FID_fp) / (FID_lin - FID_fp), gets a paired
bootstrap interval: one resample of noise indices applied to all three sets (:func:`qdiff.eval.fidelity.
recovered_share`, seed 0, 200 resamples). No model runs here.

:func:`per_reconstruction` then summarises the sampling seeds of each reconstruction: mean share, each seed's
share with its interval, and the lowest interval bound — the form of the per-seed tables in ``docs/``.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pandas as pd

from qdiff.report.run import FEATURES_FILE

#: Resamples of the paired bootstrap (and its seed), as every per-seed table in docs/ uses.
N_BOOT, BOOT_SEED = 200, 0


def load_features(run_dir: str | Path) -> dict | None:
    """(samples' features, FP reference's features, real statistics) of one run, or None when it saved none.
    A report pairs each linear run with every method of its bits and seed: the file is read once while it is
    unchanged (cached by path, size and modification time; the result is shared, treat it as read-only)."""
    f = Path(run_dir).resolve() / FEATURES_FILE
    if not f.is_file():
        return None
    st = f.stat()
    return _read_features(str(f), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=16)  # a grid has one linear run per bits and seed (files: digits ~3 MB, InceptionV3 ~35 MB)
def _read_features(path: str, size: int, mtime_ns: int) -> dict | None:
    from qdiff.io import load_state_dict_file

    t = load_state_dict_file(path)
    if "features.samples" not in t or "real.mu" not in t:
        return None
    return {"samples": t["features.samples"], "fp": t.get("features.fp"),
            "real": {"mu": t["real.mu"].numpy(), "sigma": t["real.sigma"].numpy()}}


def paired_share(method_dir: str, linear_dir: str, n_boot: int = N_BOOT) -> dict | None:
    """:func:`recovered_share` of a run against its linear baseline from their saved features, or None when
    either lacks them or they are not paired (different sizes, or a different real set)."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from qdiff.eval.fidelity import recovered_share

    m, lin = load_features(method_dir), load_features(linear_dir)
    if m is None or lin is None or m["fp"] is None or not len(m["samples"]) == len(lin["samples"]) == len(m["fp"]):
        return None
    if not (np.array_equal(m["real"]["mu"], lin["real"]["mu"]) and np.array_equal(m["real"]["sigma"], lin["real"]["sigma"])):
        return None
    # One BLAS thread: 3 x 201 FIDs of small (digits: 128 x 128) matrices gain nothing from threads, and a threaded
    # OpenBLAS spin-waits when the cores are busy: beside a 2-thread run on 2 cores, a 12-run report took > 10 min
    # with 2 BLAS threads (stopped) and 45 s with one (AMD EPYC Zen 4).
    with threadpool_limits(limits=1, user_api="blas"):
        return recovered_share(m["samples"], lin["samples"], m["fp"], m["real"], n_boot, BOOT_SEED)


def per_reconstruction(table: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Rows with a paired share, grouped over sampling seeds: one row per method, bits and every other setting
    (the reconstruction seed included), with FIDs averaged, the mean share, each seed's share [interval] and the
    lowest interval bound."""
    t = table[table["recovered"].notna() & table["rec_lo"].notna()]
    if not len(t):
        return pd.DataFrame()
    keys = [k for k in ["model", "method", "bits", *[a for a in axes if a not in ("model", "seed")]] if k in t.columns]
    out = []
    for key, g in t.groupby(keys, dropna=False, sort=False):
        g = g.sort_values("seed")
        out.append({
            **dict(zip(keys, key)), "seeds": " ".join(str(int(s)) for s in g["seed"]),
            "fp_fid": g["fp_fid"].mean(), "linear_fid": g["linear_fid"].mean(), "fid": g["fid"].mean(),
            "recovered": g["recovered"].mean(), "lowest_ci95": g["rec_lo"].min(),
            "per_seed": " ".join(f"{r:.3f} [{lo:.3f}, {hi:.3f}]" for r, lo, hi in zip(g["recovered"], g["rec_lo"], g["rec_hi"])),
            "recon_seconds": g["recon_seconds"].max(),
        })
    return pd.DataFrame(out)
