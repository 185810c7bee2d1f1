"""Orchestration without SLURM: launcher configs, W&B sweep files, the report on a real local sweep, W&B grouping.

SLURM runs (array sweep, preemption + resume, scancel) are in test_orchestration_slurm.py.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import CONF, ROOT, run_cli
from orchestration_util import env, read_json, tiny, wandb_records

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("launcher,target", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher"),
                                             ("submitit_slurm", "SlurmLauncher"), ("submitit_local", "LocalLauncher")])
def test_launcher_configs_compose_and_resolve(tmp_path, monkeypatch, launcher, target):
    """The launcher node resolves the way a multirun needs it: before any job, with no HydraConfig set yet."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    monkeypatch.setenv("QDIFF_RUN_CWD", str(tmp_path))  # what run.py sets
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=[f"hydra/launcher={launcher}", "experiment=table2_digits"])
        HydraConfig.instance().cfg = None  # as when the sweeper instantiates the launcher
        la = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert la["_target_"].endswith(target)
    sweep_dir = str(tmp_path / "outputs" / "table2_digits" / "multiruns")
    assert la["submitit_folder"].startswith(sweep_dir) and la["submitit_folder"].endswith("/.submitit/%j")
    if launcher in ("slurm", "local"):
        assert la["cpus_per_task"] >= 1 and la["gpus_per_node"] == 0 and la["timeout_min"] > 10
        assert la["name"] == "qdiff-table2_digits"
    if launcher == "slurm":
        assert la["max_num_timeout"] > 0, "timed-out jobs must be requeued (they resume)"
        assert isinstance(la["array_parallelism"], int) and la["array_parallelism"] > 0
        assert f"export OMP_NUM_THREADS={la['cpus_per_task']}" in la["setup"]
        assert any(s.startswith("export WANDB_MODE=") for s in la["setup"])


