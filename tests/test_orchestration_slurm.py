"""qdiff sweeps on the real local SLURM cluster (``bash scripts/slurm_local.sh up``): job arrays, preemption with
requeue and resume, requeue of a finished job, scancel, and QDiffJob. Skipped when the cluster is not up.

Jobs are tiny (random-init width-reduced digits UNet, one thread each); every wait polls with a deadline.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from orchestration_util import env, read_json, tiny
from test_slurm_cluster import _run, _sacct_final, _wait, slurm_cluster  # noqa: F401 - the module's skip fixture

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _launch(args: list[str], cwd: Path) -> subprocess.Popen:
    """``python run.py -m ...`` in the background (the launching process waits for its SLURM array)."""
    log = open(cwd / "launch.log", "w")
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), "-m", *args], cwd=cwd, stdout=log,
                            stderr=subprocess.STDOUT, env=env(), text=True)


def _finish(proc: subprocess.Popen, cwd: Path, timeout: float = 240) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"launcher did not finish within {timeout:.0f}s:\n{(cwd / 'launch.log').read_text()[-3000:]}")
    return rc, (cwd / "launch.log").read_text()


def _slurm_id(job_dir: Path) -> str:
    st = read_json(job_dir / "status.json")
    return f"{st['slurm_array']}_{st['slurm_array_task']}" if st.get("slurm_array") else st["slurm_job_id"]


def _done_steps(cache: Path) -> int:
    import json

    files = list((cache / "recon").glob("*/progress.json"))
    try:
        return len(json.loads(files[0].read_text())["done"]) if files else 0
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_sweep_runs_as_a_slurm_array_and_a_requeued_finished_job_returns_its_result(tmp_path):
    """(a) plain hydra/launcher=submitit_slurm: 3 jobs, each COMPLETED in sacct; then requeue a finished task."""
    sweep = tmp_path / "sweep"
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=submitit_slurm",
                        "hydra.launcher.cpus_per_task=1", *tiny("quant.method=fp,linear,qdiff"),
                        f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'cache'}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env())
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    ids = [_slurm_id(sweep / str(n)) for n in range(3)]
    assert len({i.split("_")[0] for i in ids}) == 1, f"one job array expected, got {ids}"
    for n, jid in enumerate(ids):
        assert read_json(sweep / str(n) / "metrics.json")["method"] == ["fp", "linear", "qdiff"][n]
        assert _sacct_final(jid) == "COMPLETED"
    from qdiff.report import build_report

    rep = build_report(sweep, figures=False)
    assert rep.counts == {"completed": 3} and list(rep.jobs["slurm_id"]) == ids

    # A job requeued after it finished (e.g. preempted while closing W&B) returns the run's metrics, not an error.
    before = (sweep / "2" / "metrics.json").read_bytes()
    _run("scontrol", "requeue", ids[2])
    _wait("requeued task to finish again", lambda: (s := read_json(sweep / "2" / "status.json"))["restarts"] == 1
          and s["state"] == "completed", timeout=120)
    assert _sacct_final(ids[2], timeout=60) == "COMPLETED"
    history = _run("sacct", "-j", ids[2], "-D", "-X", "-n", "-P", "-o", "State").split()
    assert history == ["REQUEUED", "COMPLETED"], history
    assert (sweep / "2" / "metrics.json").read_bytes() == before
    assert "returning its metrics" in (sweep / "2" / "run.log").read_text()


@pytest.mark.slow
def test_preempted_job_is_requeued_and_resumes_to_the_identical_result(tmp_path):
    """(b) hydra/launcher=slurm: interrupt mid-reconstruction with submitit's job._interrupt(); compare with a plain run."""
    import submitit
    import torch
    from safetensors.torch import load_file

    slow = tiny("quant.method=qdiff", **{"recon.weight_iters": "60"})
    sweep = tmp_path / "sweep"
    cache = tmp_path / "cache_slurm"
    proc = _launch(["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=60", *slow,
                    f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache}"], tmp_path)
    # The uninterrupted reference, meanwhile, on this machine with its own caches (nothing to resume from).
    ref = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *slow, f"hydra.run.dir={tmp_path / 'ref'}",
                            f"paths.cache_dir={tmp_path / 'cache_ref'}"], cwd=tmp_path, env=env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done_at_interrupt = _wait("3 reconstruction units checkpointed", lambda: (n := _done_steps(cache)) >= 3 and n, 180, 0.2)
    job_id = _slurm_id(sweep / "0")
    # SIGTERM alone (what SLURM sends first on preemption or scancel) must not stop the job: submitit ignores it
    # and Lightning must not turn it into SIGTERMException (qdiff.recon.module.trainer_for).
    _run("scancel", "--signal", "SIGTERM", job_id)
    _wait("reconstruction to go on after SIGTERM", lambda: _done_steps(cache) >= done_at_interrupt + 2, 60, 0.2)
    assert _run("squeue", "-h", "-j", job_id, "-o", "%T") == "RUNNING"
    done_at_interrupt = _done_steps(cache)
    job = submitit.SlurmJob(folder=sweep / ".submitit" / "%j", job_id=job_id)
    t0 = time.monotonic()
    job._interrupt()  # preemption: SIGTERM, then USR2 -> the launcher's checkpoint() + 'scontrol requeue'
    rc, log = _finish(proc, tmp_path)
    seconds = time.monotonic() - t0
    assert rc == 0, log[-3000:]
    assert ref.wait(timeout=240) == 0, ref.stderr.read()[-2000:]

    status = read_json(sweep / "0" / "status.json")
    assert status["state"] == "completed" and status["restarts"] == 1 and status["attempt"] == 2
    assert _sacct_final(job_id) == "COMPLETED"
    assert _run("sacct", "-j", job_id, "-D", "-X", "-n", "-P", "-o", "State").split() == ["REQUEUED", "COMPLETED"]
    m, m_ref = read_json(sweep / "0" / "metrics.json"), read_json(tmp_path / "ref" / "metrics.json")
    assert m["reconstruction"]["resumed_steps"] >= done_at_interrupt >= 3
    assert m_ref["reconstruction"]["resumed_steps"] == 0
    print(f"\npreempt -> requeue -> resume -> finished: {seconds:.1f} s "
          f"({m['reconstruction']['resumed_steps']} of {len(m['reconstruction']['steps'])} steps resumed)")

    a = load_file(str(sweep / "0" / "quantized_unet" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "quantized_unet" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "quantized weights differ"
    for key in ("fid", "is", "is_std", "quant", "weight_bits", "act_bits"):
        assert m[key] == m_ref[key], key
    assert {k: v for k, v in m["fp"].items() if k != "cache_hit"} == {k: v for k, v in m_ref["fp"].items() if k != "cache_hit"}

    def quality(r: dict) -> list:
        return [(s["step"], s["mse_before"], s["mse_after"], s["hard_fraction"]) for s in r["reconstruction"]["steps"]]

    assert quality(m) == quality(m_ref)


@pytest.mark.slow
def test_cancelled_job_is_reported_cancelled_not_lost(tmp_path):
    """(c) scancel one job of a 2-job array: the report lists it as cancelled (sacct), beside the completed one."""
    sweep = tmp_path / "sweep"
    cache = tmp_path / "cache"
    proc = _launch(["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1",
                    *tiny("quant.method=linear,qdiff", **{"recon.weight_iters": "400"}),
                    f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache}"], tmp_path)
    _wait("job 1 to reconstruct", lambda: (sweep / "1" / "status.json").is_file() and _done_steps(cache) >= 1, 180, 0.2)
    job_id = _slurm_id(sweep / "1")
    _run("scancel", job_id)
    rc, log = _finish(proc, tmp_path)
    assert rc != 0  # the launching process reports the cancelled job
    assert _sacct_final(job_id).startswith("CANCELLED")
    assert read_json(sweep / "1" / "status.json")["state"] == "running"  # killed: it could not say so itself

    out = subprocess.run([sys.executable, "-m", "qdiff.report", str(sweep), "--no-figures"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert "jobs: 2 (1 completed, 1 cancelled)" in out.stdout
    assert f"cancelled  sweep #1 quant.method=qdiff: sacct: CANCELLED" in out.stdout
    page = (sweep / "report.html").read_text()
    assert ">cancelled<" in page and "sacct: CANCELLED" in page


@pytest.mark.slow
def test_qdiff_job_cli_submits_and_returns_metrics(tmp_path):
    """python -m qdiff.launch: one QDiffJob through submitit on SLURM; --wait prints its metrics."""
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "qdiff.launch", *tiny("quant.method=linear"),
                        f"paths.cache_dir={tmp_path / 'cache'}", "--cluster", "slurm", "-p", "timeout_min=60",
                        "-p", "cpus_per_task=1", "--run-dir", str(run_dir), "--wait"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env())
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"run dir {run_dir}" in r.stdout and '"method": "linear"' in r.stdout and '"quant": "W4A8"' in r.stdout
    status = read_json(run_dir / "status.json")
    assert status["state"] == "completed" and status["job_id"] == f"slurm:{status['slurm_job_id']}"
    assert _sacct_final(status["slurm_job_id"]) == "COMPLETED"
    assert list((run_dir / ".submitit").glob("*/*_log.out"))


@pytest.mark.slow
def test_reconstruction_on_two_slurm_workers_overlaps_and_equals_one_process(tmp_path):
    """``recon.workers=2 recon.launcher=slurm`` from ``python run.py``: the AdaRound and the LSQ phase each run as a
    2-job SLURM array whose jobs sacct shows running at the same time; the quantized model equals a one-process run
    of the same mode (FP inputs)."""
    import torch
    from safetensors.torch import load_file

    slow = tiny("quant.method=qdiff", **{"recon.weight_iters": "60"})
    par = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *slow, "recon.workers=2", "recon.launcher=slurm",
                            "recon.worker_params={cpus_per_task:1,timeout_min:30}", f"hydra.run.dir={tmp_path / 'par'}",
                            f"paths.cache_dir={tmp_path / 'cache_par'}"], cwd=tmp_path, env=env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ref = subprocess.run([sys.executable, str(ROOT / "run.py"), *slow, "recon.input_source=fp",
                          f"hydra.run.dir={tmp_path / 'ref'}", f"paths.cache_dir={tmp_path / 'cache_ref'}"],
                         cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert par.wait(timeout=300) == 0, par.stderr.read()[-3000:]

    m, m_ref = read_json(tmp_path / "par" / "metrics.json"), read_json(tmp_path / "ref" / "metrics.json")
    parallel = m["reconstruction"]["parallel"]
    assert parallel["workers"] == 2 and parallel["input_source"] == "fp"
    jobs = [j["job"] for j in parallel["phases"][0]["jobs"]]
    assert len(jobs) == 2 and all("_" in j for j in jobs)  # one array, two tasks
    rows = _run("sacct", "-j", ",".join(jobs), "-X", "-n", "-P", "-o", "JobID,State,Start,End").splitlines()
    spans = {r.split("|")[0]: r.split("|")[1:] for r in rows}
    assert set(spans) == set(jobs) and all(s[0] == "COMPLETED" for s in spans.values()), rows
    assert max(s[1] for s in spans.values()) <= min(s[2] for s in spans.values()), f"jobs did not overlap: {rows}"
    assert len(parallel["phases"]) == 2 and parallel["phases"][0]["overlap_seconds"] > 0

    a = load_file(str(tmp_path / "par" / "quantized_unet" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "quantized_unet" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "quantized weights differ"
    assert m["fid"] == m_ref["fid"]
