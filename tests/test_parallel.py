"""Parallel reconstruction (``recon.workers``, qdiff/recon/parallel.py) with local submitit jobs: the merged result
equals one process's, a worker killed mid-unit has its unfinished units redone and nothing twice, bad settings
are one line. (SLURM: tests/test_orchestration_slurm.py.)"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import cloudpickle
import pytest
import torch

import tiny_unet
from qdiff.errors import ConfigError
from qdiff.recon import ReconConfig, reconstruct
from qdiff.recon.parallel import Parts, split
from recon_job import setup

# The jobs unpickle the test's TinyUNet: send its class by value (it is not importable from the job's process).
cloudpickle.register_pickle_by_value(tiny_unet)


def _state(q) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in q.state_dict().items()}


def test_parallel_settings_are_checked_and_leave_the_result_identity_alone(tmp_path):
    with pytest.raises(ConfigError, match="recon.workers must be an integer >= 1"):
        ReconConfig(workers=0)
    with pytest.raises(ConfigError, match="recon.launcher must be local or slurm"):
        ReconConfig(workers=2, launcher="pbs")
    with pytest.raises(ConfigError, match="recon.worker_params must be a mapping"):
        ReconConfig(workers=2, worker_params="cpus_per_task=1")
    with pytest.raises(ConfigError, match="recon.input_source must be one of"):
        ReconConfig(input_source="fp16")
    # the paper's sequential mode cannot run in parallel: workers > 1 takes FP inputs (the measured choice)
    cfg = ReconConfig(workers=2)
    assert cfg.input_source == "fp" and (cfg.source("weights"), cfg.source("acts")) == ("fp", "fp")
    refine = ReconConfig(workers=2, input_source="fp_then_quantized")
    assert (refine.source("weights"), refine.source("acts")) == ("fp", "quantized")
    # how many workers and where is not part of what a reconstruction is: a folder resumes under either
    one, two = ReconConfig(input_source="fp"), ReconConfig(input_source="fp", workers=2, launcher="slurm")
    assert one.result_settings() == two.result_settings()
    net, q, calib, qcfg, rcfg = setup(iters=4)
    with pytest.raises(ConfigError, match="needs a work_dir"):
        reconstruct(net, q, calib, qcfg, dataclasses.replace(rcfg, workers=2), progress=False)


def test_shares_balance_cost_and_keep_plan_order():
    cost = {"a": 5, "b": 1, "c": 1, "d": 4, "e": 1, "f": 1}
    assert split(list("abcdef"), 2, cost=cost.get) == [["a", "c", "f"], ["b", "d", "e"]]  # loads 7 and 6
    assert split(list("ab"), 5, cost=lambda _: 1) == [["a"], ["b"]]


@pytest.mark.slow
def test_killed_worker_is_resubmitted_nothing_runs_twice_and_the_merge_equals_one_process(tmp_path):
    iters = 150
    # reference: the same steps in this process (one thread, as each worker)
    net, q_ref, calib, qcfg, rcfg = setup(iters)
    rcfg = dataclasses.replace(rcfg, input_source="fp_then_quantized")
    reconstruct(net, q_ref, calib, qcfg, rcfg, work_dir=tmp_path / "ref", progress=False)
    ref = _state(q_ref)

    net, q, calib, qcfg, _ = setup(iters)
    work = tmp_path / "w"
    parts = Parts(work)
    killed: dict = {}

    def kill_one_mid_unit() -> None:  # once one unit is finished, kill a worker in the middle of its next unit
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            events = parts.events()
            finished = {e["step"] for e in events if e["event"] == "done"}
            running = [e for e in events if e["event"] == "start" and e["step"] not in finished]
            if finished and running:
                victim = running[-1]
                os.kill(int(victim["worker"].split("@")[0].removeprefix("local-")), signal.SIGKILL)
                killed.update(victim)
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_one_mid_unit, daemon=True)
    watcher.start()
    cfg = dataclasses.replace(rcfg, workers=2, launcher="local", worker_params={"cpus_per_task": 1})
    rep = reconstruct(net, q, calib, qcfg, cfg, work_dir=work, progress=False)
    watcher.join(timeout=5)
    assert killed, "a worker must have been killed mid-unit"

    # the killed unit ran again in a resubmitted job; every unit finished exactly once
    phase = rep["parallel"]["phases"][0]
    assert max(j["attempt"] for j in phase["jobs"]) == 2
    events = [e for e in parts.events()]
    done = [e["step"] for e in events if e["event"] == "done"]
    assert sorted(done) == sorted(set(done)) and len(done) == phase["steps"]
    starts = [e for e in events if e["event"] == "start" and e["step"] == killed["step"]]
    assert len(starts) == 2 and starts[0]["worker"] != starts[1]["worker"]
    # the AdaRound phase ran on 2 jobs at once; the LSQ phase (quantized inputs) ran here, in order
    assert phase["overlap_seconds"] > 0 and len(rep["parallel"]["phases"]) == 1
    assert {s["step"].split(":")[0] for s in rep["steps"] if s["worker"]} == {"weights"}
    # merged: bit-identical to the one-process reconstruction; the parts were taken over into the checkpoints
    state = _state(q)
    assert [k for k in ref if not torch.equal(ref[k], state[k])] == []
    assert not list(parts.root.glob("*.safetensors"))

    # the folder now resumes like any finished reconstruction, with or without workers
    net, q2, calib, qcfg, _ = setup(iters)
    again = reconstruct(net, q2, calib, qcfg, rcfg, work_dir=work, progress=False)
    assert again["resumed_steps"] == len(again["steps"])
    assert all(torch.equal(ref[k], v) for k, v in q2.state_dict().items())
