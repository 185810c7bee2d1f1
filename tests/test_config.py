"""Every config option composes into a valid run spec; bad input fails with one clear line before any work."""
from __future__ import annotations


import pytest

from conftest import CONF, TINY, run_cli
from qdiff.errors import ConfigError
from qdiff.spec import build_spec


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "sampler", "quant", "calib", "recon", "eval", "logger"])
def test_every_group_option_composes_into_a_spec(group, compose_cfg):
    options = _options(group)
    assert options, f"conf/{group} is empty"
    for opt in options:
        cfg = compose_cfg(f"{group}={opt}")
        spec = build_spec(cfg)
        assert spec.output_dir.name == "run"
        if group == "model":
            assert spec.model.name == opt


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment, compose_cfg):
    spec = build_spec(compose_cfg(f"experiment={experiment}"))
    assert spec.task_name != "qdiff", "experiments name their own output folder"


def test_model_file_sets_paper_sampler_and_calibration(compose_cfg):
    spec = build_spec(compose_cfg("model=ldm_church"))
    assert (spec.sampler.name, spec.sampler.steps, spec.calib.T, spec.calib.c, spec.calib.n) == ("ddim", 500, 500, 25, 256)
    assert spec.calib.N == 5120  # Table 5
    spec = build_spec(compose_cfg("model=sd14", "model.prompts=x"))
    assert (spec.sampler.name, spec.calib.T, spec.calib.c) == ("plms", 50, 2)


def test_default_run_is_qdiff_w4a8_on_digits(compose_cfg):
    spec = build_spec(compose_cfg())
    assert (spec.model.name, spec.quant.method, spec.quant.label) == ("digits", "qdiff", "W4A8")


@pytest.mark.parametrize("override, message", [
    ("model.name=nope", "unknown model 'nope'"),
    ("sampler.name=euler", "unknown sampler 'euler'"),
    ("sampler.steps=0", "sampler.steps must be > 0"),
    ("eval.n_samples=-5", "eval.n_samples must be >= 2"),
    ("eval.save_features=no", "eval.save_features must be true or false, got 'no'"),
    ("quant.weight_bits=9", "quant.weight_bits must be an integer in 2..8"),
    ("quant.act_bits=1", "quant.act_bits must be an integer in 2..8"),
    ("quant.method=gptq", "unknown quant.method 'gptq'"),
    ("calib.c=200", "calib.c (200) must be <= calib.T (100)"),
    ("calib.n=0", "calib.n must be > 0"),
    ("calib.c=0", "calib.c must be > 0"),
    ("calib.mode=random", "unknown calib.mode"),
    ("recon.granularity=net", "recon.granularity must be block or layer"),
    ("recon.capture_batch_size=0", "recon.capture_batch_size must be > 0"),
    ("recon.probe_samples=0", "recon.probe_samples must be > 0"),
    ("+quant.foo=1", "quant: unknown option(s) ['foo']"),
])
def test_bad_values_raise_config_error(override, message, compose_cfg):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        build_spec(compose_cfg(override))


