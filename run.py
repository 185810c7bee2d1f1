"""qdiff entry point: ``python run.py model=digits quant=w4a8`` (see README and conf/)."""
import os

import hydra
from omegaconf import DictConfig

from qdiff.resolvers import register_resolvers

register_resolvers()  # before Hydra composes: conf/quant/w4a4.yaml uses qdiff_for


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from qdiff.cli import main as run_job

    return run_job(cfg)


if __name__ == "__main__":
    # paths.root_dir (conf/paths/default.yaml); jobs on SLURM or submitit inherit it with the environment.
    os.environ["QDIFF_RUN_CWD"] = os.getcwd()
    main()
