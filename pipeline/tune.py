"""`python -m pipeline.tune method=<m> [experiment=<name>] [overrides]`: tune one method with an Optuna study.

The command line is Hydra overrides only, as for ``python -m pipeline``: ``experiment=<name>`` composes
that experiment last (see conf/tune.yaml for how its ``tracking.experiment`` is treated);
``tune.workers=N`` starts N processes on one study (``tune.engine=ray``: N Ray tasks, see conf/tune.yaml).

The search space is ``conf/search/<method>.yaml`` (a list of ``{name: <config key>, ...}``: ``choices``
for a categorical, ``low``/``high`` (+ ``step`` or ``log``) for numbers). Each trial composes the
config with its sampled overrides (Hydra, exactly as a user would on the command line), runs the
stages, and is an MLflow child run of the study's parent run, tagged with the study and trial.

- Objectives: metric names the run logs (``tune.objectives``); one gives a best trial, several a
  Pareto front. Directions come from ``DIRECTIONS``.
- Storage: sqlite (one machine; the default) or PostgreSQL (workers on any machines), see
  pipeline/tune_storage.py: checked to answer before anything runs, calls retried through a database
  restart. A study of the same name resumes: finished trials are kept and ``tune.n_trials`` counts them;
  trials a killed worker left RUNNING are failed after the heartbeat grace period (their MLflow runs
  too) and retried once. Several processes (``tune.workers=N``, or started by hand on any machines
  with one PostgreSQL URL) share one study: its creation, parent run and preset trial are made once
  under a lock in the storage, and each worker takes a rank there and samples with
  ``tune.sampler_seed + rank`` (trial user attributes ``worker``, ``worker_rank``, ``sampler_seed``).
- Pruning (single objective): right after quantization, KL vs the reference on the first
  ``tune.proxy_windows`` evaluation windows goes to a MedianPruner; a pruned trial skips the
  evaluation. The parent run logs ``prune_saved_s``: per pruned trial, the mean duration of the
  completed trials minus its own (an estimate: a pruned trial never shows its full cost).
- A failing trial is recorded as failed (Optuna and MLflow) and the study goes on.
- The method's preset is a trial of every study (enqueued once, also into a resumed study that lacks
  it): the tuned config says how its best trial compares with it (tag ``tuned_vs_preset``).
- A sampled setting on the grid the model's weights were published on (``model.published_grid``)
  is never run: the trial is pruned with user attribute ``skipped=on_published_grid``, so it cannot
  become the best trial (pipeline/published_grid.py).
- A setting identical to a finished trial's is not run again: the trial takes that trial's values
  (user attribute ``duplicate_of``) or, if it was pruned, is pruned again; no MLflow run.
- The best trial's overrides are written to ``conf/experiment/tuned/<study>.yaml``:
  ``python -m pipeline experiment=tuned/<study>`` reruns it with the full protocol.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import mlflow
import optuna
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline import evaluate, layers, published_grid, run, tune_storage
from pipeline.cli import guard
from pipeline.load import load_model, resolve_model_path
from pipeline.tracking import REPO

log = logging.getLogger("pipeline.tune")
CONF = REPO / "conf"
DIRECTIONS = {
    "ppl": "minimize",
    "kl_vs_ref": "minimize",
    "acc_drop_pct": "minimize",
    "bits_per_weight": "minimize",
    "weight_mb": "minimize",
    "prefill_ms": "minimize",
    "top1_agree": "maximize",
    "acc_avg": "maximize",
    "gen_match_rate": "maximize",
    "decode_tok_s": "maximize",
    "speedup_vs_ref": "maximize",
}
SPEED_METRICS = {"prefill_ms", "decode_tok_s", "speedup_vs_ref"}
STUDY_ATTRS = ("search_space", "objectives", "base_overrides")
COMPLETE, PRUNED, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL
FINISHED = (COMPLETE, PRUNED, FAIL)
# Where the study's runs go unless the user gives tracking.experiment: not the tuned experiment's own
# MLflow experiment, whose report would otherwise mix trials with its rows.
TUNE_EXPERIMENT = str(OmegaConf.load(CONF / "tune.yaml").tracking.experiment)
SKIPPED_ON_GRID = "on_published_grid"
# How tune.workers run: local processes on this machine (_spawn), or Ray tasks (pipeline/ray_workers.py).
ENGINES = ("local", "ray")


def _experiment(overrides: list[str]) -> str | None:
    """The experiment the overrides name (the last ``experiment=``), or None."""
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
    return names[-1] if names and names[-1] not in ("", "null") else None


def compose_config(overrides: list[str]) -> DictConfig:
    """conf/tune.yaml with the overrides. ``experiment=<name>`` is composed last, over tune.yaml's own
    settings, as ``python -m pipeline experiment=<name>`` composes it over config.yaml's; only its
    ``tracking.experiment`` gives way to tune's unless the overrides set it. A sweep is refused.
    """
    experiment = _experiment(overrides)
    # Appended to the primary config's defaults (after tune.yaml's _self_); config.yaml's own
    # `experiment` slot stays null.
    hydra_overrides = [o for o in overrides if not o.startswith("experiment=")]
    if experiment:
        hydra_overrides.append(f"+experiment@_global_={experiment}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="tune", overrides=hydra_overrides, return_hydra_config=True)
    sweep = OmegaConf.select(cfg, "hydra.sweeper.params")
    if sweep:
        swept = " ".join(f"{key}={value}" for key, value in sweep.items())
        what = f"experiment {experiment}" if experiment else "this config"
        raise ValueError(
            f"{what} is a sweep over {swept}; pipeline.tune tunes one method: give method=<m> "
            f"and the settings you want as overrides, or an experiment without hydra.sweeper.params"
        )
    with open_dict(cfg):
        del cfg["hydra"]
    if experiment and not any(o.startswith("tracking.experiment=") for o in overrides):
        cfg.tracking.experiment = TUNE_EXPERIMENT
    return cfg


def check_space(cfg: DictConfig) -> list[dict]:
    """The search space of the configured method, with group sizes narrowed to those the model allows."""
    method = cfg.method.name
    if cfg.get("search") is None:
        available = sorted(p.stem for p in (CONF / "search").glob("*.yaml"))
        raise ValueError(f"no search space for method {method!r} (conf/search/{method}.yaml); have: {available}")
    space = OmegaConf.to_container(cfg.search.params, resolve=True)
    if not space:
        raise ValueError(f"conf/search/{method}.yaml has no params")
    for param in space:
        name = param.get("name")
        if not name or OmegaConf.select(cfg, name, default="__missing__") == "__missing__":
            raise ValueError(f"search param {param!r} of {method}: `name` must be an existing config key")
        if "choices" not in param and not {"low", "high"} <= set(param):
            raise ValueError(f"search param {name} of {method}: give `choices`, or `low` and `high`")
        earlier = [p["name"] for p in space[: space.index(param)]]
        if any(key not in earlier for key in param.get("when") or {}):
            raise ValueError(f"search param {name} of {method}: `when` may only name params listed before it")
        if name == "method.group_size":
            param["choices"] = _valid_choices(cfg, param["choices"])
    return space


def _valid_choices(cfg: DictConfig, choices: list) -> list:
    """Keep the group sizes that divide every selected layer's inputs (the model is loaded once for its shapes)."""
    model, _ = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    selected, _ = layers.select_layers(model, OmegaConf.to_container(cfg.layers, resolve=True))
    valid = layers.valid_group_sizes(selected)
    kept = [c for c in choices if c in valid]
    if not kept:
        raise ValueError(
            f"search space for {cfg.method.name}: none of the group sizes {choices} divides every selected "
            f"layer of {cfg.model.name}; valid sizes: {valid}"
        )
    if len(kept) < len(choices):
        log.info("group sizes %s do not fit %s; searching %s", sorted(set(choices) - set(kept)), cfg.model.name, kept)
    return kept


