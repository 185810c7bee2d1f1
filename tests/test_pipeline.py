"""The end-to-end FP pipeline: CLI run outputs, determinism, FID sanity against the noise floor, W&B offline."""
from __future__ import annotations

import pytest

import json

import torch

from conftest import TINY
from qdiff.eval.config import EvalConfig
from qdiff.eval.fidelity import compute_metrics
from qdiff.sampling import SamplerConfig, generate


def test_tiny_cli_run_writes_its_own_outputs(tmp_path, cli):
    r = cli(["quant=fp", *TINY, f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "run"
    m = json.loads((run / "metrics.json").read_text())
    for key in ("fid", "is", "is_std", "n_samples", "model", "sampler", "steps", "quant", "seed", "cost"):
        assert key in m, key
    assert m["n_samples"] == 32 and m["steps"] == 10 and m["quant"] == "W32A32" and m["model"] == "digits"
    assert set(m["cost"]["seconds"]) >= {"load", "sample", "evaluate"} and m["cost"]["peak_rss_mb"] > 0
    assert (run / ".hydra" / "config.yaml").exists() and (run / "samples.png").stat().st_size > 0
    from safetensors.torch import load_file

    samples = load_file(str(run / "samples.safetensors"))["samples"]
    assert samples.shape == (32, 1, 16, 16) and samples.dtype == torch.uint8
    feats = load_file(str(run / "eval_features.safetensors"))   # what qdiff.report pairs runs with
    assert feats["features.samples"].shape[0] == 32 and {"real.mu", "real.sigma"} <= set(feats)
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert "FID" in r.stdout and str(run) in r.stdout


def test_sampling_is_deterministic_given_seed(digits_model):
    cfg = SamplerConfig(name="ddim", steps=8, batch_size=16)
    a = generate(digits_model, digits_model.unet, cfg, 20, seed=3, progress=False)
    b = generate(digits_model, digits_model.unet, cfg, 20, seed=3, progress=False)
    c = generate(digits_model, digits_model.unet, cfg, 20, seed=4, progress=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_every_sampler_runs(digits_model):
    for name in ("ddim", "ddpm", "plms", "dpm_solver"):
        x = generate(digits_model, digits_model.unet, SamplerConfig(name=name, steps=5), 4, seed=0, progress=False)
        assert x.shape == (4, 1, 16, 16) and torch.isfinite(x).all() and x.abs().max() <= 1


@pytest.mark.slow
def test_fp_fid_is_near_noise_floor_and_noise_is_far_above(digits_model, digits_real):
    ev = EvalConfig(n_samples=256, isc_splits=4)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(digits_real), generator=g)
    floor = compute_metrics(digits_real[perm[:256]], digits_real[perm[256:]], "digits", ev)["fid"]
    samples = generate(digits_model, digits_model.unet, SamplerConfig(steps=50), 256, seed=0, progress=False)
    fp = compute_metrics(samples, digits_real, "digits", ev)
    noise = compute_metrics(torch.rand(256, 1, 16, 16) * 2 - 1, digits_real, "digits", ev)
    assert fp["fid"] < 3 * floor, (fp, floor)
    assert noise["fid"] > 20 * fp["fid"], (noise, fp)
    assert fp["is"] > 2 * noise["is"]


def test_wandb_offline_run_is_created(tmp_path, cli):
    r = cli(["quant=fp", *TINY, "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}",
             f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path, env={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "the offline run holds its event log"


def test_kid_precision_recall_and_the_fid_interval_are_sane(digits_real):
    ev = EvalConfig(n_samples=256, isc_splits=4, bootstrap=20)
    perm = torch.randperm(len(digits_real), generator=torch.Generator().manual_seed(1))
    same = compute_metrics(digits_real[perm[:256]], digits_real[perm[256:]], "digits", ev)
    noise = compute_metrics(torch.rand(256, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1, digits_real,
                            "digits", ev)
    for m in (same, noise):
        lo, hi = m["fid_ci95"]
        assert lo < m["fid"] < hi and m["kid_std"] >= 0
    assert same["precision"] > 0.5 and same["recall"] > 0.5 and noise["precision"] < 0.1 and noise["recall"] < 0.1
    assert noise["kid"] > 50 * max(same["kid"], same["kid_std"]) and noise["fid_ci95"][0] > same["fid_ci95"][1]


def test_recovered_share_is_paired_over_noise_indices_with_an_interval_around_the_point(digits_real):
    from qdiff.eval.fidelity import Scorer

    scorer = Scorer(digits_real, "digits", EvalConfig(n_samples=256))
    g = torch.Generator().manual_seed(3)
    fp = digits_real[torch.randperm(len(digits_real), generator=g)[:256]]
    noisy = (fp + 0.8 * torch.randn(fp.shape, generator=g)).clamp(-1, 1)     # "linear": far from FP
    half = (fp + 0.3 * torch.randn(fp.shape, generator=g)).clamp(-1, 1)      # a method between the two
    same = scorer.recovered_share(fp, noisy, fp, n_boot=20)
    assert same["recovered"] == 1.0 and same["recovered_ci95"] == [1.0, 1.0]  # identical to FP on every resample
    r = scorer.recovered_share(half, noisy, fp, n_boot=20)
    lo, hi = r["recovered_ci95"]
    assert 0 < lo < r["recovered"] < hi < 1.2
    with pytest.raises(ValueError, match="paired"):
        scorer.recovered_share(half[:100], noisy, fp)
