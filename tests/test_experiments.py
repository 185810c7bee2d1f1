"""Every paper experiment runs end to end through the real CLI as one multirun, at tiny size (debug=smoke)."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from conftest import CONF, run_cli

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.slow
def test_multirun_over_every_experiment_with_tiny_settings(tmp_path):
    captions = tmp_path / "captions.txt"  # sd14 is text-guided: a few captions for calibration and sampling
    captions.write_text("\n".join(f"a photo of a {w} on a table" for w in ("cat", "dog", "cup", "book", "lamp", "shoe")))
    sweep = tmp_path / "sweep"
    r = run_cli(["-m", "experiment=glob(*)", "debug=smoke", f"model.prompts={captions}", f"hydra.sweep.dir={sweep}",
                 f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    done = {}
    for m in sweep.glob("*/metrics.json"):
        overrides = OmegaConf.load(m.parent / ".hydra" / "overrides.yaml")
        experiment = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
        done[experiment[0]] = json.loads(m.read_text())
    assert sorted(done) == EXPERIMENTS
    for name, m in done.items():
        assert m["n_samples"] == 8 and m["output_dir"].startswith(str(sweep)), name
        if m["method"] == "qdiff":
            assert m["reconstruction"]["n_units"] > 0, name
