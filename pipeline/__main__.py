"""`python -m pipeline [overrides]`: one Hydra-composed run (or a sweep with --multirun).

Bad input is one ``error:`` line and exit code 2 (pipeline.cli.guard); ``debug=true`` or
``QB_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.cli import guard
from pipeline.run import run


def check_not_a_sweep(hydra_cfg: DictConfig) -> None:
    """A config that defines a sweep (``hydra.sweeper.params``) runs only with --multirun.

    Without it Hydra ignores the sweep and runs the config's defaults (experiment=compare would
    quietly run only ``fp``).
    """
    params = hydra_cfg.sweeper.get("params")
    if hydra_cfg.mode != RunMode.MULTIRUN and params:
        experiment = hydra_cfg.runtime.choices.get("experiment")
        swept = " ".join(f"{key}={value}" for key, value in params.items())
        what = f"experiment {experiment}" if experiment else "this config"
        hint = f" (python -m pipeline --multirun experiment={experiment})" if experiment else ""
        raise ValueError(f"{what} is a sweep over {swept}; run it with --multirun{hint}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()

    def job() -> None:
        check_not_a_sweep(hydra_cfg)
        log_file = Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log"
        run(cfg, overrides=list(hydra_cfg.overrides.task), log_file=log_file)

    # Inside the task function: Hydra would otherwise print its own traceback around the error.
    guard(job, ["debug=true"] if cfg.get("debug") else [])


if __name__ == "__main__":
    main()
