"""The team setup's services for real: PostgreSQL databases and an MLflow server on them (pipeline.services),
a run that rides out the server's restart, and a server that is down at start refused before any work."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
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


def _pipeline(tiny_model: Path, uri: str, *overrides: str) -> subprocess.Popen:
    cmd = [
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
    env = {**os.environ, "QUANTBENCH_CACHE": str(tiny_model.parent / "cache")}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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


def test_a_tracking_server_that_is_down_at_start_is_an_error_before_any_work(tiny_model):
    start = time.perf_counter()
    run = _pipeline(tiny_model, f"http://127.0.0.1:{free_port()}")
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 2, out[-3000:]
    assert "error: MLflow tracking server http://127.0.0.1:" in out and "does not answer" in out
    assert "Loading" not in out and "calibrat" not in out.lower()  # nothing loaded
    assert time.perf_counter() - start < 60
