"""Every job of a sweep, a run directory or a directory of runs, with its state: one row per job, none dropped.

Expected jobs come from the sweep itself: Hydra's ``multirun.yaml`` holds the sweeper's params and the
command line's task overrides, which Hydra's own override parser and ``BasicSweeper.split_arguments`` expand
into the job list, exactly as the launch did. Each expected job is then matched (by its overrides) to a job
directory; a job without one is ``missing`` (or ``pending``/``cancelled`` when SLURM knows it), a directory
without ``metrics.json`` is ``failed`` (``status.json`` says so), or, when its status still says running,
whatever ``sacct`` says of its SLURM job (``running``, ``pending``, ``cancelled``, ``timeout``, ``failed``),
else ``incomplete``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("qdiff")

# States, best first (the HTML page colours them; --strict fails on anything but completed).
STATES = ["completed", "running", "pending", "failed", "cancelled", "timeout", "incomplete", "missing"]
SKIP_DIRS = {"wandb", "quantized_unet", "report_figures", "cache", "__pycache__"}

# sacct state -> report state (for jobs whose status.json still says running/interrupted)
_SACCT = {
    "PENDING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending",
    "RUNNING": "running", "COMPLETING": "running", "CONFIGURING": "running", "SUSPENDED": "running",
    "RESIZING": "running", "STAGE_OUT": "running", "SIGNALING": "running",
    "CANCELLED": "cancelled", "TIMEOUT": "timeout", "DEADLINE": "timeout",
    "FAILED": "failed", "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed", "BOOT_FAIL": "failed",
    "PREEMPTED": "cancelled", "REVOKED": "cancelled", "COMPLETED": "incomplete",
}


@dataclass
class Source:
    """A sweep directory (holds ``multirun.yaml``) or a single run directory."""

    kind: str
    path: Path


@dataclass
class Sweep:
    path: Path
    expected: list[list[str]] | None      # every job's overrides, in job-number order; None: not expandable
    swept: list[str] = field(default_factory=list)  # keys with more than one value
    config: DictConfig | None = None
    note: str = ""


def is_run_dir(d: Path) -> bool:
    return (d / ".hydra" / "config.yaml").is_file() or (d / "metrics.json").is_file() or (d / "status.json").is_file()


def find_sources(root: Path) -> list[Source]:
    """Sweep dirs and run dirs under ``root`` (``root`` itself may be either)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {root}")
    if (root / "multirun.yaml").is_file():
        return [Source("sweep", root)]
    if is_run_dir(root):
        return [Source("run", root)]
    out: list[Source] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if "multirun.yaml" in filenames:
            out.append(Source("sweep", d))
            dirnames[:] = []
        elif is_run_dir(d):
            out.append(Source("run", d))
            dirnames[:] = []
        else:
            dirnames[:] = sorted(n for n in dirnames if n not in SKIP_DIRS and not n.startswith("."))
    return out


def _config_loader(cfg: DictConfig):
    """Hydra's config loader for the sweep's own config directory (for glob() sweeps and missing jobs)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    sources = OmegaConf.select(cfg, "hydra.runtime.config_sources") or []
    primary = next((s.path for s in sources if s.get("provider") == "main" and s.get("schema") == "file"), None)
    if primary is None or not Path(primary).is_dir():
        return None
    return ConfigLoaderImpl(config_search_path=create_config_search_path(primary))


def read_sweep(path: Path) -> Sweep:
    """The sweep's expected jobs, expanded from ``multirun.yaml`` the way Hydra's BasicSweeper does."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = OmegaConf.load(path / "multirun.yaml")
    target = str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="") or "")
    if not target.endswith("BasicSweeper"):
        return Sweep(path, None, config=cfg, note=f"sweeper {target or '?'}: expected jobs unknown, listing the job dirs found")
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + [str(o) for o in OmegaConf.select(cfg, "hydra.overrides.task", default=[])]
    try:
        loader = _config_loader(cfg)
    except Exception:  # noqa: BLE001 - a moved config dir only disables glob() and composing missing jobs
        loader = None
    try:
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(args)
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception as e:  # noqa: BLE001 - report what was found rather than nothing
        return Sweep(path, None, config=cfg, note=f"cannot expand the sweep's overrides ({e}); listing the job dirs found")
    swept = list(dict.fromkeys(o.get_key_element() for o in parsed if o.is_sweep_override()))
    return Sweep(path, [list(j) for j in batches[0]], swept, cfg)


