"""Shared fixtures: configs composed the way run.py composes them, shrunk to tiny CPU settings in tmp_path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A run small enough for a test: 32 samples, 10 DDIM steps, a few reconstruction iterations.
TINY = [
    "logger=none", "eval.n_samples=32", "eval.isc_splits=2", "eval.analysis_batch=8", "sampler.steps=10",
    "calib.n=4", "calib.c=2", "recon.weight_iters=4", "recon.act_iters=2", "recon.batch_size=4",
]


#: pytest-xdist workers running this session (1 without xdist); the machine's cores are shared out among them.
WORKERS = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
if WORKERS > 1:  # the subprocesses a test starts (CLI runs, submitit workers) get this worker's share too
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

#: Tests that talk to the one local SLURM cluster (its queue, its node state, its accounting): under xdist they
#: all run on one worker, one after another, as they would without it.
SLURM_GROUP = pytest.mark.xdist_group("slurm")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slurm") or item.get_closest_marker("uses_slurm"):
            item.add_marker(SLURM_GROUP)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state (torch, numpy, random), whatever ran before it on its
    worker: under xdist the order of tests on a worker varies, and a test that draws unseeded random tensors would
    otherwise see different values from run to run."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _cpu_threads():
    """This worker's share of the cores (two threads at most), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, THREADS))
    yield
    torch.set_num_threads(n)


@pytest.fixture
def compose_cfg(tmp_path):
    """compose_cfg(*overrides) -> DictConfig with outputs and caches under tmp_path."""
    from hydra import compose, initialize_config_dir

    def _compose(*overrides: str, out: str = "run"):
        paths = [f"paths.root_dir={tmp_path}", f"paths.log_dir={tmp_path}", f"paths.output_dir={tmp_path / out}",
                 f"paths.cache_dir={tmp_path / 'cache'}"]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=[*paths, *overrides])

    return _compose


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python run.py <args>`` in a subprocess (the real CLI, Hydra and all)."""
    e = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=e)


@pytest.fixture
def cli(capfd, monkeypatch):
    """``cli(args, cwd, env=None)``: ``python run.py <args>`` run in this process — the real Hydra entry point, its
    argument parsing, logging and exit codes — without a new interpreter's start-up (~10 s of imports on 2 cores).
    Returns a CompletedProcess with the exit code and the captured stdout/stderr."""
    import importlib.util

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    def _run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        for k, v in {"WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", "QDIFF_RUN_CWD": str(cwd), **(env or {})}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(sys, "argv", [str(ROOT / "run.py"), *args])
        # run.py as ``__main__``: its ``if __name__ == "__main__"`` block runs, and Hydra finds conf/ beside it
        spec = importlib.util.spec_from_file_location("__main__", ROOT / "run.py")
        capfd.readouterr()
        code = 0
        try:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            GlobalHydra.instance().clear()
            HydraConfig.instance().cfg = None
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return _run


@pytest.fixture(scope="session")
def digits_real():
    from qdiff.models.digits import load_digits_images

    return load_digits_images()


@pytest.fixture(scope="session")
def digits_model():
    from qdiff.models import ModelConfig, load_model

    return load_model(ModelConfig(name="digits"))
