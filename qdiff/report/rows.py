"""One job's table row: the fields of its composed config, its metrics and its ``status.json``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qdiff.quant.config import transform_tags
from qdiff.resolvers import register_resolvers
from qdiff.runstatus import RunStatus, read_metrics, read_status

#: Quant settings that give some layers other bits than the rest (a report tells runs apart by them).
LAYER_BIT_AXES = ("first_last_bits", "cond_bits", "attn_bits")

register_resolvers()  # saved job configs keep conf/quant's qdiff_for interpolations


def _sel(cfg: DictConfig | None, key: str) -> Any:
    if cfg is None:
        return None
    try:
        v = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    except Exception:  # noqa: BLE001 - unresolvable interpolation (e.g. ${hydra:...} outside Hydra)
        return None
    return v if not OmegaConf.is_config(v) else OmegaConf.to_container(v)


def config_fields(cfg: DictConfig | None) -> dict:
    """Fields of a job's composed config that identify its table row."""
    method = _sel(cfg, "quant.method")
    fp = method == "fp"
    return {
        "task_name": _sel(cfg, "task_name"), "model": _sel(cfg, "model.name"), "method": method,
        "weight_bits": 32 if fp else _sel(cfg, "quant.weight_bits"), "act_bits": 32 if fp else _sel(cfg, "quant.act_bits"),
        "split": _sel(cfg, "quant.split"), "calib_mode": _sel(cfg, "calib.mode"), "calib_c": _sel(cfg, "calib.c"),
        "calib_n": _sel(cfg, "calib.n"), "sampler": _sel(cfg, "sampler.name"), "steps": _sel(cfg, "sampler.steps"),
        "n_samples": _sel(cfg, "eval.n_samples"), "seed": _sel(cfg, "seed"),
        "recon_seed": _sel(cfg, "recon.seed") if method == "qdiff" else None,
        "recon_precision": _sel(cfg, "recon.precision") if method == "qdiff" else None,
        # per-layer bit exceptions: "—" when a run has none, so that a sweep over {none, 8} shows (and pairs) both
        **{k: "—" if fp or _sel(cfg, f"quant.{k}") is None else _sel(cfg, f"quant.{k}") for k in LAYER_BIT_AXES},
        # as metrics.json writes it ('' = the paper's method), for jobs that have none yet
        "transforms": "" if fp else "+".join(transform_tags(_sel(cfg, "quant.smooth"), _sel(cfg, "quant.lowrank"),
                                                            _sel(cfg, "quant.act_time_groups"), _sel(cfg, "quant.act_bits"),
                                                            _sel(cfg, "quant.weight_group_size"), _sel(cfg, "quant.act_dynamic"),
                                                            _sel(cfg, "quant.weight_bits"))),
    }


def metric_fields(m: dict) -> dict:
    """The numbers of ``metrics.json`` that the tables and figures use."""
    if not m:
        return {}
    fp, cost, rec, an = m.get("fp") or {}, m.get("cost") or {}, m.get("reconstruction") or {}, m.get("analysis") or {}
    out = {k: m.get(k) for k in ("model", "method", "weight_bits", "act_bits", "split", "calib_mode", "sampler", "steps",
                                 "n_samples", "seed", "task_name", "fid", "is", "is_std", "transforms",
                                 "recon_seed", "input_source")}
    out.update({
        "label": m["quant"] if isinstance(m.get("quant"), str) else None,
        "fp_fid": fp.get("fid"), "fp_is": fp.get("is"), "fp_is_std": fp.get("is_std"),
        "recon_seconds": rec.get("seconds_total"), "resumed_steps": rec.get("resumed_steps"),
        "total_seconds": cost.get("total_seconds"), "peak_rss_mb": cost.get("peak_rss_mb"),
        "peak_gpu_mb": cost.get("peak_gpu_mb"), "step_mse_mean": an.get("step_mse_mean"),
        "step_mse_last": an.get("step_mse_last"), "calib_N": (m.get("calibration") or {}).get("N"),
        **{k: m.get(k) for k in ("kid", "kid_std", "precision", "recall", "mse_vs_fp", "psnr_vs_fp")},
    })
    if isinstance(m.get("fid_ci95"), list) and len(m["fid_ci95"]) == 2:
        out["fid_lo"], out["fid_hi"] = m["fid_ci95"]
    if m.get("method") == "fp":
        out["fp_fid"], out["fp_is"], out["fp_is_std"] = m.get("fid"), m.get("is"), m.get("is_std")
    return {k: v for k, v in out.items() if v is not None}


def read_job(d: Path) -> dict:
    """One job directory as a row; its state is settled later, with every job's ``sacct`` answer at once.

    Private keys, dropped once the state is settled: ``_status`` (the :class:`RunStatus`, empty when the job
    wrote none) and ``_overrides`` (the job's Hydra overrides, None when Hydra saved none).
    """
    cfg = None
    if (d / ".hydra" / "config.yaml").is_file():
        try:
            cfg = OmegaConf.load(d / ".hydra" / "config.yaml")
        except Exception:  # noqa: BLE001 - a damaged config must not hide the job
            cfg = None
    metrics, status = read_metrics(d) or {}, read_status(d) or RunStatus()
    row = {**config_fields(cfg), **metric_fields(metrics)}
    row.update({
        "dir": str(d), "has_metrics": bool(metrics), "status": status.state, "error": status.error_line,
        "slurm_id": status.slurm_id, "restarts": status.restarts, "attempt": status.attempt, "_status": status,
    })
    overrides_file = d / ".hydra" / "overrides.yaml"
    row["_overrides"] = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else None
    return row


def missing_row(d: Path, slurm_id: str | None) -> dict:
    """The row of an expected job that has no directory (yet): ``d`` is where it would be."""
    return {"dir": str(d), "has_metrics": False, "status": None, "error": "", "slurm_id": slurm_id,
            "_status": RunStatus(), "_missing": True}
