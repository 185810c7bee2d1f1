"""Parallel reconstruction: a plan's independent unit steps spread over ``recon.workers`` submitit jobs.

With FP inputs (``recon.input_source=fp``, or the AdaRound phase of ``fp_then_quantized``) a unit's step needs
nothing from the other units' steps, so the engine hands each run of such steps to :func:`run_parallel`:

    parent   ... weights:u1 .. weights:uN  ->  K jobs (local processes or a SLURM job array)  -> merge -> act_init ...
    job i    for each of its steps: skip it if finished (by any job); else, under the step's lock, run it and
             write its part (state file, then its report: the report is the commit)

A job killed or preempted mid-unit leaves nothing of that unit. Preempted or timed-out SLURM jobs requeue
themselves (submitit checkpointing); a job that ends without finishing its units (killed, node lost) has the
unfinished ones resubmitted, ``recon.worker_retries`` times. No step runs twice: each job checks for the step's
part under the step's lock before it starts. The engine copies every part, in plan order, into its ordered
checkpoints and restores it, so the work folder and the model end exactly as a one-process reconstruction of
the same steps leaves them.

The jobs get the models and the calibration set by submitit's pickle of the job (a stored calibration set
travels as its folder's path). On SLURM the work folder (and a stored calibration set) must be on a disk
every node sees.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from dataclasses import asdict, replace
from pathlib import Path

import submitit
import torch

from qdiff.cache import cache_lock, save_tensors
from qdiff.errors import QDiffError, WorkerError
from qdiff.io import load_state_dict_file, write_json

log = logging.getLogger("qdiff")

#: Seconds between two looks at the jobs while waiting for them.
POLL_SECONDS = 0.5


def worker_id() -> str:
    """Which job and process this is (SLURM job id, or the local job's process id)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    job = job or os.environ.get("SLURM_JOB_ID") or f"local-{os.getpid()}"
    return f"{job}@{socket.gethostname().split('.')[0]}"


class Parts:
    """Step results written by the jobs under ``<work_dir>/parts``, and a log of when each step started/finished."""

    def __init__(self, work_dir: str | os.PathLike) -> None:
        self.root = Path(work_dir) / "parts"

    def _path(self, name: str, suffix: str) -> Path:
        """The step's file: its name made safe for a file system, plus a hash that keeps distinct names distinct."""
        safe = re.sub(r"[^\w.-]", "_", name)
        return self.root / f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}{suffix}"

    def done(self, name: str) -> bool:
        return self._path(name, ".json").is_file()

    def save(self, name: str, state: dict[str, torch.Tensor], report) -> None:
        save_tensors(self._path(name, ".safetensors"), state)
        write_json(self._path(name, ".json"), {"step": name, "report": asdict(report)})

    def load(self, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        rec = json.loads(self._path(name, ".json").read_text())
        return load_state_dict_file(self._path(name, ".safetensors")), rec["report"]

    def remove(self, name: str) -> None:
        for suffix in (".json", ".safetensors", ".lock"):
            self._path(name, suffix).unlink(missing_ok=True)

    def lock(self, name: str):
        return cache_lock(self._path(name, ".lock"), f"reconstruction step {name}")

    def log(self, event: str, name: str) -> None:
        """One line per event, appended (a single small write with O_APPEND: lines of concurrent jobs never mix)."""
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"event": event, "step": name, "worker": worker_id(), "time": time.time()}) + "\n"
        fd = os.open(self.root / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def events(self) -> list[dict]:
        f = self.root / "events.jsonl"
        return [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.is_file() else []


class ShareJob(submitit.helpers.Checkpointable):
    """One job's share of the steps; requeued as is on preemption or time-out (finished steps are skipped)."""

    def __init__(self, ctx, steps: list, work_dir: str, threads: int | None) -> None:
        self.ctx, self.steps, self.work_dir, self.threads = ctx, steps, work_dir, threads

    def __call__(self) -> list[str]:
        if self.threads:
            torch.set_num_threads(self.threads)
        parts, ran = Parts(self.work_dir), []
        for step in self.steps:
            if parts.done(step.name):
                continue
            with parts.lock(step.name):
                if parts.done(step.name):  # another attempt finished it while this one waited
                    continue
                parts.log("start", step.name)
                report = step.run(self.ctx)
                report.worker = worker_id()
                parts.save(step.name, step.state(self.ctx), report)
                parts.log("done", step.name)
                ran.append(step.name)
        return ran


#: An optimisation step's milliseconds ~ a + b * (the unit's FP forward milliseconds at the same batch), fitted on SD
#: v1.4 units on an H200 (experiments/benchmarks/bench_sd_block.py, docs/measurements/sd14_block_h200.json: a 2.06, b 3.31).
STEP_MS = (2.06, 3.31)


def step_costs(ctx, steps: list) -> dict[str, float]:
    """Predicted milliseconds per optimisation step of each step's unit (from one timed FP forward of a
    reconstruction batch): what the shares are balanced on."""
    from qdiff.recon.units import unit_forward_ms

    x, t, cond = ctx.calib.get(ctx.sample_idx[:ctx.cfg.batch_size], ctx.device)
    fwd, _ = unit_forward_ms(ctx.fp_model, sorted({s.unit.name for s in steps}), x, t, cond, ctx.device, repeats=1)
    return {s.name: STEP_MS[0] + STEP_MS[1] * fwd.get(s.unit.name, 0.0) for s in steps}


def split(steps: list, k: int, cost) -> list[list]:
    """``steps`` in ``k`` shares of similar total cost (largest first, each to the lightest share); plan order kept
    inside a share."""
    shares: list[list] = [[] for _ in range(min(k, len(steps)))]
    loads = [0] * len(shares)
    for i in sorted(range(len(steps)), key=lambda i: -cost(steps[i])):
        j = loads.index(min(loads))
        shares[j].append(i)
        loads[j] += cost(steps[i])
    return [[steps[i] for i in sorted(share)] for share in shares if share]


def _threads(cfg) -> int:
    """CPU threads of one job: ``worker_params.cpus_per_task``, else (local) this process's threads shared out."""
    if "cpus_per_task" in cfg.worker_params:
        return int(cfg.worker_params["cpus_per_task"])
    if cfg.launcher == "slurm":
        from qdiff.launch.job import DEFAULT_EXECUTOR_PARAMS

        return int(DEFAULT_EXECUTOR_PARAMS["cpus_per_task"])
    return max(1, torch.get_num_threads() // cfg.workers)


def run_parallel(steps: list, ctx, work_dir: Path, progress: bool = True) -> dict:
    """Run the independent ``steps`` on ``ctx.cfg.workers`` jobs; returns when each has its part (or raises
    :class:`~qdiff.errors.WorkerError`, keeping every finished part). Returns the jobs' accounting."""
    from tqdm.auto import tqdm

    from qdiff.launch.job import make_executor

    cfg, parts = ctx.cfg, Parts(work_dir)
    threads = _threads(cfg)
    costs = step_costs(ctx, steps)
    jobs_info: list[dict] = []
    bar = tqdm(total=len(steps), desc=f"reconstruction on {cfg.workers} {cfg.launcher} workers", unit="step",
               disable=not progress)
    for attempt in range(cfg.worker_retries + 1):
        pending = [s for s in steps if not parts.done(s.name)]
        if not pending:
            break
        shares = split(pending, cfg.workers, lambda s: costs[s.name])
        executor = make_executor(Path(work_dir) / "jobs" / "%j", cfg.launcher,
                                 {"name": f"qdiff-recon-{Path(work_dir).name}", "cpus_per_task": threads,
                                  **cfg.worker_params})
        payloads = [replace(ctx, logger=False, callbacks=[],
                            disk=None if ctx.disk is None else ctx.disk / f"share{i}") for i in range(len(shares))]
        with executor.batch():  # one SLURM job array
            jobs = [executor.submit(ShareJob(p, share, str(work_dir), threads)) for p, share in zip(payloads, shares)]
        log.info("reconstruction: %d steps on %d %s jobs (%s), attempt %d", len(pending), len(jobs), cfg.launcher,
                 ", ".join(j.job_id for j in jobs), attempt + 1)
        while not all(j.done() for j in jobs):
            bar.n = sum(parts.done(s.name) for s in steps)
            bar.refresh()
            time.sleep(POLL_SECONDS)
        for job, share in zip(jobs, shares):
            jobs_info.append({"job": job.job_id, "steps": len(share), "attempt": attempt + 1, "state": job.state})
            error = job.exception()
            if error is not None:
                _raise_if_not_retryable(error, job)
                log.warning("reconstruction job %s ended without finishing its units (%s); %s", job.job_id,
                            _last_line(error), "resubmitting them" if attempt < cfg.worker_retries else "no retries left")
    bar.n = sum(parts.done(s.name) for s in steps)
    bar.close()
    missing = [s.name for s in steps if not parts.done(s.name)]
    if missing:
        raise WorkerError(f"reconstruction: {len(missing)} unit step(s) were not finished by the {cfg.launcher} jobs after "
                          f"{cfg.worker_retries + 1} attempt(s) (first: {missing[0]}; job logs under {Path(work_dir) / 'jobs'}); "
                          "the finished ones are kept: rerun with the same settings to resume")
    return {"jobs": jobs_info, **overlap(parts.events(), [s.name for s in steps])}


def overlap(events: list[dict], names: list[str]) -> dict:
    """From the event log: each worker's busy span over ``names`` and the seconds two or more workers were busy at once."""
    wanted = set(names)
    spans: dict[str, list[float]] = {}
    for e in events:
        if e["step"] in wanted:
            lo, hi = spans.get(e["worker"], [e["time"], e["time"]])
            spans[e["worker"]] = [min(lo, e["time"]), max(hi, e["time"])]
    edges = sorted([(lo, 1) for lo, _ in spans.values()] + [(hi, -1) for _, hi in spans.values()])
    busy, last, both = 0, None, 0.0
    for t, d in edges:
        if busy >= 2 and last is not None:
            both += t - last
        busy, last = busy + d, t
    t0 = min((lo for lo, _ in spans.values()), default=0.0)
    return {"workers_seen": {w: [round(lo - t0, 2), round(hi - t0, 2)] for w, (lo, hi) in spans.items()},
            "overlap_seconds": round(both, 2)}


def _last_line(error: BaseException) -> str:
    lines = [l for l in str(error).strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def _raise_if_not_retryable(error: BaseException, job) -> None:
    """A job that raised one of qdiff's input/data errors fails the same way again: say it, don't resubmit."""
    last = _last_line(error)
    if isinstance(error, QDiffError) or re.match(r"qdiff\.errors\.\w+Error: ", last):
        raise WorkerError(f"reconstruction job {job.job_id} failed: {last.removeprefix('qdiff.errors.')} "
                          f"(log: {job.paths.stderr})") from None
