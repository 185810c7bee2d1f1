"""``python -m qdiff.launch [options] <hydra overrides>``: submit one qdiff run with submitit (see qdiff.launch)."""
from __future__ import annotations

import argparse
import json
import sys

import yaml


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qdiff.launch", description=__doc__)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py (e.g. quant=w4a8 quant.method=qdiff)")
    p.add_argument("--cluster", choices=["slurm", "local", "debug"], default=None,
                   help="submitit executor (default: slurm when sbatch exists, else local)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="submitit executor parameter, e.g. timeout_min=600, gpus_per_node=1, slurm_partition=gpu")
    p.add_argument("--folder", default=None, help="submitit folder (default <run dir>/.submitit/%%j)")
    p.add_argument("--run-dir", default=None, help="run directory (default: hydra.run.dir, resolved now)")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its FID/IS")
    a = p.parse_args(argv)
    params = {}
    for kv in a.param:
        if "=" not in kv:
            p.error(f"--param needs KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        params[k] = yaml.safe_load(v)

    from qdiff.launch import submit

    job, run_dir = submit(a.overrides, params, cluster=a.cluster, folder=a.folder, run_dir=a.run_dir)
    print(f"submitted job {job.job_id}; run dir {run_dir}", flush=True)
    if not a.wait:
        return 0
    m = job.result()
    print(json.dumps({k: m.get(k) for k in ("model", "method", "quant", "fid", "is", "is_std")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
