"""A checkpointable submitit job that runs one composed qdiff config (the same as ``python run.py <overrides>``).

Preemption and time-outs: submitit calls :meth:`QDiffJob.checkpoint`, which resubmits the same job (same
overrides, same run directory). The requeued job runs the config again; reconstruction continues from its
per-unit checkpoints under ``${paths.cache_dir}/recon/<key>``, and a run that had already finished returns its
metrics (see ``qdiff.cli``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import submitit

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# submitit executor parameters used unless the caller overrides them (``slurm_*`` apply to SLURM only).
DEFAULT_EXECUTOR_PARAMS: dict[str, Any] = {
    "timeout_min": 240,
    "cpus_per_task": 2,
    "mem_gb": 8,
}
# Time-outs after which submitit still requeues the job (it resumes); preemptions are always requeued.
MAX_NUM_TIMEOUT = 5


def _quote(value: str) -> str:
    """A Hydra override value that is taken literally (paths may hold spaces, '=' or ',')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resolve_run_dir(overrides: Sequence[str], config_dir: str | Path = CONF_DIR, config_name: str = "config",
                    cwd: str | None = None) -> Path:
    """The run directory ``python run.py <overrides>`` would use now (``hydra.run.dir``, timestamp resolved)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    os.environ.setdefault("QDIFF_RUN_CWD", cwd or os.getcwd())
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3", job_name="run"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return Path(str(cfg.hydra.run.dir)).resolve()


class QDiffJob(submitit.helpers.Checkpointable):
    """One qdiff run as a submitit callable; returns the run's ``metrics.json`` as a dict.

    The run directory is fixed when the job is created (the timestamp in ``hydra.run.dir`` would otherwise
    differ on a requeue), so every attempt writes to the same place.
    """

    def __init__(self, overrides: Sequence[str], run_dir: str | Path | None = None,
                 config_dir: str | Path = CONF_DIR, config_name: str = "config") -> None:
        self.overrides = [str(o) for o in overrides]
        self.config_dir = str(Path(config_dir).resolve())
        self.config_name = config_name
        self.cwd = os.environ.get("QDIFF_RUN_CWD") or os.getcwd()  # paths.root_dir, as run.py would set it
        self.run_dir = str(Path(run_dir).resolve() if run_dir else resolve_run_dir(self.overrides, config_dir, config_name,
                                                                                    self.cwd))

    def __call__(self) -> dict:
        from hydra._internal.hydra import Hydra
        from hydra._internal.utils import create_config_search_path
        from hydra.core.global_hydra import GlobalHydra

        from qdiff.cli import main as run_job

        os.environ["QDIFF_RUN_CWD"] = self.cwd
        GlobalHydra.instance().clear()
        hydra = Hydra.create_main_hydra2(task_name="run", config_search_path=create_config_search_path(self.config_dir))
        try:
            ret = hydra.run(config_name=self.config_name, task_function=lambda cfg: run_job(cfg, raise_errors=True),
                            overrides=[*self.overrides, f"hydra.run.dir={_quote(self.run_dir)}"])
        finally:
            GlobalHydra.instance().clear()
        ret.return_value  # re-raises the run's exception, if any  # noqa: B018
        return json.loads((Path(self.run_dir) / "metrics.json").read_text())

    def __repr__(self) -> str:
        return f"QDiffJob({' '.join(self.overrides)!r}, run_dir={self.run_dir!r})"


def submit(overrides: Sequence[str], executor_params: dict[str, Any] | None = None, cluster: str | None = None,
           folder: str | Path | None = None, run_dir: str | Path | None = None) -> tuple[submitit.Job, Path]:
    """Submit one run; returns ``(job, run_dir)``. ``job.result()`` waits and returns the metrics dict.

    cluster: ``slurm``, ``local`` or ``debug`` (in this process); None = SLURM when ``sbatch`` exists, else local.
    executor_params: submitit ``AutoExecutor.update_parameters`` arguments, on top of ``DEFAULT_EXECUTOR_PARAMS``
    (e.g. ``{"slurm_partition": "gpu", "gpus_per_node": 1, "timeout_min": 600}``).
    folder: submitit's logs and pickles; default ``<run_dir>/.submitit/%j``.
    """
    job_fn = QDiffJob(overrides, run_dir=run_dir)
    folder = Path(folder) if folder is not None else Path(job_fn.run_dir) / ".submitit" / "%j"
    executor = make_executor(folder, cluster, {"name": "qdiff-" + Path(job_fn.run_dir).name, **(executor_params or {})})
    return executor.submit(job_fn), Path(job_fn.run_dir)


def make_executor(folder: str | Path, cluster: str | None, executor_params: dict[str, Any] | None = None) -> submitit.Executor:
    """A submitit executor with qdiff's defaults (``DEFAULT_EXECUTOR_PARAMS``; on SLURM: offline W&B, one OpenMP
    thread per CPU of the task, ``QDIFF_SLURM_PARTITION``) under ``executor_params``; ``cluster`` as in :func:`submit`."""
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=MAX_NUM_TIMEOUT)
    params = {**DEFAULT_EXECUTOR_PARAMS, **(executor_params or {})}
    if executor.cluster == "slurm":
        cpus = params.get("cpus_per_task", 1)
        params.setdefault("slurm_setup", [f"export WANDB_MODE={os.environ.get('WANDB_MODE', 'offline')}",
                                          f"export OMP_NUM_THREADS={cpus}"])
        if os.environ.get("QDIFF_SLURM_PARTITION"):
            params.setdefault("slurm_partition", os.environ["QDIFF_SLURM_PARTITION"])
    # submitit ignores parameters of other executors only if they carry their prefix: drop foreign ones.
    prefixes = ("slurm_", "local_", "debug_")
    params = {k: v for k, v in params.items() if not k.startswith(prefixes) or k.startswith(executor.cluster + "_")}
    executor.update_parameters(**params)
    return executor
