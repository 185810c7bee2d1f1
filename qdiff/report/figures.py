"""Report figures (matplotlib, Agg): FID vs weight bits, per-step MSE of every run, activation ranges, sample grids."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from qdiff.report.tables import AXIS_NAMES, METHOD_NAMES


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_label(r, axes: list[str]) -> str:
    """'Q-Diffusion W4A8 c=5 n=64' for a row of the paper table / job rows."""
    extra = " ".join(f"{AXIS_NAMES.get(c, c)}={r[c]}" for c in axes if c not in ("model",) and r.get(c) is not None
                     and not (isinstance(r.get(c), float) and math.isnan(r[c])))
    return " ".join(p for p in [METHOD_NAMES.get(r["method"], str(r["method"])), r.get("label") or "", extra] if p)


def fid_vs_bits(table: pd.DataFrame, path: Path) -> Path | None:
    """FID against weight bits, one line per method x activation bits (x other swept axes); FP dashed."""
    t = table[table["fid"].notna()]
    if t.empty:
        return None
    plt = _plt()
    axes = [c for c in table.columns if c in AXIS_NAMES and c != "model"]
    models = list(dict.fromkeys(t["model"].fillna("?")))
    fig, subplots = plt.subplots(1, len(models), figsize=(6.4 * len(models), 4.2), squeeze=False)
    for ax, model in zip(subplots[0], models):
        tm = t[t["model"].fillna("?") == model]
        for _, fp in tm[tm["method"] == "fp"].drop_duplicates("fid").iterrows():
            ax.axhline(fp["fid"], ls="--", color="k", lw=1, label=f"FP ({fp['fid']:.2f})")
        q = tm[tm["method"] != "fp"]
        for key, g in q.groupby(["method", "act_bits", *axes], dropna=False, sort=False):
            g = g.groupby("weight_bits", as_index=False)["fid"].mean().sort_values("weight_bits")
            r = dict(zip(["method", "act_bits", *axes], key))
            extra = " ".join(f"{AXIS_NAMES[c]}={r[c]}" for c in axes if pd.notna(r[c]))
            label = f"{METHOD_NAMES.get(r['method'], r['method'])} A{int(r['act_bits'])} {extra}".strip()
            ax.plot(g["weight_bits"], g["fid"], marker="o" if r["method"] == "qdiff" else "s",
                    ls="-" if r["method"] == "qdiff" else ":", label=label)
        bits = sorted(set(q["weight_bits"].dropna().astype(int)))
        if bits:
            ax.set_xscale("log", base=2)
            ax.set_xticks(bits)
            ax.set_xticklabels([str(b) for b in bits])
        if t["fid"].max() > 20 * max(t["fid"].min(), 1e-9):
            ax.set_yscale("log")
        ax.set_xlabel("weight bits")
        ax.set_ylabel("FID ↓")
        ax.set_title(f"{model}: FID vs weight bits")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def step_mse(rows: pd.DataFrame, root: Path, axes: list[str], path: Path) -> Path | None:
    """Per-step MSE (quantized vs FP noise prediction) of every run that recorded it, in one plot."""
    from qdiff.eval.analysis import plot_step_mse

    frames = {}
    for _, r in rows.iterrows():
        f = root / r["dir"] / "step_mse.csv"
        if r["state"] == "completed" and f.is_file():
            label = run_label(r, axes)
            if r.get("job") is not None and pd.notna(r.get("job")):
                label = f"#{int(r['job'])} {label}"
            frames[label] = pd.read_csv(f)
    if not frames:
        return None
    plot_step_mse(frames, path)
    return path


def act_ranges(rows: pd.DataFrame, root: Path, path: Path) -> Path | None:
    """FP activation ranges over timesteps (the same for every run of a model: taken from the first one)."""
    from qdiff.eval.analysis import plot_activation_ranges

    for _, r in rows.iterrows():
        f = root / r["dir"] / "act_ranges.csv"
        if f.is_file():
            plot_activation_ranges(pd.read_csv(f), path)
            return path
    return None


def sample_grids(rows: pd.DataFrame, root: Path, axes: list[str], path: Path, max_runs: int = 16) -> Path | None:
    """Every completed run's samples.png side by side, titled with method, bits and FID."""
    from matplotlib.image import imread

    items = [(r, root / r["dir"] / "samples.png") for _, r in rows.iterrows()
             if r["state"] == "completed" and (root / r["dir"] / "samples.png").is_file()][:max_runs]
    if not items:
        return None
    plt = _plt()
    cols = min(4, len(items))
    nrows = math.ceil(len(items) / cols)
    fig, grid = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.5 * nrows), squeeze=False)
    for ax in grid.flat:
        ax.axis("off")
    for ax, (r, f) in zip(grid.flat, items):
        img = imread(str(f))
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        fid = f"FID {r['fid']:.2f}" if pd.notna(r.get("fid")) else ""
        job = f"#{int(r['job'])} " if r.get("job") is not None and pd.notna(r.get("job")) else ""
        ax.set_title(f"{job}{run_label(r, axes)}\n{fid}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
