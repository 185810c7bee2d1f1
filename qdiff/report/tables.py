"""Paper-style tables from the job rows: method x bits (+ the axes a sweep varies), FP reference rows, cost."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from qdiff.quant.config import quant_label
from qdiff.report.paired import paired_share

METHOD_NAMES = {"fp": "Full precision", "linear": "Linear quant", "qdiff": "Q-Diffusion"}
METHOD_ORDER = {"fp": 0, "linear": 1, "qdiff": 2}
# Settings that define which FP reference a quantized run compares against.
CONTEXT = ["model", "sampler", "steps", "n_samples", "seed"]
# Settings an ablation may vary; a column appears in the table only when it takes more than one value.
AXES = ["model", "sampler", "steps", "n_samples", "seed", "calib_mode", "calib_c", "calib_n", "split", "transforms",
        "first_last_bits", "cond_bits", "attn_bits", "recon_seed", "input_source", "recon_precision"]
AXIS_NAMES = {"model": "Model", "sampler": "Sampler", "steps": "Steps", "n_samples": "Samples", "seed": "Seed",
              "calib_mode": "Calibration", "calib_c": "c", "calib_n": "n", "split": "Split", "transforms": "Transforms",
              "first_last_bits": "First/last bits", "cond_bits": "Cond bits", "attn_bits": "Attn bits", "recon_seed": "Recon seed",
              "input_source": "Recon inputs", "recon_precision": "Recon precision"}
#: Axes of the reconstruction only: a linear baseline has none, so a method's row is compared with linear across them.
RECON_AXES = ["recon_seed", "input_source", "recon_precision"]
NUMERIC = ["fid", "is", "is_std", "fp_fid", "fp_is", "fp_is_std", "recon_seconds", "total_seconds", "peak_rss_mb",
           "peak_gpu_mb", "resumed_steps", "step_mse_mean", "step_mse_last", "weight_bits", "act_bits", "restarts",
           "fid_lo", "fid_hi", "kid", "kid_std", "precision", "recall", "mse_vs_fp", "psnr_vs_fp"]


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Columns every later step may rely on, with numeric types and a bits label."""
    df = df.copy()
    for c in ["sweep", "job", "state", "detail", "overrides", "dir", "method", "label", "slurm_id", *AXES, *NUMERIC]:
        if c not in df:
            df[c] = None
    for c in NUMERIC:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df["transforms"] = df["transforms"].fillna("")  # runs from before the transforms: the paper's method
    df["recon_seed"] = pd.to_numeric(df["recon_seed"], errors="coerce").astype("Int64")
    df["job"] = pd.to_numeric(df["job"], errors="coerce").astype("Int64")

    def label(r) -> str:
        if isinstance(r["label"], str) and r["label"]:
            return r["label"]
        if r["method"] == "fp":
            return quant_label(32, 32)
        if pd.notna(r["weight_bits"]) and pd.notna(r["act_bits"]):
            return quant_label(int(r["weight_bits"]), int(r["act_bits"]))
        return "?"

    df["label"] = df.apply(label, axis=1) if len(df) else []
    return df


def varying_axes(df: pd.DataFrame) -> list[str]:
    return [c for c in AXES if df[c].astype(str).where(df[c].notna()).nunique(dropna=True) > 1]


def _bits(r) -> str:
    if r["method"] == "fp":
        return "32/32"
    w, a = r["weight_bits"], r["act_bits"]
    return f"{int(w)}/{int(a)}" if pd.notna(w) and pd.notna(a) else "?"


