"""What a run ships: the content hash of its quantized weights, and (``tracking.log_model``) the
checkpoint itself as an MLflow logged model, optionally registered in the Model Registry.

The hash (tag ``weights_sha256``) is logged on every quantized run: two runs with the same hash
hold the same weights, and ``pipeline.export`` checks a rebuilt checkpoint against it.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import mlflow
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from torch import nn

from pipeline import checkpoint, device, tracking

log = logging.getLogger(__name__)

HASH_TAG = "weights_sha256"
MODEL_NAME = "quantized"  # the logged model's name in the run (the Models column)
LOG_MODEL_CHOICES = (True, False, "auto")


def should_log_model(tracking_cfg: Mapping, checkpoint_bytes: int) -> bool:
    """``tracking.log_model``: true, false, or auto (on when the checkpoint is at most ``log_model_max_mb``)."""
    choice = tracking_cfg.get("log_model", "auto")
    if choice not in LOG_MODEL_CHOICES:
        raise ValueError(f"tracking.log_model must be true, false or auto, got {choice!r}")
    if choice == "auto":
        return checkpoint_bytes <= float(tracking_cfg["log_model_max_mb"]) * 2**20
    return bool(choice)


def check_tracking(tracking_cfg: Mapping) -> None:
    """The shipping keys of ``tracking``, checked before any work."""
    should_log_model(tracking_cfg, 0)
    name = tracking_cfg.get("register_model")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"tracking.register_model must be a model name or null, got {name!r}")
    if name and tracking_cfg.get("log_model") is False:
        raise ValueError("tracking.register_model needs a logged checkpoint; it is set but tracking.log_model=false")


def checkpoint_info(container: Mapping, model_path: str, run_id: str | None) -> dict:
    """The manifest fields a run knows: base model, method, layers, run id, code version."""
    provenance = tracking.provenance()
    model_cfg = container["model"]
    return {
        "base_model": {
            "name": model_cfg["name"],
            "source": model_cfg["source"],
            "path": model_path,
            # concrete (a run's config is resolved already; a bare composed one may still say auto)
            "dtype": device.resolve_dtype(model_cfg["dtype"], device.resolve_device(container.get("device", "cpu"))),
            "trust_remote_code": bool(model_cfg.get("trust_remote_code", False)),
        },
        "method": container["method"],
        "layers": container["layers"],
        "kernels": container["kernels"],
        "seed": container["seed"],
        "run_id": run_id,
        "code": {"git_commit": provenance["git.commit"], "git_dirty": provenance["git.dirty"] == "True"},
    }


def tag_hash(model: nn.Module) -> dict[str, float]:
    """Tag the active run with its weights' content hash; the time it took and the checkpoint's size."""
    start = time.perf_counter()
    tensors, _ = checkpoint.model_tensors(model)
    mlflow.set_tag(HASH_TAG, checkpoint.weights_sha256(tensors))
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"hash_s": time.perf_counter() - start, "checkpoint_mb": size / 2**20}


def ship(model: nn.Module, container: Mapping, model_path: str, run_id: str, metrics: Mapping) -> dict[str, float]:
    """Log the checkpoint if ``tracking.log_model`` says so (at the end of a run, so that a registered
    version carries every metric); the time it took, or nothing."""
    tracking_cfg = container["tracking"]
    size = checkpoint.checkpoint_bytes(model)
    if not should_log_model(tracking_cfg, size):
        log.info("checkpoint not logged (%.0f MiB; tracking.log_model=%s)", size / 2**20, tracking_cfg["log_model"])
        return {}
    start = time.perf_counter()
    model_id = log_checkpoint(model, checkpoint_info(container, model_path, run_id), run_id, tracking_cfg, metrics)
    elapsed = time.perf_counter() - start
    log.info("logged checkpoint as model %s (%.0f MiB, %.1f s)", model_id, size / 2**20, elapsed)
    return {"log_model_s": elapsed}


def log_checkpoint(model: nn.Module, info: dict, run_id: str, tracking_cfg: Mapping, metrics: Mapping) -> str:
    """Save the checkpoint, log it as a logged model of the run (READY only once every file is in);
    register a version when ``tracking.register_model`` names one. Returns the model id."""
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(
        experiment_id, name=MODEL_NAME, source_run_id=run_id, model_type="quantbench-checkpoint"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="qb-checkpoint-") as tmp:
            manifest = checkpoint.save_checkpoint(model, Path(tmp) / "checkpoint", info)
            client.log_model_artifacts(logged.model_id, str(Path(tmp) / "checkpoint"))
        client.set_logged_model_tags(logged.model_id, {HASH_TAG: manifest["weights_sha256"]})
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.log_outputs(run_id, [LoggedModelOutput(model_id=logged.model_id, step=0)])
    name = tracking_cfg.get("register_model")
    if name:
        tags = {k: f"{v:.6g}" for k, v in metrics.items()}
        version = mlflow.register_model(
            f"models:/{logged.model_id}", name, tags={**tags, HASH_TAG: manifest["weights_sha256"]}
        )
        mlflow.set_tag("registered_model", f"{name}/{version.version}")
    return logged.model_id


def find_logged_checkpoint(run_id: str) -> str | None:
    """The READY checkpoint model a run logged, or None."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    for output in run.outputs.model_outputs if run.outputs else []:
        model = client.get_logged_model(output.model_id)
        if model.name == MODEL_NAME and model.status == LoggedModelStatus.READY:
            return model.model_id
    return None
