"""A study shared by workers on PostgreSQL: simultaneous starts, a killed worker, a database restart, bad input.

Workers are real processes on a real PostgreSQL (tests/services.py) and a real MLflow store; their
trials are stand-ins (tests/tune_worker.py: an MLflow run that logs for a few seconds), so that the
faults land mid-trial within seconds.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
import sqlalchemy
from conftest import tiny_llama

from pipeline import tune, tune_storage

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "tune_worker.py"
COMPLETE, RUNNING, FAIL = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.RUNNING,
    optuna.trial.TrialState.FAIL,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """Overrides for a tiny model and a temp MLflow store; the study storage is each test's."""
    tmp = tmp_path_factory.mktemp("shared")
    tiny_llama(vocab_size=len(tokenizer), seed=3).save_pretrained(tmp / "m")
    tokenizer.save_pretrained(tmp / "m")
    return tmp, [
        "model=hf",
        f"model.path={tmp / 'm'}",
        "method=group_wise",
        "tune.prune=false",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"tune.best_dir={tmp}/tuned",
    ]


def _env(base, **extra: str) -> dict:
    cache = str(base[0] / "cache")
    return {**os.environ, "PYTHONPATH": str(REPO), "QUANTBENCH_CACHE": cache, "OMP_NUM_THREADS": "1", **extra}


