"""Optuna tuning on a tiny model: a study, its MLflow runs, resume, two workers, bad input."""

import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
from conftest import CONF, tiny_llama
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline import tune

REPO = Path(__file__).resolve().parent.parent
COMPLETE = optuna.trial.TrialState.COMPLETE


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """Overrides that point the pipeline at a tiny model, a small protocol and temp stores."""
    tmp = tmp_path_factory.mktemp("tune")
    tiny_llama(vocab_size=len(tokenizer), seed=3).save_pretrained(tmp / "m")
    tokenizer.save_pretrained(tmp / "m")
    return tmp, [
        "model=hf",
        f"model.path={tmp / 'm'}",
        "eval.tokens=256",
        "eval.context=64",
        "eval.stride=64",
        "eval.kl_tokens=128",
        "eval.generation.new_tokens=2",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"tune.storage=sqlite:///{tmp}/optuna.db",
        f"tune.best_dir={tmp}/conf/experiment/tuned",
    ]


@pytest.fixture(autouse=True)
def _cache(base, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(base[0] / "cache"))


def _study(base, *overrides: str) -> tuple[str, list[str]]:
    name = f"t{uuid.uuid4().hex[:8]}"
    return name, [*base[1], "method=group_wise", f"tune.study_name={name}", *overrides]


def _children(name: str) -> list:
    experiment = mlflow.get_experiment_by_name("tune")
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    return [r for r in runs if r.data.tags.get("tune.study") == name and "tune.trial" in r.data.tags]


def test_study_runs_trials_as_child_runs_resumes_and_writes_a_rerunnable_best(base):
    name, overrides = _study(base, "tune.n_trials=2")
    study = tune.tune(overrides)
    assert [t.state for t in study.trials] == [COMPLETE, COMPLETE]
    # the preset (group 64, asymmetric, integer zero point) runs first
    assert study.trials[0].params == {
        "method.group_size": 64,
        "method.symmetric": False,
        "method.zero_point_domain": "int",
    }
    # group sizes the tiny model (inputs 64 and 128) cannot take were dropped from the space
    assert {t.params["method.group_size"] for t in study.trials} <= {32, 64}
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    children = _children(name)
    assert len(children) == 2 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parent_id}
    assert {c.data.tags["tune.trial"] for c in children} == {"0", "1"}
    assert all("kl_vs_ref" in c.data.metrics and "proxy_kl" in c.data.metrics for c in children)

    resumed = tune.tune([*overrides[:-1], "tune.n_trials=3"])  # the same study, one more trial
    assert [t.number for t in resumed.trials] == [0, 1, 2]
    # a trial that repeated a finished trial's settings reused its values: no second run
    ran = [t for t in resumed.trials if "duplicate_of" not in t.user_attrs]
    assert len(_children(name)) == len(ran)
    assert resumed.trials[0].values == study.trials[0].values  # kept, not redone

    best = base[0] / "conf" / "experiment" / "tuned" / f"{name}.yaml"
    text = best.read_text()
    assert "override /model: hf" in text and "override /method: group_wise" in text and "tuned_from" in text
    settings = [line for line in text.splitlines() if not line.startswith("#")]
    assert not [line for line in settings if "sqlite" in line]  # no store paths of the machine that tuned
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.searchpath=[file://{base[0]}/conf]", f"experiment=tuned/{name}"])
    assert cfg.method.group_size == resumed.best_params["method.group_size"] and cfg.tracking.experiment == "tuned"
    assert cfg.tracking.tags.tuned_from == name and "method.group_size=" in cfg.tracking.tags.tuned_settings
    # how the best trial compares with the preset (trial 0), on the first objective
    tags = cfg.tracking.tags
    assert tags.tuned_objective == "kl_vs_ref" and tags.tuned_best_value == resumed.best_value
    assert tags.tuned_preset_value == resumed.trials[0].value
    assert tags.tuned_vs_preset == ("same" if resumed.best_trial.number == 0 else "better")


def test_failing_trials_are_recorded_and_the_study_goes_on(base):
    # 1000 new tokens exceed the tiny model's 256 positions: that trial fails inside its run
    space = "search.params=[{name:eval.generation.new_tokens,choices:[2,1000]}]"
    name, overrides = _study(base, "tune.n_trials=4", "tune.prune=false", "eval.generation.prompts=[Hello]", space)
    study = tune.tune(overrides)
    states = {t.params["eval.generation.new_tokens"]: t.state for t in study.trials}
    assert states == {2: COMPLETE, 1000: optuna.trial.TrialState.FAIL}
    statuses = {c.data.params["eval.generation.new_tokens"]: c.info.status for c in _children(name)}
    assert statuses == {"2": "FINISHED", "1000": "FAILED"}


def test_bad_search_spaces_and_objectives_are_refused(base):
    _, overrides = _study(base, "search.params=[{name:method.group_size,choices:[100,48]}]")
    with pytest.raises(ValueError, match=r"none of the group sizes \[100, 48\].*valid sizes: \[8, 16, 32, 64\]"):
        tune.tune(overrides)
    _, overrides = _study(base, "method=fp")
    with pytest.raises(ValueError, match="no search space for method 'fp'"):
        tune.tune(overrides)
    _, overrides = _study(base, "tune.objectives=[accuracy]")
    with pytest.raises(ValueError, match="each must be one of"):
        tune.tune(overrides)
    _, overrides = _study(base, "tune.objectives=[decode_tok_s]")
    with pytest.raises(ValueError, match="need profile.enabled=true"):
        tune.tune(overrides)
    name, overrides = _study(base, "tune.n_trials=1")
    tune.tune(overrides)
    with pytest.raises(ValueError, match=f"study '{name}' .* exists with another search_space"):
        tune.tune([*overrides, "search.params=[{name:method.group_size,choices:[32]}]"])


@pytest.mark.slow  # ~55 s: two worker processes, each running tiny trials
def test_two_worker_processes_share_one_study(base):
    name, overrides = _study(base, "tune.n_trials=4")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.tune", "tune.workers=2", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "QUANTBENCH_CACHE": str(base[0] / "cache")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{base[0]}/optuna.db")
    finished = [t for t in study.trials if t.state == COMPLETE]
    assert len(finished) >= 4 and len({t.user_attrs["worker"] for t in finished}) == 2
    # each worker samples with its own seed (with one seed they would sample the same settings)
    seeds = {t.user_attrs["worker"]: t.user_attrs["sampler_seed"] for t in finished}
    assert len(set(seeds.values())) == 2