def test_launcher_and_qdiff_job_are_checkpointable(tmp_path):
    """A preempted job resubmits itself (submitit calls checkpoint()): same callable, same arguments, same run dir."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
    from submitit.helpers import DelayedSubmission

    from qdiff.launch import QDiffJob

    launcher = SlurmLauncher(submitit_folder=str(tmp_path))
    d = launcher.checkpoint(["quant=w4a8"], "hydra.sweep.dir", 3, "job_id_for_3", {})
    assert isinstance(d, DelayedSubmission) and d.function is launcher and d.args[2] == 3
    job = QDiffJob(["quant=w4a8", f"paths.root_dir={tmp_path}"])
    assert job.run_dir.startswith(str(tmp_path / "outputs" / "qdiff" / "runs"))
    again = job.checkpoint()
    assert isinstance(again, DelayedSubmission) and again.function is job and again.function.run_dir == job.run_dir


def _grid(params: dict) -> list[dict]:
    keys = list(params)
    values = [p["values"] if "values" in p else [p["value"]] for p in params.values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def test_sweep_files_exist_for_every_paper_ablation():
    names = {p.stem for p in SWEEPS}
    assert {"table1_digits", "table2_digits", "split_digits", "table5_digits", "table2_cifar10", "table3_bedroom",
            "table4_church", "sd14_w4a8"} <= names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_wandb_sweep_parses_and_every_combination_composes(path, compose_cfg):
    from omegaconf import OmegaConf
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    spec = yaml.safe_load(path.read_text())
    assert spec["program"] == "run.py" and (ROOT / spec["program"]).is_file()
    assert spec["method"] == "grid"
    assert spec["command"] == ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
    grid = _grid(spec["parameters"])
    assert len(grid) >= 2
    for point in grid:
        # exactly the arguments a W&B agent passes (wandb's own formatting of ${args_no_hyphens})
        args = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})["args_no_hyphens"]
        cfg = compose_cfg(*args)
        for k, v in point.items():
            if "." in k and k.split(".")[0] in ("quant", "calib"):
                assert str(OmegaConf.select(cfg, k)).lower() == str(v).lower(), (k, v)
        assert cfg.logger.mode == "online" and cfg.logger._target_.endswith("WandbTracker")
    if "experiment" in spec["parameters"]:
        # the W&B grid is the Hydra experiment's grid (python run.py -m experiment=<name>)
        exp = yaml.safe_load((CONF / "experiment" / f"{spec['parameters']['experiment']['value']}.yaml").read_text())
        hydra_grid = {k: [yaml.safe_load(x) for x in str(v).split(",")] for k, v in exp["hydra"]["sweeper"]["params"].items()}
        wandb_grid = {k: p["values"] for k, p in spec["parameters"].items() if "values" in p}
        assert wandb_grid == hydra_grid


def test_paper_table_rows_fp_reference_delta_and_recovered_share():
    from qdiff.report.tables import display_table, paper_table, to_markdown

    ctx = {"model": "digits", "sampler": "ddim", "steps": 100, "n_samples": 1024, "seed": 0}
    rows = [
        {**ctx, "method": "linear", "weight_bits": 4, "act_bits": 8, "fid": 50.0, "fp_fid": 10.0, "state": "completed"},
        {**ctx, "method": "qdiff", "weight_bits": 4, "act_bits": 8, "fid": 15.0, "fp_fid": 10.0, "state": "completed",
         "recon_seconds": 100.0, "total_seconds": 150.0, "peak_rss_mb": 900.0},
        {**ctx, "method": "qdiff", "weight_bits": 8, "act_bits": 32, "fid": 11.0, "fp_fid": 10.0, "state": "completed",
         "fid_lo": 10.5, "fid_hi": 11.5, "kid": 0.0123, "precision": 0.7, "recall": 0.8, "mse_vs_fp": 0.0042},
        {**ctx, "method": "linear", "weight_bits": 8, "act_bits": 32, "state": "failed", "detail": "boom"},
        {**ctx, "method": "qdiff", "weight_bits": 4, "act_bits": 32, "state": "missing"},
    ]
    t = paper_table(pd.DataFrame(rows))
    assert list(zip(t["method"], t["bits"], t["state"])) == [
        ("fp", "32/32", "reference"), ("linear", "8/32", "failed"), ("qdiff", "8/32", "completed"),
        ("qdiff", "4/32", "missing"), ("linear", "4/8", "completed"), ("qdiff", "4/8", "completed")]
    q = t[(t["method"] == "qdiff") & (t["bits"] == "4/8")].iloc[0]
    assert q["fid_delta"] == pytest.approx(5.0) and q["recovered"] == pytest.approx(35 / 40)
    assert pd.isna(t[(t["method"] == "qdiff") & (t["bits"] == "8/32")].iloc[0]["recovered"])  # its linear row failed
    md = to_markdown(display_table(t))
    assert "| digits | Q-Diffusion | 4/8 | 15.00 | — | +5.00 | — | — | — | 0.875 | 100 | 150 | 900 | completed |" in md
    assert "| digits | Q-Diffusion | 8/32 | 11.00 [10.50, 11.50] | — | +1.00 | 0.0123 | 0.70 / 0.80 | 0.0042 | — |" in md
    assert "| digits | Full precision | 32/32 | 10.00 |" in md and "| missing |" in md


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory) -> Path:
    """A real 4-job basic-launcher sweep: 2 complete, 1 fails validation (the sweep stops after that batch), 1 never runs."""
    tmp_path = tmp_path_factory.mktemp("local_sweep")
    sweep = tmp_path / "sweep"
    r = run_cli(["-m", *tiny("quant.method=linear,qdiff,bogus,fp", "hydra.sweeper.max_batch_size=3",
                             "tags=[orch]", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'cache'}",
                             **{"logger": "wandb", "eval.analysis": "true", "eval.analysis_batch": "4"})],
                tmp_path, timeout=300, env=env())
    assert r.returncode != 0 and "unknown quant.method 'bogus'" in r.stderr + r.stdout, r.stderr[-3000:]
    return sweep


@pytest.mark.slow
def test_local_sweep_report_lists_every_job_and_wandb_groups_the_sweep(local_sweep):
    sweep, tmp_path = local_sweep, local_sweep.parent
    assert read_json(sweep / "2" / "status.json")["state"] == "failed"
    assert not (sweep / "3").exists()
    st = read_json(sweep / "0" / "status.json")
    assert st["state"] == "completed" and st["restarts"] == 0 and st["attempt"] == 1

    rep = subprocess.run([sys.executable, "-m", "qdiff.report", str(sweep)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=env())
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert "jobs: 4 (2 completed, 1 failed, 1 missing)" in rep.stdout
    table = pd.read_csv(sweep / "report.csv")
    assert list(zip(table["method"], table["bits"], table["state"])) == [
        ("fp", "32/32", "reference"), ("fp", "32/32", "missing"), ("linear", "4/8", "completed"),
        ("qdiff", "4/8", "completed"), ("bogus", "4/8", "failed")]
    fp = table.iloc[0]
    for _, row in table[table["state"] == "completed"].iterrows():
        assert row["fp_fid"] == pytest.approx(fp["fid"]) and row["fid_delta"] == pytest.approx(row["fid"] - fp["fid"])
    assert table.loc[table["method"] == "qdiff", "recon_seconds"].iloc[0] > 0
    jobs = pd.read_csv(sweep / "jobs.csv")
    assert sorted(zip(jobs["job"], jobs["state"])) == [(0, "completed"), (1, "completed"), (2, "failed"), (3, "missing")]
    assert "unknown quant.method 'bogus'" in jobs.loc[jobs["job"] == 2, "detail"].iloc[0]

    md = (sweep / "report.md").read_text()
    assert "| digits | Linear quant | 4/8 |" in md and "| digits | Q-Diffusion | 4/8 |" in md
    assert "| digits | Full precision | 32/32 |" in md and "never started" in md
    page = (sweep / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") == 4
    for text in ("Q-Diffusion", "Linear quant", "unknown quant.method &#x27;bogus&#x27;", ">missing<", ">failed<",
                 "FID vs weight bits", "Per-step MSE"):
        assert text in page, text
    for fig in ("fid_vs_bits", "step_mse", "act_ranges", "samples"):
        assert (sweep / "report_figures" / f"{fig}.png").stat().st_size > 1000

    # W&B: the sweep's runs share a group; job_type/tags/name say model, quant and method; metrics and media are logged.
    group = f"qdiff-{sweep.name}"
    for num, method in [(0, "linear"), (1, "qdiff")]:
        (run_file,) = (sweep / str(num) / "wandb").glob("offline-run-*/run-*.wandb")
        run, keys = None, set()
        for rec in wandb_records(run_file):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run = rec.run
            elif kind == "history":
                keys |= {it.key or "/".join(it.nested_key) for it in rec.history.item}
        assert run.run_group == group and run.job_type == method and run.display_name == f"{method}-W4A8-{num}"
        assert {"digits", method, "W4A8", "ddim", "orch"} <= set(run.tags)
        assert {"fid", "is", "fp/fid", "cost/total_seconds", "samples/path", "step_mse/path", "act_ranges/path",
                "step_mse_table/path", "step_mse_curve_table/path"} <= keys, sorted(keys)
        if method == "qdiff":
            assert "reconstruction/seconds_total" in keys

    # A user re-running into a finished directory is refused, and the finished run's status is left alone.
    again = run_cli([*tiny(), f"hydra.run.dir={sweep / '0'}", f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path, env=env())
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    assert read_json(sweep / "0" / "status.json") == st


@pytest.mark.slow
def test_report_on_a_single_run_dir_and_on_a_directory_of_runs(local_sweep, tmp_path):
    import shutil

    from qdiff.report import build_report

    one = build_report(local_sweep / "1", out=tmp_path / "rep_one", figures=False)
    assert one.counts == {"completed": 1} and list(one.table["state"]) == ["reference", "completed"]
    assert (tmp_path / "rep_one" / "report.html").is_file() and not (local_sweep / "1" / "report.html").exists()
    runs = tmp_path / "runs"
    for num, name in [("0", "a"), ("1", "b"), ("2", "c")]:
        shutil.copytree(local_sweep / num, runs / name, ignore=shutil.ignore_patterns("wandb"))
    both = build_report(runs, figures=False)
    assert both.counts == {"completed": 2, "failed": 1} and (runs / "report.html").is_file()
    assert dict(zip(both.jobs["dir"], both.jobs["state"])) == {"a": "completed", "b": "completed", "c": "failed"}


def _fake_run(d: Path, method: str, seed: int, samples, fp, real, recon_seed=None, transforms="") -> None:
    """A finished run folder as the report reads it: metrics.json and the saved features."""
    from qdiff.cache import save_tensors
    from qdiff.eval.fidelity import fid
    from qdiff.report.run import FEATURES_FILE

    d.mkdir(parents=True)
    save_tensors(d / FEATURES_FILE, {"features.samples": samples, "features.fp": fp,
                                     **{f"real.{k}": torch.from_numpy(v) for k, v in real.items()}})
    m = {"model": "digits", "method": method, "weight_bits": 4, "act_bits": 8, "quant": "W4A8", "sampler": "ddim",
         "steps": 10, "n_samples": len(samples), "seed": seed, "transforms": transforms, "fid": fid(samples, real),
         "fp": {"fid": fid(fp, real)}, **({"recon_seed": recon_seed, "input_source": "quantized"} if recon_seed is not None else {})}
    (d / "metrics.json").write_text(json.dumps(m))


def test_report_computes_paired_recovered_shares_per_reconstruction_from_saved_features(tmp_path):
    """Each qdiff run against the linear run of its sampling seed, from the features the runs saved: the same
    numbers as Scorer.recovered_share on those sets; one summary row per reconstruction seed over sampling seeds."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    from qdiff.eval.fidelity import recovered_share
    from qdiff.report import build_report

    g = torch.Generator().manual_seed(0)
    real = fid_features_to_statistics(torch.randn(400, 8, generator=g, dtype=torch.float64).float())
    expected = {}
    for seed in (0, 1):
        noise = torch.randn(200, 8, generator=g)  # the shared noises of one sampling seed
        fp, lin = noise + 0.05 * torch.randn(200, 8, generator=g), noise * 1.6 + 0.5
        _fake_run(tmp_path / f"linear_s{seed}", "linear", seed, lin, fp, real)
        _fake_run(tmp_path / f"linear_copy_s{seed}", "linear", seed, lin, fp, real)  # a grid's identical copy
        for rs in (0, 1, 2):
            q = noise * (1 + 0.1 * rs) + 0.05 * rs
            _fake_run(tmp_path / f"qdiff_rs{rs}_s{seed}", "qdiff", seed, q, fp, real, recon_seed=rs)
            expected[rs, seed] = recovered_share(q, lin, fp, real, 200, 0)
        # a transformed method (e.g. quant=w4a4's smoothing + low-rank branch) is compared with plain linear too
        _fake_run(tmp_path / f"smooth_s{seed}", "qdiff", seed, noise * 1.05, fp, real, recon_seed=0, transforms="smooth0.5")
        expected["smooth", seed] = recovered_share(noise * 1.05, lin, fp, real, 200, 0)
    rep = build_report(tmp_path, use_sacct=False, figures=False)
    sm = rep.table[rep.table["transforms"] == "smooth0.5"].sort_values("seed")
    assert [(r, [lo, hi]) for r, lo, hi in zip(sm["recovered"], sm["rec_lo"], sm["rec_hi"])] == \
        [(expected["smooth", s]["recovered"], expected["smooth", s]["recovered_ci95"]) for s in (0, 1)]
    assert "| smooth0.5 |" in (tmp_path / "report.md").read_text()
    rows = rep.table[(rep.table["method"] == "qdiff") & (rep.table["transforms"] == "")]
    assert len(rows) == 6 and rows["rec_lo"].notna().all()
    for _, r in rows.iterrows():
        e = expected[int(r["recon_seed"]), int(r["seed"])]
        assert (r["recovered"], [r["rec_lo"], r["rec_hi"]]) == (e["recovered"], e["recovered_ci95"])
    s = rep.per_recon[rep.per_recon["transforms"] == ""].set_index("recon_seed")
    assert sorted(s.index) == [0, 1, 2] and (s["seeds"] == "0 1").all()
    for rs in (0, 1, 2):
        e0, e1 = expected[rs, 0], expected[rs, 1]
        assert s.loc[rs, "recovered"] == pytest.approx((e0["recovered"] + e1["recovered"]) / 2)
        assert s.loc[rs, "lowest_ci95"] == min(e0["recovered_ci95"][0], e1["recovered_ci95"][0])
    md = (tmp_path / "report.md").read_text()
    assert "## Recovered share per reconstruction" in md and f"{expected[2, 1]['recovered']:.3f} [" in md
    assert (tmp_path / "recovered.csv").is_file()
    # a run without saved features (made before them) keeps its point value, without an interval
    (tmp_path / "qdiff_rs0_s0" / "eval_features.safetensors").unlink()
    t = build_report(tmp_path, use_sacct=False, figures=False).table
    r = t[(t["method"] == "qdiff") & (t["recon_seed"] == 0) & (t["seed"] == 0) & (t["transforms"] == "")].iloc[0]
    assert r["recovered"] == pytest.approx(expected[0, 0]["recovered"], abs=1e-4) and pd.isna(r["rec_lo"])