def _worker(base, overrides: list[str], log: Path, **env: str) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, str(WORKER), *overrides],
            cwd=REPO,
            env=_env(base, **env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _storage(storage: str) -> optuna.storages.RDBStorage:
    """The study storage, holding no connection between calls: the tests poll it several times a second,
    and a connection pool left behind by each poll exhausts the server's connections on a loaded machine
    ("too many clients already")."""
    return optuna.storages.RDBStorage(
        tune_storage.storage_url(storage), engine_kwargs={"poolclass": sqlalchemy.pool.NullPool}
    )


def _study(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=_storage(storage))


def _states(storage: str, name: str) -> list:
    store = _storage(storage)
    if name not in {s.study_name for s in optuna.get_all_study_summaries(store)}:
        return []
    return [t.state for t in optuna.load_study(study_name=name, storage=store).trials]


def _runs(base, name: str) -> list:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{base[0]}/mlflow.db")
    experiment = client.get_experiment_by_name("tune")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`tune.study` = '{name}'")


def _wait(condition, timeout: float, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        assert all(p.poll() is None for p in procs), "a worker ended early"
        time.sleep(0.5)


def test_workers_started_at_the_same_instant_make_one_study_one_parent_run_one_preset(base, postgres, tmp_path):
    name = f"s{uuid.uuid4().hex[:8]}"
    overrides = [*base[1], f"tune.storage={postgres}", f"tune.study_name={name}"]
    start = tmp_path / "go"
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    procs = [_worker(base, overrides, log, QB_START=str(start), QB_JOIN_ONLY="1") for log in logs]
    _wait(lambda: len(list(tmp_path.glob("go.*.ready"))) == 2, 120, procs)
    start.touch()  # both go at once
    assert [p.wait(timeout=120) for p in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    joined = [json.loads(log.read_text().strip().splitlines()[-1]) for log in logs]
    assert len({j["study_id"] for j in joined}) == 1 and len({j["parent"] for j in joined}) == 1
    assert sorted(j["rank"] for j in joined) == [0, 1]
    assert sorted(j["seed"] for j in joined) == [0, 1]  # seed 0 (config) + rank: distinct, nobody chose them
    study = _study(postgres, name)
    assert [t.user_attrs.get("preset") for t in study.trials] == [True]
    parents = [r for r in _runs(base, name) if "tune.trial" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [joined[0]["parent"]]


@pytest.mark.slow  # ~30 s: a worker killed mid-study on PostgreSQL
def test_a_killed_worker_on_postgres_is_failed_retried_once_and_nothing_redone(base, postgres, tmp_path, monkeypatch):
    name = f"k{uuid.uuid4().hex[:8]}"
    overrides = [
        *base[1],
        f"tune.storage={postgres}",
        f"tune.study_name={name}",
        "tune.n_trials=3",
        "tune.heartbeat_s=1",
        "tune.grace_period_s=2",
    ]
    worker = _worker(base, overrides, tmp_path / "w.log", QB_TRIAL_STEPS="12")  # 6 s trials: caught mid-trial
    try:
        # the first trial finished, the second running with its MLflow run open
        _wait(lambda: _states(postgres, name)[:2] == [COMPLETE, RUNNING] and len(_runs(base, name)) == 3, 120, [worker])
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.wait()
    before = _study(postgres, name).trials
    assert [t.state for t in before] == [COMPLETE, RUNNING]
    time.sleep(3)  # past the grace period: the RUNNING trial is stale

    monkeypatch.setenv("QUANTBENCH_CACHE", str(base[0] / "cache"))
    monkeypatch.setenv("QB_TRIAL_STEPS", "1")
    from tune_worker import stand_in_run

    monkeypatch.setattr(tune.run, "tracked_run", stand_in_run)
    resumed = tune.tune(overrides)
    assert [t.state for t in resumed.trials] == [COMPLETE, FAIL, COMPLETE]
    assert resumed.trials[0].values == before[0].values  # kept, not redone
    assert resumed.trials[2].params == before[1].params  # the killed trial, retried once
    assert resumed.trials[2].system_attrs["failed_trial"] == before[1].number
    killed = [r for r in _runs(base, name) if r.data.tags.get("tune.trial") == "1"]
    assert [(r.info.status, r.data.tags.get("tune.stale")) for r in killed] == [("FAILED", "true")]
    assert resumed.user_attrs["workers_joined"] == 2  # the killed worker and this one


@pytest.mark.slow  # ~40 s: PostgreSQL restarted under two workers
def test_workers_survive_a_postgres_restart_with_no_trial_lost_or_counted_twice(base, private_postgres, tmp_path):
    name = f"r{uuid.uuid4().hex[:8]}"
    storage = private_postgres.url
    # grace well above the outage: a live worker's trial must not be taken for a dead one's
    overrides = [*base[1], f"tune.storage={storage}", f"tune.study_name={name}", "tune.n_trials=4"]
    overrides += ["tune.heartbeat_s=1", "tune.grace_period_s=30"]
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    procs = [_worker(base, overrides, log, QB_TRIAL_STEPS="6") for log in logs]  # 3 s trials
    try:
        _wait(
            lambda: _states(storage, name).count(COMPLETE) >= 1 and _states(storage, name).count(RUNNING) == 2,
            180,
            procs,
        )
        private_postgres.stop()  # every connection closed mid-trial
        time.sleep(3)  # down for a while: the workers' calls and heartbeats fail meanwhile
        private_postgres.start()
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], [t[-3000:] for t in text]
    assert any("retrying" in t for t in text)  # the outage was met and outlived, not missed
    trials = _study(storage, name).trials
    assert {t.state for t in trials} == {COMPLETE} and len(trials) >= 4  # none lost, none failed or left running
    runs = [r for r in _runs(base, name) if "tune.trial" in r.data.tags]
    ran = [t for t in trials if "duplicate_of" not in t.user_attrs]
    # one MLflow run per trial that ran, finished, with its value: none counted twice
    assert sorted(int(r.data.tags["tune.trial"]) for r in runs) == [t.number for t in ran]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.info.run_id: r.data.metrics["kl_vs_ref"] for r in runs} == {t.user_attrs["run_id"]: t.value for t in ran}


def _error(capsys, overrides: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        tune.main(overrides)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_storage_urls_are_one_line_errors_before_any_work(base, postgres, capsys, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(base[0] / "cache"))
    start = time.monotonic()
    err = _error(capsys, [*base[1], "tune.storage=postgresql://postgres@127.0.0.1:1/nowhere"])
    assert "error: tune.storage postgresql+psycopg://postgres@127.0.0.1:1/nowhere does not answer" in err
    assert time.monotonic() - start < 30  # the connect timeout, not minutes of retries
    err = _error(capsys, [*base[1], f"tune.storage={postgres.replace('postgres@', 'nobody:secret@')}"])
    assert 'role "nobody" does not exist' in err and "secret" not in err  # the password is never shown
    err = _error(capsys, [*base[1], "tune.storage=mysql://root@127.0.0.1/test"])
    assert "error: tune.storage 'mysql://root@127.0.0.1/test': give sqlite:///<path>" in err


def test_a_study_opened_with_other_objectives_or_space_is_refused_and_left_unchanged(
    base, postgres, capsys, monkeypatch
):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(base[0] / "cache"))
    name = f"b{uuid.uuid4().hex[:8]}"
    overrides = [*base[1], f"tune.storage={postgres}", f"tune.study_name={name}"]
    tune.setup_study(overrides, join=True)
    before = _study(postgres, name)
    err = _error(capsys, [*overrides, "tune.objectives=[ppl]"])
    assert f"error: study '{name}' in postgresql+psycopg://postgres@127.0.0.1:5432/" in err
    assert "exists with another objectives: ['kl_vs_ref'] (now ['ppl'])" in err
    err = _error(capsys, [*overrides, "search.params=[{name:method.group_size,choices:[32]}]"])
    assert "exists with another search_space" in err
    after = _study(postgres, name)
    assert after.user_attrs == before.user_attrs and len(after.trials) == len(before.trials) == 1
