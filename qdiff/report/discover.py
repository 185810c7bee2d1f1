"""Where the runs are: sweep directories (they hold Hydra's ``multirun.yaml``) and single run directories."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qdiff.runstatus import METRICS_FILE, STATUS_FILE

# Never searched for runs: a run's own outputs and caches, and hidden folders (.hydra, .submitit).
SKIP_DIRS = {"wandb", "quantized_unet", "report_figures", "cache", "__pycache__"}


@dataclass
class Source:
    """A sweep directory (holds ``multirun.yaml``) or a single run directory."""

    kind: str
    path: Path


def is_run_dir(d: Path) -> bool:
    """A job's output directory: Hydra saved its config, or qdiff wrote its metrics or status there."""
    return (d / ".hydra" / "config.yaml").is_file() or (d / METRICS_FILE).is_file() or (d / STATUS_FILE).is_file()


def _walk(root: Path, kind_of: Callable[[Path, list[str]], str | None]) -> Iterator[Source]:
    """Directories below ``root`` (itself included) that ``kind_of`` names, in sorted order; not descending into them."""
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        kind = kind_of(d, filenames)
        if kind is not None:
            yield Source(kind, d)
            dirnames[:] = []
        else:
            dirnames[:] = sorted(n for n in dirnames if n not in SKIP_DIRS and not n.startswith("."))


def find_sources(root: Path) -> list[Source]:
    """Sweep dirs and run dirs under ``root`` (``root`` itself may be either)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {root}")

    def kind_of(d: Path, files: list[str]) -> str | None:
        return "sweep" if "multirun.yaml" in files else "run" if is_run_dir(d) else None

    return list(_walk(root, kind_of))


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Run directories inside a sweep directory (any depth: hydra.sweep.subdir may nest)."""
    return [s.path for s in _walk(sweep_dir, lambda d, _: "run" if d != sweep_dir and is_run_dir(d) else None)]
