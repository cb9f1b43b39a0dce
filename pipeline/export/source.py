"""The quantized model behind an MLflow run: its logged checkpoint, or a rebuild from its logged config.

A rebuild runs the run's own quantize stage (``pipeline.run.quantize_stage``) on the same base model,
data and seed, and must reproduce the run's ``weights_sha256``; a mismatch is an error, not a warning.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf
from torch import nn

from pipeline import checkpoint, shipping, steps

log = logging.getLogger(__name__)


@dataclass
class RunModel:
    model: nn.Module
    container: dict  # the run's resolved config
    info: dict  # manifest fields (base model, method, run id, code)
    digest: str
    origin: str  # "logged checkpoint <model id>" or "rebuilt from the logged config"


def find_run(run_id: str):
    """The finished run ``run_id``, or an error that says what is wrong with it."""
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"no run {run_id!r} in the MLflow store {mlflow.get_tracking_uri()} ({e.error_code})") from e
    status = run.info.status
    if status != "FINISHED":
        what = "is still running" if status == "RUNNING" else f"ended {status}"
        raise ValueError(f"run {run_id} {what}: only a finished run's weights are what its metrics describe")
    return run


def run_config(run_id: str) -> dict:
    """The run's resolved config (its logged config.yaml)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml", dst_path=tmp)
        except MlflowException as e:
            raise ValueError(f"run {run_id} has no config.yaml artifact, so it cannot be rebuilt: {e}") from e
        container = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    container["method"] = steps.with_steps(container["method"])  # a run from before method.steps
    if not steps.quantizes(container["method"]):
        raise ValueError(
            f"run {run_id} is the float reference (method {container['method']['name']}): nothing quantized"
        )
    return container


def load_run_model(run, container: dict) -> RunModel:
    """The run's logged checkpoint if it has one, else a rebuild checked against its hash."""
    run_id = run.info.run_id
    expected = run.data.tags.get(shipping.HASH_TAG)
    model_id = shipping.find_logged_checkpoint(run_id)
    if model_id is not None:
        with tempfile.TemporaryDirectory(prefix="qb-download-") as tmp:
            folder = mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=tmp)
            loaded = checkpoint.load_checkpoint(Path(folder))
        digest = loaded.manifest["weights_sha256"]
        info = {k: loaded.manifest[k] for k in ("base_model", "method", "layers", "kernels", "seed", "run_id", "code")}
        return RunModel(loaded.model, container, info, digest, f"logged checkpoint {model_id}")
    model, model_path = rebuild(container)
    digest = checkpoint.model_sha256(model)
    if expected is None:
        log.warning(
            "run %s logged no %s (older than it): the rebuilt weights cannot be checked", run_id, shipping.HASH_TAG
        )
    elif digest != expected:
        raise ValueError(
            f"rebuilding run {run_id} from its config gave different weights ({shipping.HASH_TAG} {digest[:12]}, "
            f"the run logged {expected[:12]}): code or data changed since (the run's code: "
            f"{run.data.params.get('git.commit', '?')[:10]}, dirty={run.data.params.get('git.dirty', '?')})"
        )
    info = shipping.checkpoint_info(container, model_path, run_id)
    return RunModel(model, container, info, digest, "rebuilt from the logged config")


def rebuild(container: dict) -> tuple[nn.Module, str]:
    """The run's quantized model, from its config: base model, calibration data, seed, quantize stage."""
    from pipeline.data import calibration_batches
    from pipeline.load import load_model, resolve_model_path
    from pipeline.run import quantize_stage

    model, tokenizer = load_model(container["model"])
    log.info("rebuilding: quantizing %s with %s", container["model"]["name"], container["method"]["name"])
    quantize_stage(
        model,
        container,
        lambda: calibration_batches(tokenizer, container["data"]),
        int(container["seed"]),
        container["kernels"],
        record=lambda _: None,
        log_step=lambda *_: None,
    )
    return model, resolve_model_path(container["model"])