def preset_params(cfg: DictConfig, space: list[dict]) -> dict:
    """The configured value of each search param that the space admits (conditions checked in order)."""
    params = {}
    for param in space:
        if any(params.get(key) != value for key, value in (param.get("when") or {}).items()):
            continue
        value = OmegaConf.select(cfg, param["name"])
        if value is None:
            continue
        if value in param["choices"] if "choices" in param else param["low"] <= value <= param["high"]:
            params[param["name"]] = value
        else:
            log.warning(
                "preset %s=%s is outside the search space %s; its trial samples it", param["name"], value, param
            )
    return params


def preset_trial(study: optuna.Study, preset: Mapping) -> optuna.trial.FrozenTrial | None:
    """The study's preset trial: the measured one if any (marked ``preset``, or a trial with its params)."""
    trials = study.get_trials(deepcopy=False)
    candidates = [t for t in trials if t.user_attrs.get("preset")] + [
        t for t in trials if t.params == dict(preset) and t.state != optuna.trial.TrialState.WAITING
    ]
    if not candidates:
        return None
    return next((t for t in candidates if t.state == COMPLETE), candidates[0])


def sample(trial: optuna.Trial, space: list[dict]) -> list[str]:
    """One value per search param, as Hydra overrides.

    A param with ``when: {<earlier param>: <value>}`` is sampled only when those earlier values were
    drawn (a group size only for ``granularity=group``); otherwise it keeps the preset's value.
    """
    overrides = []
    for param in space:
        name = param["name"]
        if any(trial.params.get(key) != value for key, value in (param.get("when") or {}).items()):
            continue
        if "choices" in param:
            value = trial.suggest_categorical(name, param["choices"])
        elif isinstance(param["low"], int) and isinstance(param["high"], int):
            value = trial.suggest_int(
                name, param["low"], param["high"], step=param.get("step", 1), log=param.get("log", False)
            )
        else:
            value = trial.suggest_float(
                name, param["low"], param["high"], step=param.get("step"), log=param.get("log", False)
            )
        overrides.append(f"{name}={json.dumps(value)}")
    return overrides


