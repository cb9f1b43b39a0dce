"""A tuning worker for the shared-study tests: ``python tests/tune_worker.py [Hydra overrides]``.

It is ``python -m pipeline.tune`` with a stand-in trial: each trial is a real MLflow child run that logs
a metric every ``QB_TRIAL_STEP_S`` seconds for ``QB_TRIAL_STEPS`` steps, then a KL computed from the
sampled settings, instead of quantizing and evaluating a model. Storage, MLflow, heartbeat, locks and
processes are the real ones; only the trial's work is cheap, so a fault test can kill or restart things
mid-trial within seconds.

``QB_START=<path>``: with its imports done, write ``<path>.<pid>.ready`` and wait for ``<path>`` to
appear: the test creates it once every worker is ready, so that they start at the same instant.
``QB_JOIN_ONLY=1``: open the study and join it (rank, seed, parent run), print them as JSON, run no trial.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib
from pathlib import Path

import mlflow

from pipeline import run, tune


def stand_in_run(cfg, experiment_id, name, tags, model_path, log_file=None, probe=None) -> dict:
    steps, step_s = int(os.environ.get("QB_TRIAL_STEPS", "4")), float(os.environ.get("QB_TRIAL_STEP_S", "0.5"))
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags, nested=True) as active:
        for step in range(steps):
            mlflow.log_metric("progress", step, step=step)
            time.sleep(step_s)
        settings = json.dumps(tune.OmegaConf.to_container(cfg.method, resolve=True), sort_keys=True)
        kl = 0.01 + (zlib.crc32(settings.encode()) % 1000) / 1e5  # the same settings give the same value
        mlflow.log_metric("kl_vs_ref", kl)
    return {"kl_vs_ref": kl, "run_id": active.info.run_id}


def main(overrides: list[str]) -> None:
    run.tracked_run = stand_in_run
    start = os.environ.get("QB_START")
    if start:
        Path(f"{start}.{os.getpid()}.ready").touch()
        while not Path(start).exists():
            time.sleep(0.005)
    if os.environ.get("QB_JOIN_ONLY"):
        _, study, parent_id, _, _, (rank, seed) = tune.setup_study(overrides, join=True)
        print(json.dumps({"study_id": study._study_id, "parent": parent_id, "rank": rank, "seed": seed}))
        return
    tune.main(overrides)


if __name__ == "__main__":
    main(sys.argv[1:])