def test_conditional_params_are_sampled_only_when_their_condition_holds():
    space = [
        {"name": "method.granularity", "choices": ["per_channel", "group"]},
        {"name": "method.group_size", "choices": [32, 64], "when": {"method.granularity": "group"}},
    ]
    per_channel = optuna.trial.FixedTrial({"method.granularity": "per_channel", "method.group_size": 32})
    assert tune.sample(per_channel, space) == ['method.granularity="per_channel"']
    group = optuna.trial.FixedTrial({"method.granularity": "group", "method.group_size": 32})
    assert tune.sample(group, space) == ['method.granularity="group"', "method.group_size=32"]


def test_hopeless_trials_are_pruned_after_quantization(base):
    # after the 8-bit preset, a 2-bit trial's proxy KL is far above the median of the 8-bit ones
    space = "search.params=[{name:method.bits,choices:[8,2]}]"
    name, overrides = _study(base, "tune.n_trials=5", "tune.startup_trials=1", "method.bits=8", space)
    study = tune.tune(overrides)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(t.params["method.bits"] == 2 for t in pruned)
    runs = {c.data.tags["tune.trial"]: c for c in _children(name)}
    assert len(runs) == 2  # one run per setting: a repeat of the pruned setting is pruned again, without a run
    for trial in [t for t in pruned if "duplicate_of" not in t.user_attrs]:
        run = runs[str(trial.number)]
        assert run.info.status == "KILLED" and run.data.tags["tune.pruned"] == "true"
        assert "proxy_kl" in run.data.metrics and "ppl" not in run.data.metrics  # stopped before evaluation
    parent = mlflow.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.metrics["trials_pruned"] == 1 and "prune_saved_s" in parent.data.metrics
    assert parent.data.metrics["trials_duplicate"] == len(study.trials) - 2


@pytest.mark.parametrize("method", sorted(p.stem for p in (CONF / "search").glob("*.yaml")))
def test_every_search_space_composes_and_samples_valid_settings(method, base):
    cfg = tune.compose_config([*base[1], f"method={method}"])
    space = tune.check_space(cfg)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    overrides = tune.sample(trial, space)
    sampled = tune.compose_config([*base[1], f"method={method}", *overrides])
    for param in space:
        if param["name"] not in trial.params:  # a conditional param whose condition was not drawn
            assert param.get("when") and f"{param['name']}=" not in " ".join(overrides)
            continue
        value = sampled
        for key in param["name"].split("."):
            value = value[key]
        assert value == trial.params[param["name"]]


