"""Every shipped config composes and passes the checks that need no model (fast tier)."""

import itertools
from pathlib import Path

import pytest
from conftest import CONF
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from pipeline import published_grid, run, tune

EXPERIMENTS = sorted(
    str(p.relative_to(CONF / "experiment").with_suffix("")) for p in (CONF / "experiment").rglob("*.yaml")
)
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
SEARCHED = sorted(p.stem for p in (CONF / "search").glob("*.yaml"))


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def _sweep(experiment: str) -> list[list[str]]:
    """The runs an experiment's own sweep makes (one empty run if it is not a sweep)."""
    params = OmegaConf.select(_compose(f"experiment={experiment}", hydra=True), "hydra.sweeper.params") or {}
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    axes = [
        [f"{o.key_or_group}={v}" for v in (o.sweep_string_iterator() if o.is_sweep_override() else [o.value()])]
        for o in parsed
    ]
    return [list(combination) for combination in itertools.product(*axes)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"tracking.uri=sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment, store):
    runs = _sweep(experiment)
    assert runs, experiment
    for overrides in runs:
        cfg = _compose(f"experiment={experiment}", *overrides, store)
        run.prepare(cfg, overrides)  # every check that needs no model (method, protocol, tasks, store, grid)


@pytest.mark.parametrize("experiments", [("compare", "frontier"), ("suite",)])
def test_the_comparisons_sweep_every_method_preset(experiments):
    # a preset added to conf/method/ but not to a sweep would silently drop out of the tables; the
    # default comparison leaves the slow frontier methods to their own experiment, which repeats the
    # uniform presets they compete with
    swept = sorted({o.split("=", 1)[1] for experiment in experiments for (o,) in _sweep(experiment)})
    assert swept == METHODS, f"conf/experiment/{'+'.join(experiments)} sweep {swept}; conf/method/ has {METHODS}"


@pytest.mark.parametrize("method", METHODS)
def test_no_method_preset_sits_on_the_embedded_models_published_grid(method):
    cfg = OmegaConf.to_container(_compose(f"method={method}"), resolve=True)
    assert not published_grid.on_published_grid(cfg["method"], cfg["model"]), method


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.startswith("tuned/")])
def test_no_tuned_config_sits_on_the_published_grid(experiment):
    # a tuned config on the grid reproduces the checkpoint: it says nothing about the method
    cfg = OmegaConf.to_container(_compose(f"experiment={experiment}"), resolve=True)
    assert not published_grid.on_published_grid(cfg["method"], cfg["model"]), experiment


def _settings(space: list[dict]) -> list[dict]:
    """Every setting of a space: each choice, and both ends of each numeric range (conditions respected)."""
    settings = [{}]
    for param in space:
        values = param["choices"] if "choices" in param else [param["low"], param["high"]]
        grown = []
        for setting in settings:
            if any(setting.get(key) != value for key, value in (param.get("when") or {}).items()):
                grown.append(setting)
            else:
                grown += [{**setting, param["name"]: value} for value in values]
        settings = grown
    return settings


@pytest.mark.parametrize("method", SEARCHED)
def test_every_search_space_composes_with_its_method(method, monkeypatch):
    monkeypatch.setattr(tune, "_valid_choices", lambda cfg, choices: choices)  # group sizes: per model, elsewhere
    cfg = tune.compose_config([f"method={method}"])
    space = tune.check_space(cfg)  # names existing keys, choices or ranges, conditions on earlier params
    # the preset is a point of the space: each param its conditions make active admits the preset's value
    preset = tune.preset_params(cfg, space)
    active = [p["name"] for p in space if all(preset.get(k) == v for k, v in (p.get("when") or {}).items())]
    assert sorted(preset) == sorted(active), f"the {method} preset {preset} is not a point of its search space"
    for setting in _settings(space):
        trial = cfg.copy()
        for name, value in setting.items():
            OmegaConf.update(trial, name, value)
        container = OmegaConf.to_container(trial, resolve=True)
        run.check_method(container["method"])  # no setting the space can draw is refused by the run
        if method in METHODS:
            assert container["method"]["name"] == method
    assert method in METHODS, f"conf/search/{method}.yaml has no method preset"


def test_experiment_paths_are_all_found():
    assert {"compare", "smoke", "suite"} <= set(EXPERIMENTS) and any(e.startswith("tuned/") for e in EXPERIMENTS)
    assert Path(CONF / "experiment" / "tuned").is_dir()


def test_an_unknown_kernel_is_refused_before_any_work(store):
    cfg = _compose("kernels=fastest", store)
    with pytest.raises(ValueError, match="kernels must be one of auto, .*aten_int4_groupwise.*dequant, got 'fastest'"):
        run.prepare(cfg, ["kernels=fastest"])