def check_objectives(cfg: DictConfig) -> list[str]:
    objectives = list(cfg.tune.objectives)
    unknown = [o for o in objectives if o not in DIRECTIONS]
    if not objectives or unknown:
        raise ValueError(f"tune.objectives {objectives}: each must be one of {sorted(DIRECTIONS)}")
    if SPEED_METRICS & set(objectives) and not cfg.profile.enabled:
        raise ValueError(f"objective(s) {sorted(SPEED_METRICS & set(objectives))} need profile.enabled=true")
    if {"acc_drop_pct", "acc_avg"} & set(objectives) and not cfg.eval.tasks.names:
        raise ValueError("objectives acc_avg/acc_drop_pct need eval.tasks.names (e.g. [commonsense])")
    return objectives


def storage(cfg: DictConfig) -> tune_storage.RetryingStorage:
    """The study storage (pipeline/tune_storage.py), checked to answer now."""
    return tune_storage.open_storage(
        str(cfg.tune.storage),
        connect_timeout_s=int(cfg.tune.connect_timeout_s),
        retry_s=float(cfg.tune.storage_retry_s),
        heartbeat_interval=int(cfg.tune.heartbeat_s),
        grace_period=int(cfg.tune.grace_period_s),
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
    )


def _where(cfg: DictConfig) -> str:
    """``tune.storage`` as shown in messages, logs and files: without its password."""
    return tune_storage.shown(tune_storage.storage_url(str(cfg.tune.storage)))


