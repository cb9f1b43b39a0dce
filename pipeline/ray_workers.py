"""Tuning workers as Ray tasks (``tune.engine=ray``): one task per worker, its CPU/GPU share declared.

The driver (``python -m pipeline.tune ... tune.engine=ray``) opens the study and its MLflow parent run
first, so that the tasks find them, then starts ``tune.workers`` tasks on the cluster at
``tune.ray.address``. Each task runs ``pipeline.tune.tune`` on the same storage URL and tracking URI
with its own sampler seed. Every node needs this repository at the same path and its environment
(the tasks import ``pipeline`` from it), and must reach the storage and the tracking server.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import ray
import torch
from omegaconf import DictConfig

from pipeline.tracking import REPO

log = logging.getLogger("pipeline.tune")
# The driver's variables that go with each task: the cache folder, Hugging Face's and MLflow's settings.
FORWARDED_ENV = ("QUANTBENCH_", "HF_", "MLFLOW_")


def check(ray_cfg: Mapping) -> None:
    if not float(ray_cfg["num_cpus"]) > 0:
        raise ValueError(f"tune.ray.num_cpus must be > 0 (a worker's CPU share), got {ray_cfg['num_cpus']}")
    if float(ray_cfg["num_gpus"]) < 0:
        raise ValueError(f"tune.ray.num_gpus must be >= 0 (a worker's GPU share), got {ray_cfg['num_gpus']}")


def connect(ray_cfg: Mapping) -> None:
    """Join the cluster at ``address``, or start a Ray instance on this machine when it is null."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    runtime_env = {"env_vars": {**env, "PYTHONPATH": str(REPO)}}
    address = ray_cfg["address"]
    if address not in (None, "auto") and not str(address).startswith("ray://"):
        _check_answers(str(address))
    try:
        if address is None:
            ray.init(
                object_store_memory=int(ray_cfg["object_store_mb"]) * 2**20,
                include_dashboard=False,
                runtime_env=runtime_env,
            )
        else:
            ray.init(address=str(address), runtime_env=runtime_env)
    except ConnectionError as e:
        raise ConnectionError(f"no Ray cluster answers at tune.ray.address={address}: {e}") from e


def _check_answers(address: str, timeout_s: float = 5.0) -> None:
    """A cluster's GCS must take a connection now: ray.init would otherwise retry for minutes."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise ConnectionError(
            f"no Ray cluster answers at tune.ray.address={address} ({e}); give the head's host:port "
            f"(ray start --head prints it), auto, or null for a Ray instance on this machine"
        ) from e


def check_fits(ray_cfg: Mapping) -> None:
    """A task whose share no node has would wait for ever: refuse it before any trial."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    for resource, key in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        want = float(ray_cfg[key])
        most = max((n.get(resource, 0.0) for n in nodes), default=0.0)
        if want > most:
            raise ValueError(
                f"tune.ray.{key}={want:g} but the largest node of the Ray cluster has {most:g} {resource}(s); "
                f"ask for at most that"
            )


@ray.remote
def tune_worker(overrides: list[str], num_threads: int) -> dict:
    """One worker: ``pipeline.tune.tune`` on the shared study; where it ran and which trials it took."""
    from pipeline import tune  # in the task's process, from the repository on its node

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    torch.set_num_threads(num_threads)  # its declared share, not every core of the node
    study = tune.tune(overrides)
    me = f"{socket.gethostname()}:{os.getpid()}"
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "worker": me,
        "trials": [t.number for t in study.trials if t.user_attrs.get("worker") == me],
    }


def run(cfg: DictConfig, workers: int, overrides: list[str]) -> list[dict]:
    """Check the share fits the cluster, open the study and its parent run once, then ``workers`` tasks on it;
    each task's summary."""
    from pipeline import tune

    ray_cfg = {key: cfg.tune.ray[key] for key in cfg.tune.ray}
    check(ray_cfg)
    connect(ray_cfg)
    try:
        check_fits(ray_cfg)
        cfg, *_ = tune.setup_study(overrides)  # here, not in each task: they would race to create it
        own = [o for o in overrides if not o.startswith(("tune.workers=", "tune.engine="))]
        threads = max(1, int(float(ray_cfg["num_cpus"])))
        refs = [
            tune_worker.options(num_cpus=float(ray_cfg["num_cpus"]), num_gpus=float(ray_cfg["num_gpus"])).remote(
                # each task samples with tune.sampler_seed + its rank in the study (join_study), as local workers
                [*own, "tune.workers=1", "tune.engine=local"],
                threads,
            )
            for _ in range(workers)
        ]
        results = ray.get(refs)
    finally:
        ray.shutdown()
    for rank, result in enumerate(results):
        print(f"ray worker {rank}: node {result['node']} {result['worker']} trials {result['trials']}", flush=True)
    return results
