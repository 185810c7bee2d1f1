"""Submit qdiff runs from Python with submitit: SLURM, local background processes, or in-process debug.

    from qdiff.launch import submit
    job, run_dir = submit(["quant=w4a8", "quant.method=qdiff"], {"slurm_partition": "gpu", "gpus_per_node": 1})
    metrics = job.result()          # the run's metrics.json as a dict

or from a shell: ``python -m qdiff.launch quant=w4a8 quant.method=qdiff --cluster slurm -p gpus_per_node=1 --wait``.
Sweeps go through Hydra instead: ``python run.py -m hydra/launcher=slurm experiment=table2_digits``.
"""
from qdiff.launch.job import CONF_DIR, DEFAULT_EXECUTOR_PARAMS, QDiffJob, resolve_run_dir, submit

__all__ = ["CONF_DIR", "DEFAULT_EXECUTOR_PARAMS", "QDiffJob", "resolve_run_dir", "submit"]