def space_size(space: list[dict]) -> int | None:
    """Distinct settings a space of categorical params can draw (``when`` respected); None if any is numeric."""
    if any("choices" not in param for param in space):
        return None

    def count(i: int, drawn: dict) -> int:
        if i == len(space):
            return 1
        param = space[i]
        if any(drawn.get(key) != value for key, value in (param.get("when") or {}).items()):
            return count(i + 1, drawn)  # not drawn for this branch
        return sum(count(i + 1, {**drawn, param["name"]: choice}) for choice in param["choices"])

    return count(0, {})


def make_sampler(space: list[dict], n_trials: int, seed: int) -> optuna.samplers.BaseSampler:
    """Every setting once when the space is finite and no larger than the budget, else TPE.

    TPE keeps re-drawing the same few settings of a small categorical space (12 trials of group_wise's
    8 settings drew one of them 6 times and never drew g32 int-zero); the brute-force sampler
    enumerates them and then stops the study. Repeats that TPE still draws reuse the finished trial.
    """
    size = space_size(space)
    if size is not None and size <= n_trials:
        return optuna.samplers.BruteForceSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def open_study(
    cfg: DictConfig,
    store: optuna.storages.BaseStorage,
    name: str,
    space: list[dict],
    objectives: list[str],
    base: list[str],
) -> optuna.Study:
    """Create the study, or load it if it exists with the same search space and objectives (checked
    before anything is written: a mismatch changes nothing). Call under ``study_lock``."""
    pruner = optuna.pruners.MedianPruner(n_startup_trials=int(cfg.tune.startup_trials))
    single = len(objectives) == 1
    study = optuna.create_study(
        study_name=name,
        storage=store,
        load_if_exists=True,
        directions=[DIRECTIONS[o] for o in objectives],
        sampler=make_sampler(space, int(cfg.tune.n_trials), int(cfg.tune.sampler_seed)),
        pruner=pruner if single and cfg.tune.prune else optuna.pruners.NopPruner(),
    )
    attrs = {"search_space": space, "objectives": objectives, "base_overrides": base}
    stored = study.user_attrs
    for key, value in attrs.items():
        if stored.get(key) is not None and stored[key] != value:
            raise ValueError(
                f"study {name!r} in {_where(cfg)} exists with another {key}: {stored[key]} (now {value}); "
                f"pick another tune.study_name or delete the study"
            )
    for key, value in attrs.items():
        if stored.get(key) is None:
            study.set_user_attr(key, value)
    preset = preset_params(cfg, space)
    if preset_trial(study, preset) is None:
        # The preset in every study (a resumed one too): the best trial then never ends worse than the
        # method's defaults. Under the study lock: workers that open the study together enqueue it once.
        study.enqueue_trial(preset, user_attrs={"preset": True}, skip_if_exists=True)
    study.set_user_attr("experiment", str(cfg.tracking.experiment))
    study.set_user_attr("method", str(cfg.method.name))
    return study


def join_study(study: optuna.Study, space: list[dict], n_trials: int, seed: int) -> tuple[int, int]:
    """This worker's rank in the study (0 for the first worker ever, then 1, 2, ...: a counter in the
    storage) and its sampler seed, ``seed + rank``: workers never share a seed, and no user picks one.
    Call under ``study_lock``."""
    rank = int(study.user_attrs.get("workers_joined", 0))
    study.set_user_attr("workers_joined", rank + 1)
    study.sampler = make_sampler(space, n_trials, seed + rank)
    return rank, seed + rank


def parent_run(study: optuna.Study, experiment_id: str, cfg: DictConfig) -> str:
    """The study's MLflow parent run, created once and shared by every worker and resumption."""
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id is not None:
        return run_id
    tags = {"tune.study": study.study_name, "method": cfg.method.name, "family": cfg.method.family}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"study {study.study_name}", tags=tags) as parent:
        mlflow.log_params({"tune.storage": _where(cfg), "tune.objectives": list(cfg.tune.objectives), "seed": cfg.seed})
        mlflow.log_dict({"search_space": study.user_attrs["search_space"]}, "search_space.json")
    study.set_user_attr("mlflow_parent_run_id", parent.info.run_id)
    return parent.info.run_id


