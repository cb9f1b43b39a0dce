"""MLflow: where runs go, what every run records about its origin, and checks before work starts."""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

import filelock
import mlflow
import requests
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from pipeline.data import corpus_source

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
DEFAULT_STORE = REPO / "mlruns"
PACKAGES = (
    "torch",
    "transformers",
    "mlflow",
    "hydra-core",
    "optuna",
    "lm_eval",
    "safetensors",
    "compressed-tensors",
    "gguf",
)
# What our experiments are (model training, not GenAI) for MLflow's API and UIs that read it. The
# 3.17 UI decides by its own GenAI | Model training switch instead (make ui prints the link for it).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def tracking_uri(cfg: Mapping) -> str:
    """Config first, then MLFLOW_TRACKING_URI, then sqlite under mlruns/."""
    return cfg.get("uri") or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE / 'mlflow.db'}"


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create the MLflow store folder {folder}: {e}") from e
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"the MLflow store folder {folder} is not writable; set tracking.uri elsewhere")


# tracking.http keys -> MLflow's client variables (read on every request, so set before the first).
HTTP_ENV = {
    "max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "backoff_jitter": "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
    "timeout_s": "MLFLOW_HTTP_REQUEST_TIMEOUT",
}
HTTP_DEFAULTS = {"max_retries": 5, "backoff_factor": 2, "backoff_jitter": 1.0, "timeout_s": 30}


def retry_budget_s(http: Mapping) -> float:
    """Longest outage one request rides out: urllib3 waits 0, then backoff_factor * 2^k s (k = 1..retries-1),
    each plus up to backoff_jitter s; the timeouts of attempts that hang come on top."""
    retries, factor = int(http["max_retries"]), float(http["backoff_factor"])
    return sum(min(120.0, factor * 2**k) for k in range(1, retries))


def configure_http(http: Mapping | None) -> dict[str, str]:
    """Set MLflow's HTTP retry variables from ``tracking.http`` (missing keys: HTTP_DEFAULTS); return them."""
    settings = {**HTTP_DEFAULTS, **(http or {})}
    unknown = set(settings) - set(HTTP_ENV)
    if unknown:
        raise ValueError(f"tracking.http: unknown key(s) {sorted(unknown)}; allowed: {sorted(HTTP_ENV)}")
    if not 0 <= int(settings["max_retries"]) <= 10:
        raise ValueError(f"tracking.http.max_retries must be 0..10 (MLflow's limit), got {settings['max_retries']}")
    if not 0 <= int(settings["backoff_factor"]) <= 120:
        raise ValueError(f"tracking.http.backoff_factor must be 0..120 s, got {settings['backoff_factor']}")
    if int(settings["timeout_s"]) < 1:
        raise ValueError(f"tracking.http.timeout_s must be at least 1, got {settings['timeout_s']}")
    env = {HTTP_ENV[key]: str(value) for key, value in settings.items()}
    os.environ.update(env)
    return env


def _create_tables_once(db: Path) -> None:
    """Create a new sqlite store's tables in one process at a time: parallel jobs (a launcher's) that
    open a new store together race in MLflow's migrations (seen: table _alembic_tmp_experiments already exists)."""
    with filelock.FileLock(db.parent / f"{db.name}.lock"):  # released by the OS if its holder dies
        mlflow.MlflowClient().search_experiments(max_results=1)


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """A tracking server must answer its /health endpoint now, before any work (no retries)."""
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as e:
        raise ConnectionError(
            f"MLflow tracking server {uri} is not usable: it does not answer ({type(e).__name__}); start it "
            f"(python -m pipeline.services up) or set tracking.uri to one that runs"
        ) from e


