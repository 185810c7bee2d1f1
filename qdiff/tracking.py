"""Experiment tracking: W&B (offline unless configured online) or nothing. Built from ``logger/`` configs."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch


class NullTracker:
    """``logger=none``: logs nothing."""

    run = None

    def start(self, config: dict, output_dir: Path, group: str | None = None, name: str | None = None,
              tags: list[str] | None = None) -> None:
        """Open the run; ``group``/``name``/``tags`` are launch-dependent defaults (see ``qdiff.cli.run_context``)."""

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_image(self, key: str, path: Path, caption: str = "") -> None:
        pass

    def log_table(self, key: str, csv_path: Path, curve: tuple[str, str] | None = None) -> None:
        pass

    def lightning_logger(self):
        return False

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(NullTracker):
    """One W&B run per qdiff run; its files live in the run's output directory."""

    def __init__(self, project: str = "qdiff", mode: str = "offline", entity: str | None = None,
                 group: str | None = None, job_type: str | None = None, tags: list | None = None,
                 name: str | None = None, notes: str | None = None) -> None:
        if mode not in ("offline", "online", "disabled"):
            from qdiff.errors import ConfigError

            raise ConfigError(f"logger.mode must be offline, online or disabled, got '{mode}'")
        self.kw = dict(project=project, mode=mode, entity=entity, group=group, job_type=job_type,
                       tags=[str(t) for t in (tags or [])], name=name, notes=notes)

    def start(self, config: dict, output_dir: Path, group: str | None = None, name: str | None = None,
              tags: list[str] | None = None) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        kw = dict(self.kw)
        kw["group"] = kw["group"] or group
        kw["name"] = kw["name"] or name
        kw["tags"] = list(dict.fromkeys([*kw["tags"], *(str(t) for t in tags or [])]))
        if not os.environ.get("WANDB_RUN_ID"):  # a W&B sweep agent chooses its own run ids
            # A requeued job (preemption, time-out) continues the same W&B run instead of starting a new one.
            id_file = Path(output_dir) / "wandb_run_id"
            if not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:12])
            kw.update(id=id_file.read_text().strip(), resume="allow")
        self.run = wandb.init(dir=str(output_dir), config=config, reinit="finish_previous", **kw)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        flat = {k: v for k, v in _flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log(flat, step=step)
        for k, v in flat.items():
            self.run.summary[k] = v

    def log_image(self, key: str, path: Path, caption: str = "") -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path), caption=caption)})

    def log_table(self, key: str, csv_path: Path, curve: tuple[str, str] | None = None) -> None:
        """A CSV as a W&B table; ``curve=(x, y)`` also logs it as a native line chart (``step_mse_table`` -> ``step_mse_curve``)."""
        import pandas as pd
        import wandb

        table = wandb.Table(dataframe=pd.read_csv(csv_path))
        logged = {key: table}
        if curve is not None:
            logged[key.removesuffix("_table") + "_curve"] = wandb.plot.line(table, curve[0], curve[1], title=f"{curve[1]} vs {curve[0]}")
        self.run.log(logged)

    def lightning_logger(self):
        from pytorch_lightning.loggers import WandbLogger

        return WandbLogger(experiment=self.run)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            out[key] = v.item()
        else:
            out[key] = v
    return out