def make_probe(trial: optuna.Trial, eval_cfg: Mapping, windows: int, child: dict):
    """After quantization: KL on the first ``windows`` evaluation windows, reported to the pruner."""

    def probe(model: torch.nn.Module, tokens: torch.Tensor, reference: evaluate.Scores) -> None:
        child["run_id"] = mlflow.active_run().info.run_id
        start = time.perf_counter()
        prefix = tokens[: windows * int(eval_cfg["context"])]
        proxy = evaluate.kl_on_prefix(model, prefix, reference, eval_cfg)
        log.info("trial %d: proxy KL %.4f (%.1f s)", trial.number, proxy, time.perf_counter() - start)
        mlflow.log_metric("proxy_kl", proxy)
        trial.report(proxy, step=0)
        if trial.should_prune():
            raise optuna.TrialPruned(f"proxy KL {proxy:.4f} is worse than the median of earlier trials")

    return probe


def objective_fn(
    cfg_overrides: list[str], study: optuna.Study, parent_id: str, space: list[dict], rank: int, sampler_seed: int
):
    objectives = study.user_attrs["objectives"]

    def objective(trial: optuna.Trial) -> float | tuple[float, ...]:
        sampled = sample(trial, space)
        overrides = [*cfg_overrides, *sampled]
        trial.set_user_attr("overrides", sampled)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("sampler_seed", sampler_seed)
        trial.set_user_attr("worker_rank", rank)
        cfg = compose_config(overrides)
        if config_on_grid(cfg):
            trial.set_user_attr("skipped", SKIPPED_ON_GRID)
            log.warning("trial %d: %s is on the published grid of %s; not run", trial.number, sampled, cfg.model.name)
            raise optuna.TrialPruned(f"{' '.join(sampled)} is on the grid the model was published on")
        trial.set_user_attr(SKIPPED_ON_GRID, False)
        twin = finished_twin(study, trial)
        if twin is not None:
            original = twin.user_attrs.get("duplicate_of", twin.number)
            trial.set_user_attr("duplicate_of", original)
            if twin.state == PRUNED:
                raise optuna.TrialPruned(f"same settings as trial {original}, which was pruned")
            log.info("trial %d: same settings as trial %d; its values, not a second run", trial.number, original)
            return twin.values[0] if len(twin.values) == 1 else tuple(twin.values)
        experiment_id, _, tags, model_path = run.prepare(cfg, overrides)
        tags |= {
            "tune.study": study.study_name,
            "tune.trial": str(trial.number),
            "tune.sampler_seed": str(sampler_seed),
        }
        name = f"{study.study_name} #{trial.number} " + " ".join(sampled)
        child: dict = {}
        pruning = len(objectives) == 1 and cfg.tune.prune
        eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
        probe = make_probe(trial, eval_cfg, int(cfg.tune.proxy_windows), child) if pruning else None
        try:
            with mlflow.start_run(run_id=parent_id):  # the trial's run nests under the study's
                metrics = run.tracked_run(cfg, experiment_id, name, tags, model_path, probe=probe)
        except optuna.TrialPruned:
            # MLflow marked the run FAILED on the exception; a pruned trial was stopped, not broken.
            mlflow.MlflowClient().set_tag(child["run_id"], "tune.pruned", "true")
            mlflow.MlflowClient().set_terminated(child["run_id"], "KILLED")
            raise
        values = []
        for key in objectives:
            value = metrics.get(key)
            if value is None or not math.isfinite(value):
                raise ValueError(f"trial {trial.number}: objective {key} is {value!r}")
            values.append(value)
        trial.set_user_attr("run_id", metrics["run_id"])
        return values[0] if len(values) == 1 else tuple(values)

    return objective


