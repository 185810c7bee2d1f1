"""A Hydra sweep's expected jobs, expanded from its ``multirun.yaml`` exactly as the launch did.

``multirun.yaml`` holds the sweeper's params and the command line's task overrides; Hydra's own override
parser and ``BasicSweeper.split_arguments`` expand them into the job list. Each expected job is matched (by its
overrides) to a job directory; a job that never started gets its config fields composed by Hydra from the
sweep's own config directory.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qdiff.report.rows import config_fields

log = logging.getLogger("qdiff")


@dataclass
class Sweep:
    """What ``multirun.yaml`` says of a sweep."""

    path: Path
    expected: list[list[str]] | None      # every job's overrides, in job-number order; None: not expandable
    swept: list[str] = field(default_factory=list)  # keys with more than one value
    config: DictConfig | None = None
    note: str = ""

    @property
    def on_slurm(self) -> bool:
        """Launched by the SLURM launcher: submitit's folders are then named by SLURM job ids (else by pids)."""
        if self.config is None:
            return False
        return str(OmegaConf.select(self.config, "hydra.launcher._target_", default="") or "").endswith("SlurmLauncher")

    def shown(self, overrides: list[str]) -> str:
        """The overrides that tell this job from the sweep's others (the swept keys)."""
        return " ".join(o for o in overrides if o.split("=", 1)[0].lstrip("+~") in self.swept)


def _config_loader(cfg: DictConfig) -> Any:
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


def _raw(cfg: DictConfig | None, key: str) -> str | None:
    """A config value as written, interpolations unresolved."""
    if cfg is None:
        return None
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if node is None:
        return None
    value = OmegaConf.to_container(node, resolve=False).get(leaf)
    return None if value is None else str(value)


def match_jobs(sweep: Sweep, found: list[dict]) -> tuple[list[tuple[int, list[str], dict | None]], list[dict]]:
    """Each expected job's ``(number, overrides, row or None)``, and the found rows that match no expected job.

    A row matches by its saved overrides; one without saved overrides matches by its directory name when the
    sweep's subdir is the job number. Unmatched rows come from an earlier launch into the same dir, etc.
    """
    by_overrides = {frozenset(r["_overrides"]): r for r in found if r["_overrides"] is not None}
    by_num = {int(Path(r["dir"]).name): r for r in found if Path(r["dir"]).name.isdigit()}
    numbered = _raw(sweep.config, "hydra.sweep.subdir") == "${hydra.job.num}"
    matched: list[tuple[int, list[str], dict | None]] = []
    used: set[int] = set()
    for num, ovr in enumerate(sweep.expected or []):
        r = by_overrides.get(frozenset(ovr))
        if r is None and numbered:
            cand = by_num.get(num)
            r = cand if cand is not None and cand["_overrides"] is None else None
        if r is not None:
            used.add(id(r))
        matched.append((num, ovr, r))
    return matched, [r for r in found if id(r) not in used]


def compose_missing(sweep: Sweep, overrides: list[str]) -> dict:
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
