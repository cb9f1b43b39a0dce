"""The team setup for real: PostgreSQL databases and an MLflow server on them (pipeline.services), a run that
rides out the server's restart, a server down at start refused before any work, tuning workers as Ray tasks."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import psycopg
import pytest
from conftest import tiny_llama

from pipeline import services

REPO = Path(__file__).resolve().parent.parent
ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_answers() -> bool:
    try:
        psycopg.connect(ADMIN, connect_timeout=3).close()
    except psycopg.OperationalError:
        return False
    return True


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """pipeline.services up on a free port with databases of this test session; down and dropped after."""
    if not postgres_answers():
        pytest.skip(f"PostgreSQL does not answer at {ADMIN} (the team-setup tests need it)")
    tmp = tmp_path_factory.mktemp("services")
    tag = uuid.uuid4().hex[:8]
    cfg = services.load_config(
        [
            f"services.optuna_db=qb_test_{tag}_optuna",
            f"services.mlflow_db=qb_test_{tag}_mlflow",
            f"services.mlflow.port={free_port()}",
            f"services.mlflow.artifacts={tmp / 'artifacts'}",
            f"services.state_dir={tmp / 'state'}",
        ]
    )
    services.up(cfg)
    yield cfg
    services.down(cfg)
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        for name in (cfg.services.optuna_db, cfg.services.mlflow_db):
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_up_creates_the_databases_serves_runs_and_prints_each_workers_overrides(stack, capsys):
    assert services.status(stack)
    printed = capsys.readouterr().out
    storage = f"tune.storage=postgresql+psycopg://postgres@127.0.0.1:5432/{stack.services.optuna_db}"
    assert storage in printed and f"tracking.uri=http://127.0.0.1:{stack.services.mlflow.port}" in printed
    assert services.up(stack)[0] == storage  # a second up finds both and starts nothing
    assert "already answers" in capsys.readouterr().out
    # the server keeps runs in PostgreSQL and proxies their artifacts into its own folder
    mlflow.set_tracking_uri(services.server_url(stack))
    with mlflow.start_run(experiment_id=mlflow.create_experiment(f"e{uuid.uuid4().hex[:6]}")) as run:
        mlflow.log_metric("m", 1.0)
        mlflow.log_text("hello", "note.txt")
    assert list(Path(stack.services.mlflow.artifacts).rglob("note.txt"))
    with psycopg.connect(services._libpq(services.database_url(ADMIN, stack.services.mlflow_db))) as conn:
        assert conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,)).fetchone() == (
            "FINISHED",
        )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("model") / "m"
    tiny_llama(vocab_size=len(tokenizer), seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _pipeline_args(tiny_model: Path, uri: str, *overrides: str) -> list[str]:
    """``python -m pipeline`` on the tiny model with a small protocol, logging to ``uri``."""
    return [
        sys.executable,
        "-m",
        "pipeline",
        "model=hf",
        f"model.path={tiny_model}",
        "method=group_wise",
        "eval.tokens=512",
        "eval.context=64",
        "eval.stride=64",
        "eval.kl_tokens=128",
        "eval.generation.new_tokens=2",
        "tracking.log_model=false",
        "profile.enabled=false",
        f"tracking.uri={uri}",
        f"hydra.run.dir={tiny_model.parent / uuid.uuid4().hex[:6]}",
        *overrides,
    ]


def _env(tiny_model: Path) -> dict:
    return {**os.environ, "QUANTBENCH_CACHE": str(tiny_model.parent / "cache")}


def _pipeline(tiny_model: Path, uri: str, *overrides: str) -> subprocess.Popen:
    args = _pipeline_args(tiny_model, uri, *overrides)
    return subprocess.Popen(
        args, cwd=REPO, env=_env(tiny_model), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _kill_server(cfg) -> None:
    """SIGKILL the server's process group: a crash, not a shutdown."""
    pid = int((Path(cfg.services.state_dir) / "mlflow.pid").read_text())
    os.killpg(pid, signal.SIGKILL)
    while services.answers(services.server_url(cfg), timeout_s=0.5):
        time.sleep(0.1)