def test_report_on_one_sampling_seed_summarises_it_and_tells_runs_apart_by_recon_precision(tmp_path):
    """One seed (no Seed axis) once crashed the per-reconstruction summary; runs that differ only in
    recon.precision get a column that says which is which."""
    from omegaconf import OmegaConf
    from torch_fidelity.metric_fid import fid_features_to_statistics

    from qdiff.report import build_report

    g = torch.Generator().manual_seed(0)
    real = fid_features_to_statistics(torch.randn(300, 8, generator=g, dtype=torch.float64).float())
    noise = torch.randn(150, 8, generator=g)
    fp = noise + 0.05 * torch.randn(150, 8, generator=g)
    _fake_run(tmp_path / "linear", "linear", 0, noise * 1.6 + 0.5, fp, real)
    for name, k in (("32-true", 1.05), ("bf16-mixed", 1.1)):
        _fake_run(tmp_path / name, "qdiff", 0, noise * k, fp, real, recon_seed=0)
        (tmp_path / name / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create({"quant": {"method": "qdiff"}, "recon": {"seed": 0, "precision": name}}),
                       tmp_path / name / ".hydra" / "config.yaml")
    rep = build_report(tmp_path, use_sacct=False, figures=False)
    s = rep.per_recon.set_index("recon_precision")
    assert sorted(s.index) == ["32-true", "bf16-mixed"] and (s["seeds"] == "0").all()
    assert s.loc["32-true", "recovered"] > s.loc["bf16-mixed", "recovered"]
    assert "Recon precision" in (tmp_path / "report.md").read_text()


