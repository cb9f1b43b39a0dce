"""`python -m pipeline [overrides]`: one Hydra-composed run (or a sweep with --multirun)."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipeline.run import run


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    log_file = Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log"
    run(cfg, overrides=list(hydra_cfg.overrides.task), log_file=log_file)


if __name__ == "__main__":
    main()