@pytest.mark.slow  # ~65 s: a tiny run, the server killed and started again mid-way
def test_a_run_rides_out_a_server_restart_and_finishes_with_every_metric(stack, tiny_model):
    uri = services.server_url(stack)
    experiment = f"restart{uuid.uuid4().hex[:6]}"
    # 5 retries, factor 1: the client waits up to 2+4+8+16 = 30 s; the restart takes ~6-10 s
    run = _pipeline(
        tiny_model,
        uri,
        f"tracking.experiment={experiment}",
        "tracking.http.max_retries=5",
        "tracking.http.backoff_factor=1",
    )
    mlflow.set_tracking_uri(uri)
    deadline = time.monotonic() + 120
    while mlflow.get_experiment_by_name(experiment) is None or not mlflow.search_runs(
        experiment_names=[experiment], filter_string="metrics.bits_per_weight > 0", output_format="list"
    ):  # a metric is logged: the run is past its start, mid-way through its stages
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0][-3000:]
        time.sleep(0.2)
    _kill_server(stack)
    assert run.poll() is None  # still working when the server died: the rest of its logging met it down
    time.sleep(2)
    services.up(stack)
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out[-3000:]
    (result,) = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert result.info.status == "FINISHED"
    assert {"bits_per_weight", "ppl", "kl_vs_ref", "top1_agree", "gen_match_rate"} <= set(result.data.metrics)
    assert result.data.params["tracking.http.max_retries"] == "5"  # the retry settings are logged


@pytest.mark.slow  # ~30 s: a tiny run against a tracking server that goes away
def test_an_outage_past_the_retries_fails_the_run_with_what_it_logged_if_the_server_is_back_for_its_end(
    stack, monkeypatch
):
    """The end-of-run call retries too: back within its budget, the run ends FAILED; never back, it stays RUNNING."""
    import threading

    mlflow.set_tracking_uri(services.server_url(stack))
    experiment_id = mlflow.create_experiment(f"outage{uuid.uuid4().hex[:6]}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")  # waits up to 2+4+8+16 s
    with pytest.raises(RuntimeError), mlflow.start_run(experiment_id=experiment_id) as failed:
        mlflow.log_metric("before", 1.0)
        _kill_server(stack)
        threading.Timer(2.0, services.up, [stack]).start()  # back while the end-of-run call retries
        raise RuntimeError("a stage fails while the server is down")
    run = mlflow.get_run(failed.info.run_id)
    assert run.info.status == "FAILED" and run.data.metrics == {"before": 1.0}

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # waits up to 2 s: shorter than the outage
    with pytest.raises(mlflow.exceptions.MlflowException), mlflow.start_run(experiment_id=experiment_id) as stuck:
        mlflow.log_metric("before", 1.0)
        _kill_server(stack)
        mlflow.log_metric("during", 2.0)
    services.up(stack)
    run = mlflow.get_run(stuck.info.run_id)
    assert run.info.status == "RUNNING" and run.data.metrics == {"before": 1.0}  # what it logged is kept


def test_a_tracking_server_that_is_down_at_start_is_an_error_before_any_work(tiny_model):
    start = time.perf_counter()
    run = _pipeline(tiny_model, f"http://127.0.0.1:{free_port()}")
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 2, out[-3000:]
    assert "error: MLflow tracking server http://127.0.0.1:" in out and "does not answer" in out
    assert "Loading" not in out and "calibrat" not in out.lower()  # nothing loaded
    assert time.perf_counter() - start < 60


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster: a head and a second node, 1 CPU each, as separate processes on this machine.

    On 127.0.0.1 only: by default Ray on Linux replaces a loopback address with the machine's own (its
    multi-machine mode), and a driver then looks for its node there and waits for ever (seen). Ray's
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every node, the driver (which inherits os.environ) and
    their workers on loopback; set before Ray is first imported in this process."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray.cluster_utils import Cluster

    node = {
        "num_cpus": 1,
        "object_store_memory": 80 * 2**20,
        "include_dashboard": False,
        "node_ip_address": "127.0.0.1",
    }
    cluster = Cluster(initialize_head=True, head_node_args=node)
    cluster.add_node(**node)
    yield cluster
    cluster.shutdown()