def config_on_grid(cfg: DictConfig) -> bool:
    container = OmegaConf.to_container(cfg, resolve=True)
    return published_grid.config_on_published_grid(container, resolve_model_path(container["model"]))


def finished_twin(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    """The first finished (complete or pruned) trial with exactly this trial's params."""
    for other in study.get_trials(deepcopy=False, states=(COMPLETE, PRUNED)):
        if other.number != trial.number and other.params == trial.params:
            return other
    return None


def best_trial(study: optuna.Study, base: list[str]) -> optuna.trial.FrozenTrial | None:
    """The best complete trial off the published grid (several objectives: the Pareto trial best on the
    first, ties broken by the next); a trial that reused another's values counts as that one.

    Trials of older studies carry no on-grid mark: their settings are checked here.
    """
    signs = [1 if d == optuna.study.StudyDirection.MINIMIZE else -1 for d in study.directions]
    candidates = [
        t
        for t in study.get_trials(deepcopy=False, states=(COMPLETE,))
        if "duplicate_of" not in t.user_attrs and not _trial_on_grid(t, base)
    ]
    if not candidates:
        return None
    # The lexicographic minimum is on the Pareto front: nothing beats it on the first objective.
    return min(candidates, key=lambda t: (*(s * v for s, v in zip(signs, t.values)), t.number))


def _trial_on_grid(trial: optuna.trial.FrozenTrial, base: list[str]) -> bool:
    marked = trial.user_attrs.get(SKIPPED_ON_GRID)
    if marked is not None:
        return bool(marked)
    return config_on_grid(compose_config([*base, *trial.user_attrs.get("overrides", [])]))


def versus_preset(study: optuna.Study, best: optuna.trial.FrozenTrial, preset: Mapping) -> dict[str, object]:
    """The tuned config's tags that compare its best trial with the preset's, on the first objective."""
    first = study.user_attrs["objectives"][0]
    tags: dict[str, object] = {"tuned_objective": first, "tuned_best_value": float(best.values[0])}
    trial = preset_trial(study, preset)
    if trial is None or trial.state != COMPLETE:
        return {**tags, "tuned_vs_preset": "preset_not_measured"}
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
    gap = sign * (best.values[0] - trial.values[0])
    verdict = "better" if gap < 0 else "same" if gap == 0 else "worse"
    return {**tags, "tuned_preset_value": float(trial.values[0]), "tuned_vs_preset": verdict}


def write_best(
    study: optuna.Study, cfg: DictConfig, base: list[str], trial: optuna.trial.FrozenTrial | None, preset: Mapping
) -> Path | None:
    """The best trial (see ``best_trial``) as an experiment config, tagged with how it compares with the preset."""
    if trial is None:
        return None
    # tracking, hydra and debug settings belong to the machine that tuned, the search space to the
    # study: none of them to the tuned method
    values_only = [o for o in base + trial.user_attrs["overrides"] if not _is_choice(o)]
    machine = ("tracking.", "hydra.", "search.", "debug=")
    nested = OmegaConf.from_dotlist([o for o in values_only if not o.startswith(machine)])
    OmegaConf.update(nested, "tracking.experiment", "tuned", force_add=True)  # tuned methods side by side
    OmegaConf.update(nested, "tracking.tags.tuned_from", study.study_name, force_add=True)
    OmegaConf.update(nested, "tracking.tags.tuned_settings", " ".join(trial.user_attrs["overrides"]), force_add=True)
    for key, value in versus_preset(study, trial, preset).items():
        OmegaConf.update(nested, f"tracking.tags.{key}", value, force_add=True)
    # The experiment tuned on comes first, so that the tuned settings and tags above override it.
    experiment = _experiment(base)
    choices = [o for o in base if _is_choice(o) and not o.startswith("experiment=")]
    values = ", ".join(f"{k}={v:.4g}" for k, v in zip(study.user_attrs["objectives"], trial.values))
    lines = [
        "# @package _global_",
        f"# Written by pipeline.tune: study {study.study_name!r} ({_where(cfg)}), trial {trial.number}: {values}.",
        f"# Rerun: python -m pipeline experiment=tuned/{study.study_name}",
        "defaults:",
        *([f"  - /experiment/{experiment}"] if experiment else []),
        *[f"  - override /{o.split('=', 1)[0]}: {o.split('=', 1)[1]}" for o in choices],
        *(["  - _self_"] if experiment else []),
    ]
    if not choices and not experiment:
        lines.pop()
    path = REPO / cfg.tune.best_dir / f"{study.study_name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + OmegaConf.to_yaml(nested))
    return path


def _is_choice(override: str) -> bool:
    """A config-group choice (``method=gptq``) rather than a value (``method.bits=3``)."""
    key = override.split("=", 1)[0]
    return "." not in key and (CONF / key).is_dir()


def summarize(study: optuna.Study, best: optuna.trial.FrozenTrial | None) -> dict[str, float]:
    trials = study.get_trials(deepcopy=False)
    # Trials that reused another's values or were skipped on the published grid ran nothing.
    ran = [t for t in trials if "duplicate_of" not in t.user_attrs and "skipped" not in t.user_attrs]
    done = [t for t in ran if t.state == COMPLETE and t.duration]
    pruned = [t for t in ran if t.state == PRUNED and t.duration]
    mean_full = sum(t.duration.total_seconds() for t in done) / len(done) if done else 0.0
    saved = sum(max(0.0, mean_full - t.duration.total_seconds()) for t in pruned)
    out = {
        "trials_complete": float(len(done)),
        "trials_pruned": float(len(pruned)),
        "trials_failed": float(sum(t.state == FAIL for t in trials)),
        "trials_duplicate": float(sum("duplicate_of" in t.user_attrs for t in trials)),
        "trials_on_published_grid": float(sum(t.user_attrs.get("skipped") == SKIPPED_ON_GRID for t in trials)),
        "trial_mean_s": mean_full,
        "prune_saved_s": saved,
    }
    if len(study.directions) == 1 and best is not None:
        out["best_value"] = float(best.values[0])
        out["best_trial"] = float(best.number)
    return out


def close_stale_runs(study: optuna.Study, parent_id: str) -> list[str]:
    """Mark FAILED the MLflow runs of trials that Optuna failed as stale (their worker died mid-trial).

    Their process never ended the run, so MLflow still shows it RUNNING. Runs of trials that are still
    RUNNING in Optuna (another live worker) are left alone.
    """
    failed = {str(t.number) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))}
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent_id).info.experiment_id
    query = f"tags.`tune.study` = '{study.study_name}' and attributes.status = 'RUNNING'"
    closed = []
    for r in client.search_runs([experiment_id], filter_string=query):
        if r.data.tags.get("tune.trial") in failed:
            client.set_tag(r.info.run_id, "tune.stale", "true")
            client.set_terminated(r.info.run_id, "FAILED")
            closed.append(r.info.run_id)
    if closed:
        log.info("study %s: %d run(s) of dead workers' trials marked FAILED", study.study_name, len(closed))
    return closed