@pytest.mark.slow  # ~40 s: a worker killed mid-study, then resumed
def test_a_killed_worker_resumes_without_redoing_finished_trials(base):
    import os
    import signal
    import threading
    import time

    import sqlalchemy

    name, overrides = _study(base, "tune.n_trials=3", "tune.heartbeat_s=1", "tune.grace_period_s=2")
    storage = f"sqlite:///{base[0]}/optuna.db"
    env = {**os.environ, "QUANTBENCH_CACHE": str(base[0] / "cache"), "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen([sys.executable, "-m", "pipeline.tune", *overrides], cwd=REPO, env=env)
    running = optuna.trial.TrialState.RUNNING
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{base[0]}/mlflow.db")

    def trial_states() -> list:
        if name not in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
            return []
        return [t.state for t in optuna.load_study(study_name=name, storage=storage).trials]

    def running_after_finished(now: list) -> bool:  # finished trial(s), then one running
        return len(now) >= 2 and now[-1] == running and set(now[:-1]) == {COMPLETE}

    def caught_mid_trial() -> bool:  # ... and its MLflow run is open
        now = trial_states()
        if not running_after_finished(now):
            return False
        experiment = client.get_experiment_by_name("tune")
        query = f"tags.`tune.study` = '{name}' and tags.`tune.trial` = '{len(now) - 1}'"
        return bool(client.search_runs([experiment.experiment_id], filter_string=query))

    try:  # kill it while a trial after the first runs
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.05)
            if not running_after_finished(trial_states()):
                continue
            # Frozen while we look (a loaded machine makes the look slower than a tiny trial): the state we
            # check is the state we kill. Not yet caught (its MLflow run not open yet): let it run a moment.
            worker.send_signal(signal.SIGSTOP)
            # A worker frozen inside an sqlite write holds its lock: our look would wait on it (a 14-minute
            # hang seen) or fail with "database is locked". Thaw it after 2 s; that look does not count.
            thawed = threading.Event()
            thaw = threading.Timer(2.0, lambda e=thawed: (e.set(), worker.send_signal(signal.SIGCONT)))
            thaw.start()
            try:
                caught = caught_mid_trial()
            except (sqlalchemy.exc.OperationalError, mlflow.exceptions.MlflowException):
                caught = False  # "database is locked": the frozen worker held it; look again
            thaw.cancel()
            if caught and not thawed.is_set():
                break
            worker.send_signal(signal.SIGCONT)
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.wait()
    before = optuna.load_study(study_name=name, storage=storage).trials
    done = len(before) - 1
    assert [t.state for t in before] == [COMPLETE] * done + [running], "the worker was never caught mid-trial"
    time.sleep(3)  # past the grace period: the RUNNING trial is now stale

    resumed = tune.tune(overrides)
    states = [t.state for t in resumed.trials]
    assert states == [COMPLETE] * done + [optuna.trial.TrialState.FAIL, COMPLETE]
    assert [t.values for t in resumed.trials[:done]] == [t.values for t in before[:done]]  # kept, not redone
    assert resumed.trials[-1].params == before[-1].params  # the interrupted one was retried once
    killed = [r for r in _children(name) if r.data.tags["tune.trial"] == str(done)]
    assert [(r.info.status, r.data.tags.get("tune.stale")) for r in killed] == [("FAILED", "true")]


def _fake_run(calls: list, kl):
    """Stands in for run.tracked_run: records the trial's config, returns ``kl(cfg)`` as its KL."""

    def tracked_run(cfg, experiment_id, name, tags, model_path, log_file=None, probe=None):
        calls.append(cfg)
        return {"kl_vs_ref": kl(cfg), "run_id": f"fake-{len(calls)}"}

    return tracked_run


def test_a_small_finite_space_runs_every_setting_once_then_stops(base, monkeypatch):
    calls: list = []
    monkeypatch.setattr(tune.run, "tracked_run", _fake_run(calls, lambda c: 0.1 + c.method.symmetric / 10))
    # method.symmetric x a scale dtype drawn only when asymmetric: 3 settings, fewer than the 6 trials
    space = "search.params=[{name:method.symmetric,choices:[true,false]},{name:method.scale_dtype,choices:[float16,float32],when:{method.symmetric:false}}]"  # noqa: E501
    _, overrides = _study(base, "tune.n_trials=6", space)
    assert tune.space_size(tune.check_space(tune.compose_config(overrides))) == 3
    study = tune.tune(overrides)
    settings = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(calls) == len(settings) == len(set(settings)) == 3  # each once, no repeat, then the study stopped
    assert tune.space_size([{"name": "x", "low": 0, "high": 1}]) is None  # numeric: not enumerable