def paper_table(df: pd.DataFrame, root: str | Path = ".") -> pd.DataFrame:
    """One row per job plus an FP row per reference context; never drops a job (unfinished rows keep their state).
    ``root``: where the rows' ``dir`` (relative to it) are, for the paired shares from saved features."""
    df = normalise(df)
    axes = varying_axes(df)
    rows = df.to_dict("records")
    # FP reference rows from the quantized runs' "fp" fields, unless an explicit FP job covers that context.
    done = df[df["state"] == "completed"]
    explicit = {tuple(r[c] for c in CONTEXT) for r in rows if r["method"] == "fp" and r["state"] == "completed"}
    fp_rows = []
    quant_done = done[done["method"] != "fp"]
    if len(quant_done):
        for key, g in quant_done.groupby(CONTEXT, dropna=False, sort=False):
            if tuple(key) in explicit or g["fp_fid"].isna().all():
                continue
            first = g.iloc[0]
            fp_rows.append({**{c: first[c] for c in CONTEXT}, "method": "fp", "weight_bits": 32, "act_bits": 32,
                            "label": "W32A32", "fid": g["fp_fid"].mean(), "is": g["fp_is"].mean(),
                            "is_std": g["fp_is_std"].mean(), "fp_fid": g["fp_fid"].mean(), "state": "reference",
                            "detail": f"FP reference of {len(g)} run(s)", "sweep": first["sweep"], "job": pd.NA, "dir": ""})
    t = pd.DataFrame(rows + fp_rows)
    t["bits"] = t.apply(_bits, axis=1)
    t["fid_delta"] = t["fid"] - t["fp_fid"]
    t.loc[t["method"] == "fp", "fid_delta"] = float("nan")
    for c in ("recovered", "linear_fid", "rec_lo", "rec_hi"):
        t[c] = float("nan")
    others = [c for c in axes if c not in CONTEXT and c not in RECON_AXES] + CONTEXT
    lin = t[(t["method"] == "linear") & t["fid"].notna()]
    plain = t["transforms"].fillna("") == ""  # the paper's method (FP reference rows carry no transforms)
    for i, r in t[((t["method"] == "qdiff") | ((t["method"] == "linear") & ~plain)) & t["fid"].notna()
                  & t["fp_fid"].notna()].iterrows():
        m = lin[(lin["weight_bits"] == r["weight_bits"]) & (lin["act_bits"] == r["act_bits"])]
        for c in others:  # the share of the gap of linear without transforms (the baseline row), in the same context
            m = m[plain.loc[m.index]] if c == "transforms" else m[m[c].astype(str) == str(r[c])]
        if len(m):
            t.at[i, "linear_fid"] = m["fid"].mean()
            gap = m["fid"].mean() - r["fp_fid"]
            if gap <= 0:
                continue
            t.at[i, "recovered"] = (m["fid"].mean() - r["fid"]) / gap
            # from the saved features (linear copies of one setting are identical runs): the point and its interval
            dirs = r["dir"], m["dir"].iloc[0]
            pair = paired_share(Path(root) / dirs[0], Path(root) / dirs[1]) \
                if m["fid"].nunique() == 1 and all(isinstance(d, str) and d for d in dirs) else None
            if pair is not None:
                t.at[i, "recovered"] = pair["recovered"]
                t.at[i, "rec_lo"], t.at[i, "rec_hi"] = pair["recovered_ci95"]

    def order(r) -> tuple:
        return (_k(r["model"]), -_f(r["act_bits"]), -_f(r["weight_bits"]), *[_k(r[c]) for c in axes if c != "model"],
                METHOD_ORDER.get(r["method"], 9), _f(r["job"], -1))

    t = t.iloc[sorted(range(len(t)), key=lambda i: order(t.iloc[i]))]
    seed = [] if "seed" in axes else ["seed"]  # the sampling seed, even when one: the per-reconstruction summary's key
    cols = ["model", "method", "bits", "weight_bits", "act_bits", *[c for c in axes if c != "model"], *seed, "fid", "fid_lo",
            "fid_hi", "is", "is_std", "kid", "precision", "recall", "mse_vs_fp", "fp_fid", "fid_delta", "linear_fid", "recovered", "rec_lo", "rec_hi", "recon_seconds", "total_seconds", "peak_rss_mb", "state",
            "detail", "sweep", "job", "dir"]
    return t[cols].reset_index(drop=True)


def _f(v, default: float = 0.0) -> float:
    try:
        return default if v is None or v is pd.NA or pd.isna(v) else float(v)
    except (TypeError, ValueError):
        return default