@pytest.mark.slow  # 1-4 min (machine load): a Ray cluster, two worker tasks, two tiny trials
def test_ray_tasks_on_two_nodes_share_one_study_on_postgresql_and_the_server(stack, tiny_model, ray_cluster):
    name = f"ray{uuid.uuid4().hex[:6]}"
    storage, uri = (o.split("=", 1)[1] for o in services.worker_overrides(stack))
    cmd = [
        *_pipeline_args(tiny_model, uri),
        "tune.n_trials=2",
        f"tune.study_name={name}",
        f"tune.storage={storage}",
        f"tune.best_dir={tiny_model.parent / 'tuned'}",
        "tune.workers=2",
        "tune.engine=ray",
        f"tune.ray.address={ray_cluster.address}",
        "tune.ray.num_cpus=1",
    ]
    cmd[2] = "pipeline.tune"
    done = subprocess.run(cmd, cwd=REPO, env=_env(tiny_model), capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    # 1 CPU per task and 1 per node: the two tasks ran on the two nodes, as two processes
    placed = [line.split() for line in done.stdout.splitlines() if line.startswith("ray worker")]
    # "ray worker <rank>: node <node id> <host:pid> trials [...]"
    assert len(placed) == 2 and placed[0][4] != placed[1][4] and placed[0][5] != placed[1][5]
    study = optuna.load_study(study_name=name, storage=storage)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) >= 2
    assert len({t.user_attrs["sampler_seed"] for t in study.trials}) == 2  # one seed per worker
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(
        experiment_names=["tune"], filter_string=f"tags.`tune.study` = '{name}'", output_format="list"
    )
    trial_runs = [r for r in runs if "tune.trial" in r.data.tags]
    assert len(trial_runs) == sum("duplicate_of" not in t.user_attrs for t in study.trials)
    assert {r.info.status for r in trial_runs} == {"FINISHED"}


@pytest.mark.slow  # ~1 min each: two tiny runs in parallel
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_a_multirun_launcher_runs_each_job_in_its_own_process_as_one_mlflow_run(launcher, tiny_model, tmp_path):
    experiment = f"{launcher}{uuid.uuid4().hex[:6]}"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # method fp: the launcher's contract, without our C++ kernels' build (a shared build folder's lock)
    args = _pipeline_args(tiny_model, uri, f"tracking.experiment={experiment}", "method=fp", "seed=0,1")
    args = [
        *args[:3],
        "--multirun",
        *(a for a in args[3:] if not a.startswith(("method=group_wise", "hydra.run.dir="))),
    ]
    args += [f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    args += ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.tasks_per_node=1"]
    sweep = subprocess.Popen(
        args,
        cwd=REPO,
        env=_env(tiny_model),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = sweep.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        os.killpg(sweep.pid, signal.SIGKILL)  # the launcher's jobs too
        raise
    assert sweep.returncode == 0, out[-3000:]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]  # one run per job
    assert {r.info.status for r in runs} == {"FINISHED"}
    pids = {r.data.params["host.pid"] for r in runs}
    assert len(pids) == 2 and str(sweep.pid) not in pids  # each job its own process, not the launcher's


@pytest.mark.slow  # 30-45 s each: a sweep under each Hydra launcher
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_bad_input_under_a_launcher_is_its_error_line_and_a_failed_sweep(launcher, tiny_model, tmp_path):
    args = [
        *_pipeline_args(tiny_model, f"sqlite:///{tmp_path}/mlflow.db", "method.bits=1,99"),
        f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    done = subprocess.run(
        [*args[:3], "--multirun", *(a for a in args[3:] if not a.startswith("hydra.run.dir="))],
        cwd=REPO,
        env=_env(tiny_model),
        capture_output=True,
        text=True,
        timeout=300,
    )
    # joblib re-raises the job's exit in the sweep; submitit reports the job's error stream (its
    # UncompletedJobError, with a traceback of the launcher around the job's one line)
    assert done.returncode != 0
    assert re.search(r"error: method: bits must be an integer in 2\.\.8, got (1|99)\n", done.stdout + done.stderr), (
        done.stderr[-3000:]
    )
    assert "Traceback" not in done.stderr or launcher == "submitit_local"