@pytest.mark.slow
def test_cli_unknown_group_option_is_hydras_one_error_before_any_work(tmp_path):
    """Hydra's own error for an option that does not exist: the real interpreter, as a user sees it."""
    r = run_cli([*TINY, f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}", "model=nope"],
                tmp_path, timeout=120)
    assert r.returncode != 0 and "Could not find 'model/nope'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["sampler.steps=0"], "error: sampler.steps must be > 0"),
    (["eval.n_samples=-3"], "error: eval.n_samples must be >= 2"),
    (["quant.weight_bits=12"], "error: quant.weight_bits must be an integer in 2..8"),
    (["calib.c=11"], "error: calib.c (11) must be <= calib.T (10)"),
    (["calib.n=0"], "error: calib.n must be > 0"),
])
def test_cli_rejects_bad_input_in_one_line_before_any_work(args, message, tmp_path, cli):
    # the bad value comes last so that no TINY override replaces it
    r = cli([*TINY, f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}", *args], tmp_path)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "cache").exists(), "no work may start before validation"
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_cli_unreadable_checkpoint_is_one_line(tmp_path, cli):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00\x01 not a checkpoint")
    r = cli(["quant=fp", f"model.source={bad}", *TINY, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "broken.safetensors" in err[0] and "corrupt" in err[0]
    assert "Traceback" not in r.stderr


def test_cli_missing_weights_say_how_to_make_them(tmp_path, cli):
    r = cli(["quant=fp", f"model.source={tmp_path / 'missing.safetensors'}", *TINY, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert r.returncode == 2
    assert "experiments/training/train_digits.py" in r.stderr and "Traceback" not in r.stderr


def test_run_never_overwrites_a_finished_run(tmp_path, cli):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"fid": 1.0}')
    r = cli(["quant=fp", *TINY, f"hydra.run.dir={run}"], tmp_path)
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    assert (run / "metrics.json").read_text() == '{"fid": 1.0}'


def test_calibration_schedule_is_checked_only_where_data_is_collected(compose_cfg):
    # an FP run collects no calibration data: a c that does not fit the sampler's steps is no error there
    spec = build_spec(compose_cfg("quant=fp", "sampler.steps=2"))
    assert spec.calib.c > spec.calib.T and not spec.quant.enabled
    with pytest.raises(ConfigError, match=__import__("re").escape("calib.c (5) must be <= calib.T (2)")):
        build_spec(compose_cfg("sampler.steps=2"))


def test_small_sample_count_gets_fitting_is_splits(compose_cfg):
    assert build_spec(compose_cfg("eval.n_samples=8")).eval.isc_splits == 8
    assert build_spec(compose_cfg()).eval.isc_splits == 10
    with pytest.raises(ConfigError, match="eval.isc_splits must be in"):
        build_spec(compose_cfg("eval.n_samples=8", "eval.isc_splits=9"))


def test_fp_is_w32a32_whatever_bits_the_config_carries(compose_cfg):
    spec = build_spec(compose_cfg("quant.method=fp"))   # quant=w4a8's bits, method fp
    assert (spec.quant.weight_bits, spec.quant.act_bits, spec.quant.label) == (32, 32, "W32A32")


def test_cli_non_checkpoint_source_is_one_line(tmp_path, cli):
    notes = tmp_path / "notes.pt"
    notes.write_text("these are my notes, not weights\n")
    r = cli(["quant=fp", f"model.source={notes}", *TINY, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "notes.pt is not a checkpoint" in err[0], r.stderr[-1000:]
    assert "weights_only" not in r.stderr and "Traceback" not in r.stderr


LOWBIT_TAGS = {"linear": [], "qdiff": [], "smooth": ["smooth0.5"], "lowrank": ["lr8"], "timegroups": ["tg4"],
               "groupwise": ["wg16"], "dynamic": ["dyn"], "smooth_lowrank": ["smooth0.5", "lr8"],
               "smooth_lowrank_dynamic": ["smooth0.5", "lr8", "dyn"]}
SINGLE = [k for k in LOWBIT_TAGS if len(LOWBIT_TAGS[k]) == 1]   # round-to-nearest + each method alone: linear_<name>


@pytest.mark.parametrize("variant", [*LOWBIT_TAGS, *(f"linear_{k}" for k in SINGLE)])
def test_lowbit_variants_compose_and_say_which_pieces_they_use(variant, compose_cfg):
    from qdiff.report.rows import config_fields

    assert sorted(p.stem for p in (CONF / "lowbit").glob("*.yaml")) == sorted(
        [*LOWBIT_TAGS, *(f"linear_{k}" for k in SINGLE)])   # every file is tested
    tags = LOWBIT_TAGS[variant.removeprefix("linear_")]
    cfg = compose_cfg("experiment=lowbit_digits", f"+lowbit={variant}")
    spec = build_spec(cfg)
    assert spec.quant.method == ("linear" if variant.startswith("linear") else "qdiff") and spec.quant.transforms == tags
    assert config_fields(cfg)["transforms"] == "+".join(tags)     # the report's column for a job without metrics


def test_w4a4_default_transforms_belong_to_qdiff_only(compose_cfg):
    """quant=w4a4's default combination applies to the qdiff method; quant.method=linear stays the plain baseline;
    the int8 backend refuses the default's dynamic step sizes before any work and takes it without them."""
    q = build_spec(compose_cfg("quant=w4a4")).quant
    lin = build_spec(compose_cfg("quant=w4a4", "quant.method=linear")).quant
    assert q.method == "qdiff" and q.transforms == ["smooth0.5", "lr8", "dyn"]
    assert lin.method == "linear" and lin.transforms == [] and lin.act_dynamic is False
    # the figure's linear panel is that same baseline row, not round-to-nearest with the run's transforms
    from qdiff.stages.sample import linear_baseline

    assert linear_baseline(q) == lin
    assert build_spec(compose_cfg("quant=w4a4", "quant.smooth=null", "quant.lowrank=0",
                                  "quant.act_dynamic=false")).quant.transforms == []
    with pytest.raises(ConfigError, match=r"per-token dynamic activation scales \(quant.act_dynamic=true\); turn it off"):
        build_spec(compose_cfg("quant=w4a4", "deploy=int8"))
    assert build_spec(compose_cfg("quant=w4a4", "deploy=int8", "quant.act_dynamic=false")).quant.transforms == [
        "smooth0.5", "lr8"]


def test_the_old_run_module_name_still_works_with_a_deprecation_warning():
    import importlib
    import sys

    sys.modules.pop("qdiff.pipeline", None)
    with pytest.warns(DeprecationWarning, match="qdiff.pipeline is renamed qdiff.run"):
        old = importlib.import_module("qdiff.pipeline")
    from qdiff.run import run

    assert old.run is run


@pytest.mark.parametrize("overrides, iters", [
    (["quant=w4a4"], 500),                                   # W4A4's default method: its own measured budget
    (["quant=w4a4", "quant.method=linear"], 1000),
    (["quant=w4a4", "quant.act_dynamic=false"], 1000),
    (["quant=w4a8"], 1000),
    (["quant=w4a8", "+lowbit=smooth_lowrank_dynamic"], 1000),
    (["experiment=lowbit_digits"], 1000),                    # the budget its tables were measured with
    (["model=sd14", "quant=w4a4", "model.random_init=true"], 20000),   # recon=default: the paper's budget
])
def test_the_cpu_budget_gives_w4a4_dynamic_500_adaround_iterations_and_nothing_else(overrides, iters, compose_cfg):
    assert build_spec(compose_cfg(*overrides)).recon.weight_iters == iters