def test_a_repeated_setting_reuses_the_finished_trial_instead_of_running_again(base, monkeypatch):
    calls: list = []
    monkeypatch.setattr(tune.run, "tracked_run", _fake_run(calls, lambda c: 0.1 + c.method.symmetric / 10))
    # TPE, as in a space larger than the budget, where it can draw a setting again
    monkeypatch.setattr(tune, "make_sampler", lambda _space, _n, seed: optuna.samplers.TPESampler(seed=seed))
    space = SCALE_SPACE.replace("[{", "[{name:method.symmetric,choices:[true,false]},{")
    _, overrides = _study(base, "tune.n_trials=6", space)
    study = tune.tune(overrides)
    assert len(study.trials) == 6 and all(t.state == COMPLETE for t in study.trials)
    settings = {tuple(sorted(t.params.items())) for t in study.trials}
    assert len(calls) == len(settings) <= 4  # a 2x2 space: at most 4 runs, one per distinct setting
    duplicates = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    assert len(duplicates) == 6 - len(calls)
    for trial in duplicates:
        original = study.trials[trial.user_attrs["duplicate_of"]]
        assert original.params == trial.params and original.values == trial.values
        assert "duplicate_of" not in original.user_attrs and "run_id" not in trial.user_attrs
    parent = mlflow.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.metrics["trials_duplicate"] == len(duplicates)
    assert parent.data.metrics["trials_complete"] == len(calls)


def test_a_setting_on_the_published_grid_is_never_run_nor_chosen(base, monkeypatch):
    # The tiny model "was published" as 8-bit symmetric per-channel: weight_only's preset sits on it.
    calls: list = []
    monkeypatch.setattr(tune.run, "tracked_run", _fake_run(calls, lambda c: 1e-4 if c.method.bits == 8 else 1e-2))
    grid = "model.published_grid={bits:8,symmetric:true,granularity:per_channel}"
    name, overrides = _study(
        base, "method=weight_only", grid, "tune.n_trials=4", "search.params=[{name:method.bits,choices:[8,6]}]"
    )
    study = tune.tune(overrides)
    assert study.trials[0].user_attrs["preset"] and study.trials[0].params == {"method.bits": 8}
    on_grid = [t for t in study.trials if t.params["method.bits"] == 8]
    assert on_grid and all(t.state == optuna.trial.TrialState.PRUNED for t in on_grid)
    assert all(t.user_attrs["skipped"] == "on_published_grid" and not t.intermediate_values for t in on_grid)
    assert [c.method.bits for c in calls] == [6]  # the grid setting never ran (a run would have won)
    text = (base[0] / "conf" / "experiment" / "tuned" / f"{name}.yaml").read_text()
    tuned = OmegaConf.create(text)
    assert tuned.method.bits == 6
    assert (
        tuned.tracking.tags.tuned_vs_preset == "preset_not_measured" and "tuned_preset_value" not in tuned.tracking.tags
    )
    parent = mlflow.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.metrics["trials_on_published_grid"] == len(on_grid) and parent.data.metrics["trials_pruned"] == 0


def test_an_older_studys_trial_on_the_published_grid_is_not_chosen_as_best(base):
    grid = "model.published_grid={bits:4,symmetric:false,granularity:group,group_size:32,zero_point_domain:float}"
    overrides = [*base[1], "method=group_wise", grid]
    study = optuna.create_study()
    for value, settings in ((1e-4, ["method.group_size=32", 'method.zero_point_domain="float"']), (1e-2, [])):
        # written before trials carried the on_published_grid mark
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"overrides": settings}))
    assert tune.best_trial(study, overrides).value == 1e-2


def _open(base, name: str, storage: str, cfg=None):
    overrides = [*base[1], "method=group_wise", f"tune.study_name={name}", f"tune.storage={storage}", SCALE_SPACE]
    cfg = tune.compose_config(overrides)
    space = tune.check_space(cfg)
    base_overrides = [o for o in overrides if not o.startswith("tune.")]
    return tune.open_study(cfg, tune.storage(cfg), name, space, ["kl_vs_ref"], base_overrides)


SCALE_SPACE = "search.params=[{name:method.scale_dtype,choices:[float16,float32]}]"
FLOAT32 = {"method.scale_dtype": "float32"}
DISTRIBUTIONS = {"method.scale_dtype": optuna.distributions.CategoricalDistribution(["float16", "float32"])}