def setup_study(
    overrides: list[str], join: bool = False
) -> tuple[DictConfig, optuna.Study, str, list[dict], list[str], tuple[int, int]]:
    """Check the config, the storage and the search space, open (or create) the study and its MLflow
    parent run; ``join``: take a worker rank and its sampler seed (else: rank 0 and the configured seed).

    Study, parent run, preset trial and rank are made under the study lock: processes that start at the
    same instant, on any machines, make one study, one parent run and one preset trial.
    """
    cfg = compose_config(overrides)
    experiment_id, *_ = run.prepare(cfg, overrides)  # the run's own checks first: a bad method makes no study
    store = storage(cfg)  # answers, or an error before the model is loaded
    space = check_space(cfg)
    objectives = check_objectives(cfg)
    name = cfg.tune.study_name or f"{cfg.model.name}-{cfg.method.name}".replace("/", "_")
    base = [o for o in overrides if not o.startswith("tune.")]
    rank, seed = 0, int(cfg.tune.sampler_seed)
    with tune_storage.study_lock(store, name):
        study = open_study(cfg, store, name, space, objectives, base)
        study.set_user_attr("base_experiment", _experiment(overrides))
        mlflow.set_experiment(experiment_id=experiment_id)  # resuming the parent run checks the active experiment
        parent_id = parent_run(study, experiment_id, cfg)
        if join:
            rank, seed = join_study(study, space, int(cfg.tune.n_trials), seed)
            log.info("study %s: worker rank %d, sampler seed %d", name, rank, seed)
    return cfg, study, parent_id, space, base, (rank, seed)