def _json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _sel(cfg, key: str):
    if cfg is None:
        return None
    try:
        v = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    except Exception:  # noqa: BLE001 - unresolvable interpolation (e.g. ${hydra:...} outside Hydra)
        return None
    return v if not OmegaConf.is_config(v) else OmegaConf.to_container(v)


def _raw(cfg, key: str) -> str | None:
    """A config value as written, interpolations unresolved."""
    if cfg is None:
        return None
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if node is None:
        return None
    value = OmegaConf.to_container(node, resolve=False).get(leaf)
    return None if value is None else str(value)


def config_fields(cfg) -> dict:
    """Fields of a job's composed config that identify its table row."""
    method = _sel(cfg, "quant.method")
    fp = method == "fp"
    return {
        "task_name": _sel(cfg, "task_name"), "model": _sel(cfg, "model.name"), "method": method,
        "weight_bits": 32 if fp else _sel(cfg, "quant.weight_bits"), "act_bits": 32 if fp else _sel(cfg, "quant.act_bits"),
        "split": _sel(cfg, "quant.split"), "calib_mode": _sel(cfg, "calib.mode"), "calib_c": _sel(cfg, "calib.c"),
        "calib_n": _sel(cfg, "calib.n"), "sampler": _sel(cfg, "sampler.name"), "steps": _sel(cfg, "sampler.steps"),
        "n_samples": _sel(cfg, "eval.n_samples"), "seed": _sel(cfg, "seed"),
    }


def metric_fields(m: dict) -> dict:
    """The numbers of ``metrics.json`` that the tables and figures use."""
    if not m:
        return {}
    fp, cost, rec, an = m.get("fp") or {}, m.get("cost") or {}, m.get("reconstruction") or {}, m.get("analysis") or {}
    out = {k: m.get(k) for k in ("model", "method", "weight_bits", "act_bits", "split", "calib_mode", "sampler", "steps",
                                 "n_samples", "seed", "task_name", "fid", "is", "is_std")}
    out.update({
        "label": m["quant"] if isinstance(m.get("quant"), str) else None,
        "fp_fid": fp.get("fid"), "fp_is": fp.get("is"), "fp_is_std": fp.get("is_std"),
        "recon_seconds": rec.get("seconds_total"), "resumed_steps": rec.get("resumed_steps"),
        "total_seconds": cost.get("total_seconds"), "peak_rss_mb": cost.get("peak_rss_mb"),
        "peak_gpu_mb": cost.get("peak_gpu_mb"), "step_mse_mean": an.get("step_mse_mean"),
        "step_mse_last": an.get("step_mse_last"), "calib_N": (m.get("calibration") or {}).get("N"),
    })
    if m.get("method") == "fp":
        out["fp_fid"], out["fp_is"], out["fp_is_std"] = m.get("fid"), m.get("is"), m.get("is_std")
    return {k: v for k, v in out.items() if v is not None}


def _slurm_id(status: dict) -> str | None:
    if status.get("slurm_array") and status.get("slurm_array_task") is not None:
        return f"{status['slurm_array']}_{status['slurm_array_task']}"
    return status.get("slurm_job_id")