def test_every_study_holds_the_preset_once_a_resumed_one_too(base, tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    first, again = _open(base, "s", storage), _open(base, "s", storage)  # two workers opening one study
    presets = [t for t in again.trials if t.user_attrs.get("preset")]
    assert len(presets) == 1 and first.trials[0].number == presets[0].number
    # a study resumed from before the preset was enqueued: its trials kept, the preset added
    older = optuna.create_study(study_name="old", storage=storage)
    older.add_trial(optuna.trial.create_trial(params=FLOAT32, distributions=DISTRIBUTIONS, value=0.5))
    resumed = _open(base, "old", storage)
    assert [t.state for t in resumed.trials] == [COMPLETE, optuna.trial.TrialState.WAITING]
    assert resumed.trials[1].user_attrs["preset"] and len(_open(base, "old", storage).trials) == 2
    # one whose preset already ran without the mark (sampled): found by its params, not added again
    sampled = optuna.create_study(study_name="sampled", storage=storage)
    preset = {"method.scale_dtype": "float16"}
    sampled.add_trial(optuna.trial.create_trial(params=preset, distributions=DISTRIBUTIONS, value=0.5))
    assert len(_open(base, "sampled", storage).trials) == 1


def test_the_tuned_config_says_how_its_best_compares_with_the_preset():
    def study_with(preset_state, preset_value, other_value):
        study = optuna.create_study()
        study.set_user_attr("objectives", ["kl_vs_ref"])
        value = preset_value if preset_state == COMPLETE else None
        study.add_trial(
            optuna.trial.create_trial(
                state=preset_state,
                value=value,
                params={"method.scale_dtype": "float16"},
                distributions=DISTRIBUTIONS,
                user_attrs={"preset": True},
            )
        )
        study.add_trial(optuna.trial.create_trial(value=other_value, params=FLOAT32, distributions=DISTRIBUTIONS))
        return study

    preset = {"method.scale_dtype": "float16"}
    study = study_with(COMPLETE, 0.5, 0.3)
    assert tune.versus_preset(study, study.trials[1], preset) == {
        "tuned_objective": "kl_vs_ref",
        "tuned_best_value": 0.3,
        "tuned_preset_value": 0.5,
        "tuned_vs_preset": "better",
    }
    assert tune.versus_preset(study, study.trials[0], preset)["tuned_vs_preset"] == "same"
    study = study_with(COMPLETE, 0.2, 0.3)
    assert tune.versus_preset(study, study.trials[1], preset)["tuned_vs_preset"] == "worse"
    study = study_with(optuna.trial.TrialState.FAIL, None, 0.3)
    tags = tune.versus_preset(study, study.trials[1], preset)
    assert tags["tuned_vs_preset"] == "preset_not_measured" and "tuned_preset_value" not in tags


def test_tune_composes_a_named_experiment_last_and_keeps_its_own_mlflow_experiment(base):
    cfg = tune.compose_config(["experiment=smoke"])
    # smoke's settings win over tune.yaml's protocol (512 tokens, not 4096), its method preset applies
    assert cfg.eval.tokens == 512 and cfg.method.name == "group_wise" and cfg.search.params
    assert cfg.tracking.experiment == "tune"  # the trials do not join smoke's report
    assert tune.compose_config(["experiment=smoke", "eval.tokens=256"]).eval.tokens == 256  # the command line wins
    assert tune.compose_config([*base[1], "experiment=smoke", "tracking.experiment=mine"]).tracking.experiment == "mine"
    assert tune.compose_config([*base[1], "experiment=smoke", "method=gptq"]).method.name == "gptq"
    plain = tune.compose_config(["method=group_wise"])
    assert plain.eval.tokens == 4096 and plain.tracking.experiment == "tune"
    with pytest.raises(ValueError, match="experiment compare is a sweep over method=fp,.*tunes one method"):
        tune.compose_config(["experiment=compare"])


def test_a_study_on_an_experiment_writes_a_tuned_config_that_includes_it(base, monkeypatch):
    calls: list = []
    monkeypatch.setattr(
        tune.run, "tracked_run", _fake_run(calls, lambda c: 0.1 if c.method.scale_dtype == "float32" else 0.2)
    )
    name, overrides = _study(base, "experiment=smoke", "tune.n_trials=2", SCALE_SPACE)
    study = tune.tune(overrides)
    assert study.user_attrs["base_experiment"] == "smoke" and {c.data.calibration.num_samples for c in calls} == {4}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.searchpath=[file://{base[0]}/conf]", f"experiment=tuned/{name}"])
    assert cfg.data.calibration.num_samples == 4 and cfg.eval.tasks.limit == 8  # smoke's settings kept
    assert cfg.eval.tokens == 256 and "search" not in cfg  # the study's overrides too, but not its search space
    assert cfg.method.scale_dtype == "float32" and cfg.tracking.experiment == "tuned"
    assert cfg.tracking.tags.tuned_vs_preset == "better"