def connect(uri: str | None = None, http: Mapping | None = None) -> Path | None:
    """Point MLflow at the store; return the artifact root of a local sqlite store.

    Raises before any work if the local store is unwritable or a tracking server does not answer.
    A server's requests then retry with bounded backoff (``http``: tracking.http).
    """
    uri = tracking_uri({"uri": uri})
    artifact_root = None
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        _check_writable(db.parent)
        artifact_root = (db.parent / "artifacts").resolve()
        _check_writable(artifact_root)
        mlflow.set_tracking_uri(uri)
        _create_tables_once(db)
    elif uri.startswith(("http://", "https://")):
        check_server(uri)
        env = configure_http(http)
        log.info(
            "tracking server %s answers; a request retries for up to ~%.0f s (%s)",
            uri,
            retry_budget_s({**HTTP_DEFAULTS, **(http or {})}),
            env,
        )
    mlflow.set_tracking_uri(uri)
    return artifact_root


def setup(cfg: Mapping) -> str:
    """Connect, check the store answers, and return the id of ``cfg.experiment`` (created once)."""
    artifact_root = connect(cfg.get("uri"), cfg.get("http"))
    return _experiment_id(cfg["experiment"], artifact_root)


def _experiment_id(name: str, artifact_root: Path | None) -> str:
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            location = (artifact_root / name).as_uri() if artifact_root else None
            try:
                return mlflow.create_experiment(
                    name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            except MlflowException as e:  # parallel jobs (a launcher, workers): another one created it first
                if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
                experiment = mlflow.get_experiment_by_name(name)
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # created before the tag existed
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    except MlflowException as e:
        raise ConnectionError(f"MLflow tracking store {mlflow.get_tracking_uri()} is not usable: {e}") from e
    return experiment.experiment_id


def log_dataset(tokens: torch.Tensor, context: str, data_cfg: Mapping) -> None:
    """Record the tokens a run used (``context``: calibration or evaluation) as an MLflow dataset input:
    the corpus name, where it comes from, and a digest of the exact tokens (equal digests, same data)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    corpus = data_cfg[context]["corpus"]
    uri = corpus_source(corpus, data_cfg["corpora"])
    if uri.startswith("file://"):
        with warnings.catch_warnings():  # two registered local sources both claim file URIs; either is right
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)
    else:
        spec = data_cfg["corpora"][corpus]
        source = HuggingFaceDatasetSource(path=uri, config_name=spec.get("name"), split=spec.get("split"))
    digest = hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
    dataset = MetaDataset(source, name=f"{corpus}-{context}", digest=digest)
    mlflow.log_input(dataset, context=context, tags={"tokens": str(tokens.numel())})


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} for mlflow.log_params."""
    flat = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def provenance() -> dict[str, str]:
    """Code, packages and hardware behind a run."""
    info = {
        "git.commit": _git("rev-parse", "HEAD"),
        "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))),
        "host.python": platform.python_version(),
        "host.platform": platform.platform(),
        "host.cpu_count": str(os.cpu_count()),
        "host.name": platform.node(),
        "host.pid": str(os.getpid()),  # which process ran it (a launcher's or tuning worker's job)
        "host.processor": _cpu_model(),
        **gpu_provenance(),
    }
    for package in PACKAGES:
        try:
            info[f"pkg.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[f"pkg.{package}"] = "not installed"
    return info


def gpu_provenance() -> dict[str, str]:
    """GPU name, count, driver and CUDA runtime where torch sees a GPU (``host.gpu*``); {} otherwise."""
    if not torch.cuda.is_available():
        return {}
    info = {
        "host.gpu": torch.cuda.get_device_name(0),
        "host.gpu_count": str(torch.cuda.device_count()),
        "host.cuda": str(torch.version.cuda),
        "host.gpu_driver": "unknown",
    }
    try:  # the driver version is NVML's to say (nvidia-ml-py, as for energy)
        import pynvml
    except ImportError:
        info["host.gpu_driver"] = "unknown (nvidia-ml-py not installed)"
        return info
    try:
        pynvml.nvmlInit()
        info["host.gpu_driver"] = str(pynvml.nvmlSystemGetDriverVersion())
    except pynvml.NVMLError as error:
        info["host.gpu_driver"] = f"unknown (NVML: {error})"
    return info


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