def _k(v) -> tuple:
    """Sort key for mixed values: numbers by value, then strings, missing last."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return (2, 0.0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, str(v))


def _num(v, fmt: str = "{:.2f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return "—"
    return fmt.format(v)


def _axis_value(v) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def display_table(t: pd.DataFrame) -> pd.DataFrame:
    """The paper table with formatted strings (Markdown / HTML)."""
    # the sampling seed is kept in the data for the per-reconstruction summary; shown only when it varies
    axes = [c for c in t.columns if c in AXES and c != "model" and (c != "seed" or t[c].dropna().nunique() > 1)]
    out = pd.DataFrame({
        "Model": t["model"].fillna("?"),
        "Method": t["method"].map(lambda m: METHOD_NAMES.get(m, m or "?")),
        "Bits (W/A)": t["bits"],
        **{AXIS_NAMES[c]: t[c].map(_axis_value) for c in axes},
        "FID↓ [95 %]": [_num(f) + (f" [{_num(lo)}, {_num(hi)}]" if pd.notna(lo) and pd.notna(hi) else "")
                        for f, lo, hi in zip(t["fid"], t["fid_lo"], t["fid_hi"])],
        "IS↑": [(_num(a) + (f" ± {b:.2f}" if pd.notna(b) else "")) if pd.notna(a) else "—" for a, b in zip(t["is"], t["is_std"])],
        "ΔFID vs FP": t["fid_delta"].map(lambda v: _num(v, "{:+.2f}")),
        "KID↓": t["kid"].map(lambda v: _num(v, "{:.4f}")),
        "Precision / recall": [f"{_num(p)} / {_num(r)}" if pd.notna(p) else "—" for p, r in zip(t["precision"], t["recall"])],
        "MSE vs FP": t["mse_vs_fp"].map(lambda v: _num(v, "{:.4f}")),
        "Recovered [paired 95 %]": [_num(v, "{:.3f}") + (f" [{lo:.3f}, {hi:.3f}]" if pd.notna(lo) else "")
                                    for v, lo, hi in zip(t["recovered"], t["rec_lo"], t["rec_hi"])],
        "Recon (s)": t["recon_seconds"].map(lambda v: _num(v, "{:.0f}")),
        "Total (s)": t["total_seconds"].map(lambda v: _num(v, "{:.0f}")),
        "Peak RSS (MB)": t["peak_rss_mb"].map(lambda v: _num(v, "{:.0f}")),
        "State": t["state"],
    })
    return out


def display_per_reconstruction(s: pd.DataFrame) -> pd.DataFrame:
    """That summary with formatted numbers (Markdown / HTML)."""
    shown = {"Model": s["model"], "Method": s["method"].map(lambda m: METHOD_NAMES.get(m, m)), "Bits (W/A)": s["bits"]}
    for c in s.columns:
        if c in AXIS_NAMES and c not in ("model",):
            shown[AXIS_NAMES[c]] = s[c].map(_axis_value)
    shown.update({
        "Sampling seeds": s["seeds"], "FP FID": s["fp_fid"].map(lambda v: _num(v, "{:.3f}")),
        "Linear FID": s["linear_fid"].map(lambda v: _num(v, "{:.3f}")), "FID": s["fid"].map(lambda v: _num(v, "{:.3f}")),
        "Recovered (mean)": s["recovered"].map(lambda v: _num(v, "{:.3f}")),
        "Per seed [paired 95 %]": s["per_seed"], "Lowest bound": s["lowest_ci95"].map(lambda v: _num(v, "{:.3f}")),
        "Recon (s)": s["recon_seconds"].map(lambda v: _num(v, "{:.0f}")),
    })
    return pd.DataFrame(shown)


def jobs_table(df: pd.DataFrame) -> pd.DataFrame:
    """Every job (expected or found): where it is, what it ran, how it ended."""
    df = normalise(df)
    cols = ["sweep", "job", "state", "detail", "method", "label", "overrides", "fid", "restarts", "slurm_id", "dir"]
    df = df.iloc[sorted(range(len(df)), key=lambda i: (_k(df["sweep"].iloc[i]), _f(df["job"].iloc[i], -1)))]
    return df[cols].reset_index(drop=True)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no extra dependency)."""
    def cell(v) -> str:
        s = "" if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else str(v)
        return s.replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def state_counts(df: pd.DataFrame) -> dict[str, int]:
    from qdiff.report.collect import STATES

    counts = df["state"].value_counts().to_dict() if len(df) else {}
    return {s: int(counts[s]) for s in [*STATES, *sorted(set(counts) - set(STATES))] if counts.get(s)}