def sacct_states(ids: list[str]) -> dict[str, str] | None:
    """``{job id: sacct State}`` of the latest record of each job; None when sacct is not available."""
    if not ids:
        return {}
    if shutil.which("sacct") is None:
        return None
    # the array's own id too: tasks still pending show only as '<array>_[2-7%2]' under it
    query = sorted(set(ids) | {i.split("_")[0] for i in ids if "_" in i})
    try:
        out = subprocess.run(["sacct", "-j", ",".join(query), "-n", "-X", "-P", "-o", "JobID,State"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("sacct failed (%s); unfinished SLURM jobs are reported as incomplete", str(e).strip()[:200])
        return None
    states: dict[str, str] = {}
    for line in out.splitlines():
        if "|" not in line:
            continue
        jid, state = line.split("|", 1)
        for j in _expand_array_id(jid.strip()):
            states[j] = state.strip()
    return states


def _expand_array_id(jid: str) -> list[str]:
    """``'12_[0-2,5%4]'`` (pending array tasks) -> ``['12_0', '12_1', '12_2', '12_5']``."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", jid)
    if not m:
        return [jid]
    out = []
    for part in m.group(2).split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _pid_alive(status: dict) -> bool:
    """A local (non-SLURM) job still running on this machine."""
    if status.get("host") != socket.gethostname() or not status.get("pid"):
        return False
    try:
        st = Path(f"/proc/{int(status['pid'])}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError, ValueError):
        return False
    return st not in ("Z", "X")


def _first_line(text: str | None, n: int = 240) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[0][:n] if lines else ""


def read_job(d: Path) -> dict:
    """One job directory: config fields, metrics, status (the state is settled later, with sacct)."""
    cfg = None
    if (d / ".hydra" / "config.yaml").is_file():
        try:
            cfg = OmegaConf.load(d / ".hydra" / "config.yaml")
        except Exception:  # noqa: BLE001 - a damaged config must not hide the job
            cfg = None
    metrics, status = _json(d / "metrics.json"), _json(d / "status.json")
    row = {**config_fields(cfg), **metric_fields(metrics)}
    row.update({
        "dir": str(d), "has_metrics": bool(metrics), "status": status.get("state"),
        "error": _first_line(status.get("error")), "slurm_id": _slurm_id(status),
        "restarts": status.get("restarts"), "attempt": status.get("attempt"),
        "_status": status,
    })
    overrides_file = d / ".hydra" / "overrides.yaml"
    row["_overrides"] = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else None
    return row


def _settle(row: dict, sacct: dict[str, str] | None) -> None:
    """Final state and a one-line detail of a found job."""
    if row["has_metrics"]:
        row["state"], row["detail"] = "completed", ""
        return
    st = row.get("status")
    if st == "failed":
        row["state"], row["detail"] = "failed", row.get("error") or "failed"
        return
    sid = row.get("slurm_id")
    if sid:
        if sacct is None:
            row["state"], row["detail"] = "incomplete", f"SLURM job {sid}: sacct not available"
            return
        s = sacct.get(sid, "")
        word = s.split()[0] if s else ""
        row["state"] = _SACCT.get(word, "incomplete")
        row["detail"] = f"sacct: {s}" if s else f"SLURM job {sid} unknown to sacct"
        if st == "interrupted" and row["state"] == "incomplete":
            row["detail"] += f"; last attempt stopped ({row.get('error')})"
        return
    if st == "running" and _pid_alive(row["_status"]):
        row["state"], row["detail"] = "running", f"pid {row['_status'].get('pid')} alive"
        return
    row["state"] = "incomplete"
    row["detail"] = (f"status '{st}' but the process is gone" if st else "no status.json (stopped before the run started)")
    if row.get("error"):
        row["detail"] += f": {row['error']}"


def _submitit_array_ids(sweep_dir: Path) -> dict[int, str]:
    """Array task index -> SLURM id ('<array>_<task>') from submitit's folders (latest array wins)."""
    sub = sweep_dir / ".submitit"
    out: dict[int, tuple[int, str]] = {}
    if not sub.is_dir():
        return {}
    for p in sub.iterdir():
        m = re.fullmatch(r"(\d+)(?:_(\d+))?", p.name)
        if m and (m.group(2) is not None or not any(sub.glob(f"{p.name}_*"))):
            # '<array>_<task>', or a plain '<id>' when the sweep had a single job (no array)
            a, t = int(m.group(1)), int(m.group(2) or 0)
            if t not in out or a > out[t][0]:
                out[t] = (a, p.name)
    return {t: v[1] for t, v in out.items()}


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Run directories inside a sweep directory (any depth: hydra.sweep.subdir may nest)."""
    out = []
    for dirpath, dirnames, _ in os.walk(sweep_dir):
        d = Path(dirpath)
        if d != sweep_dir and is_run_dir(d):
            out.append(d)
            dirnames[:] = []
        else:
            dirnames[:] = sorted(n for n in dirnames if n not in SKIP_DIRS and not n.startswith("."))
    return out


def _compose_missing(sweep: Sweep, overrides: list[str]) -> dict:
    """Config fields of a job that never started, composed by Hydra from the sweep's own config."""
    try:
        loader = _config_loader(sweep.config)
        if loader is None:
            return {}
        from hydra.core.utils import setup_globals

        setup_globals()
        return config_fields(loader.load_sweep_config(sweep.config, overrides))
    except Exception as e:  # noqa: BLE001 - the row stays, with fewer fields
        log.debug("cannot compose %s: %s", overrides, e)
        return {}


def collect(path: str | Path, use_sacct: bool = True) -> tuple[pd.DataFrame, list[str]]:
    """All jobs under ``path`` as a DataFrame (one row per job) and notes on what could not be determined."""
    root = Path(path).resolve()
    rows: list[dict] = []
    notes: list[str] = []
    for src in find_sources(root):
        if src.kind == "run":
            row = read_job(src.path)
            row.update(sweep="", job=None, overrides="")
            rows.append(row)
            continue
        sweep = read_sweep(src.path)
        if sweep.note:
            notes.append(f"{src.path.name}: {sweep.note}")
        found = [read_job(d) for d in _job_dirs(src.path)]
        by_overrides = {frozenset(r["_overrides"]): r for r in found if r["_overrides"] is not None}
        by_num = {int(Path(r["dir"]).name): r for r in found if Path(r["dir"]).name.isdigit()}
        used: set[int] = set()
        launcher = str(OmegaConf.select(sweep.config, "hydra.launcher._target_", default="") or "") if sweep.config else ""
        # submitit's folders are named by job id: SLURM ids for the SLURM launcher, process ids for the local one
        array_ids = _submitit_array_ids(src.path) if launcher.endswith("SlurmLauncher") else {}
        for num, ovr in enumerate(sweep.expected or []):
            r = by_overrides.get(frozenset(ovr))
            if r is None and _raw(sweep.config, "hydra.sweep.subdir") == "${hydra.job.num}":
                cand = by_num.get(num)
                r = cand if cand is not None and cand["_overrides"] is None else None
            shown = " ".join(o for o in ovr if o.split("=", 1)[0].lstrip("+~") in sweep.swept)
            if r is None:
                r = {**_compose_missing(sweep, ovr), "dir": str(src.path / str(num)), "has_metrics": False,
                     "status": None, "error": "", "slurm_id": array_ids.get(num), "_status": {}, "_missing": True}
            used.add(id(r))
            if not r.get("slurm_id") and array_ids.get(num):  # started, but status.json not written yet
                r["slurm_id"] = array_ids[num]
            r.update(sweep=src.path.name, sweep_dir=str(src.path), job=num, overrides=shown)
            rows.append(r)
        for r in found:  # job dirs that match no expected job (an earlier launch into the same dir, ...)
            if id(r) not in used:
                r.update(sweep=src.path.name, sweep_dir=str(src.path), job=None,
                         overrides=" ".join(r["_overrides"] or []))
                rows.append(r)
    ids = [r["slurm_id"] for r in rows if r.get("slurm_id") and not r["has_metrics"] and r.get("status") != "failed"]
    sacct = sacct_states(ids) if use_sacct else None
    for r in rows:
        if r.pop("_missing", False):
            s = (sacct or {}).get(r.get("slurm_id") or "", "")
            word = s.split()[0] if s else ""
            r["state"] = {"pending": "pending", "running": "running", "cancelled": "cancelled"}.get(_SACCT.get(word, ""), "missing")
            r["detail"] = (f"{'not started yet' if r['state'] == 'pending' else 'never started'}; sacct: {s}" if s
                           else "never started (no job directory)")
        else:
            _settle(r, sacct)
        r.pop("_status", None)
        r.pop("_overrides", None)
        r["dir"] = os.path.relpath(r["dir"], root) if r.get("dir") else ""
    df = pd.DataFrame(rows)
    if df.empty:
        notes.append(f"no runs or sweeps found under {root}")
    return df, notes