def test_report_pairs_each_run_with_the_linear_run_of_its_own_first_last_bits(tmp_path):
    """quant.first_last_bits=null,8 in one sweep: two linear baselines (8-bit first/last layers make linear much
    better); each qdiff run's share is against the linear run of the same setting, and the table says which is which
    (before, the setting was not an axis: the two linear FIDs were averaged and no interval was paired)."""
    from omegaconf import OmegaConf
    from torch_fidelity.metric_fid import fid_features_to_statistics

    from qdiff.eval.fidelity import recovered_share
    from qdiff.report import build_report

    g = torch.Generator().manual_seed(0)
    real = fid_features_to_statistics(torch.randn(300, 8, generator=g, dtype=torch.float64).float())
    noise = torch.randn(150, 8, generator=g)
    fp = noise + 0.05 * torch.randn(150, 8, generator=g)
    expected = {}
    for fl, lin_k, q_k in ((None, 1.6, 1.1), (8, 1.3, 1.05)):
        lin, q = noise * lin_k + 0.2, noise * q_k
        for name, method, x in (("linear", "linear", lin), ("qdiff", "qdiff", q)):
            d = tmp_path / f"{name}_fl{fl}"
            _fake_run(d, method, 0, x, fp, real, recon_seed=0 if method == "qdiff" else None)
            (d / ".hydra").mkdir()
            OmegaConf.save(OmegaConf.create({"quant": {"method": method, "first_last_bits": fl}}), d / ".hydra" / "config.yaml")
        expected["—" if fl is None else 8] = recovered_share(q, lin, fp, real, 200, 0)
    rep = build_report(tmp_path, use_sacct=False, figures=False)
    s = rep.per_recon.set_index("first_last_bits")
    assert sorted(map(str, s.index)) == ["8", "—"]
    for fl, e in expected.items():
        assert s.loc[fl, "recovered"] == e["recovered"] and s.loc[fl, "lowest_ci95"] == e["recovered_ci95"][0]
    assert "First/last bits" in (tmp_path / "report.md").read_text()


def test_report_rows_carry_the_interval_kid_precision_recall_and_paired_error():
    from qdiff.report.rows import metric_fields

    m = {"fid": 0.46, "fid_ci95": [0.37, 0.54], "kid": 0.0227, "kid_std": 0.002, "precision": 0.67, "recall": 0.87,
         "mse_vs_fp": 0.0132, "psnr_vs_fp": 24.8, "fp": {"fid": 0.42}}
    row = metric_fields(m)
    assert (row["fid_lo"], row["fid_hi"], row["kid"], row["precision"], row["recall"], row["mse_vs_fp"]) == \
        (0.37, 0.54, 0.0227, 0.67, 0.87, 0.0132)
    assert "fid_lo" not in metric_fields({"fid": 1.0})