def tune(overrides: list[str]) -> optuna.Study:
    cfg, study, parent_id, space, base, (rank, sampler_seed) = setup_study(overrides, join=True)
    name = study.study_name
    remaining = int(cfg.tune.n_trials) - sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    start = time.perf_counter()
    if remaining > 0:
        log.info("study %s: %d trial(s) to run of %d", name, remaining, cfg.tune.n_trials)
        study.optimize(
            objective_fn(base, study, parent_id, space, rank, sampler_seed),
            n_trials=remaining,
            # A trial's error is recorded (FAIL in Optuna, FAILED in MLflow) and the study goes on.
            catch=(ValueError, RuntimeError, ArithmeticError),
            callbacks=[optuna.study.MaxTrialsCallback(int(cfg.tune.n_trials), states=FINISHED)],
        )
    else:
        log.info("study %s already has %d finished trials; nothing to run", name, cfg.tune.n_trials)
    close_stale_runs(study, parent_id)
    best = best_trial(study, base)
    summary = summarize(study, best)
    with mlflow.start_run(run_id=parent_id):
        mlflow.log_metrics(summary)
        mlflow.log_metric("worker_wall_s", time.perf_counter() - start)
        path = write_best(study, cfg, base, best, preset_params(cfg, space)) if cfg.tune.best_dir else None
        if path is not None:
            mlflow.log_artifact(str(path))
            mlflow.set_tag("best_config", str(path))
    log.info("study %s: %s; best config: %s", name, summary, path)
    return study


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.tune [Hydra overrides]``; bad input is one ``error:`` line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    guard(lambda: _main(argv), argv)


def _main(overrides: list[str]) -> None:
    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        raise ValueError(
            f"pipeline.tune takes Hydra overrides (key=value) like python -m pipeline, not {flags}; "
            f"e.g. tune.workers=2 for two processes on one study"
        )
    cfg = compose_config(overrides)
    workers, engine = cfg.tune.workers, cfg.tune.engine
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"tune.workers must be a positive integer, got {workers!r}")
    if engine not in ENGINES:
        raise ValueError(f"tune.engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "ray":
        from pipeline import ray_workers  # Ray is imported only when asked for

        ray_workers.run(cfg, workers, overrides)
    elif workers > 1:
        _spawn(workers, overrides)
    else:
        tune(overrides)


def _spawn(workers: int, overrides: list[str]) -> None:
    """Start ``workers`` processes on one study, created here first so that they do not race to create it.

    Each worker gets an equal share of the cores (threads oversubscribed across processes run far slower).
    """
    setup_study(overrides)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
    # Each worker takes its own sampler seed from the study (join_study).
    own = [o for o in overrides if not o.startswith("tune.workers=")]
    cmd = [sys.executable, "-m", "pipeline.tune", *own, "tune.workers=1"]
    procs = [subprocess.Popen(cmd, env=env) for _ in range(workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"worker exit codes: {codes}")


if __name__ == "__main__":
    main()
