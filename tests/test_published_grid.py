"""The grid a model was published on: which settings sit on it, and the tag every run carries."""

import logging

import pytest
from conftest import compose_cfg, method_cfg, tiny_llama
from omegaconf import OmegaConf

from pipeline import published_grid, run

Q4_1 = {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 32, "zero_point_domain": "float"}
SMOLLM2 = {"published_grid": Q4_1}


def test_the_embedded_model_declares_its_q4_1_grid_and_an_hf_model_none():
    assert OmegaConf.to_container(compose_cfg().model.published_grid) == Q4_1
    assert compose_cfg("model=hf", "model.path=/x").model.published_grid is None


@pytest.mark.parametrize(
    "method, overrides, on",
    [
        ("group_wise", ["method.group_size=32", "method.zero_point_domain=float"], True),
        ("gptq", ["method.group_size=32", "method.zero_point_domain=float"], True),  # any algorithm
        ("group_wise", [], False),  # group 64, integer zero point: the preset is off the grid
        ("group_wise", ["method.group_size=32"], False),  # integer zero point
        ("asymmetric", ["method.zero_point_domain=float"], False),  # per-channel
        ("symmetric", ["method.group_size=32"], False),
        ("fp", [], False),
    ],
)
def test_a_setting_is_on_the_grid_when_every_declared_key_matches(method, overrides, on):
    assert published_grid.on_published_grid(method_cfg(method, *overrides), SMOLLM2) is on
    assert published_grid.on_published_grid(method_cfg(method, *overrides), {"published_grid": None}) is False


def test_layer_overrides_count_by_the_share_of_weights_they_cover():
    on_grid = method_cfg("group_wise", "method.group_size=32", "method.zero_point_domain=float")
    weights = {"l.0.q_proj": 100, "l.0.down_proj": 300, "l.1.q_proj": 100}
    down_wider = {**on_grid, "layer_overrides": [{"pattern": ".*down_proj", "bits": 8}]}
    assert published_grid.on_published_grid(down_wider, SMOLLM2, weights) is False  # 300 of 500 weights off it
    q_wider = {**on_grid, "layer_overrides": [{"pattern": ".*q_proj", "bits": 8}]}
    assert published_grid.on_published_grid(q_wider, SMOLLM2, weights) is True  # 300 of 500 still on it
    off_grid = method_cfg("group_wise")
    down_on = {
        **off_grid,
        "layer_overrides": [{"pattern": ".*down_proj", "group_size": 32, "zero_point_domain": "float"}],
    }
    assert published_grid.on_published_grid(down_on, SMOLLM2, weights) is True
    with pytest.raises(ValueError, match="needs the layer names"):
        published_grid.on_published_grid(down_on, SMOLLM2)


def test_a_bad_published_grid_is_refused():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bit'\]; allowed: bits, symmetric"):
        published_grid.on_published_grid(method_cfg("group_wise"), {"published_grid": {"bit": 4}})
    with pytest.raises(ValueError, match="must be null or a mapping"):
        published_grid.on_published_grid(method_cfg("group_wise"), {"published_grid": 4})


def test_layer_weights_come_from_the_model_config_alone(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)  # no weights on disk: the meta device needs only the shapes
    layers = OmegaConf.to_container(compose_cfg().layers)
    weights = published_grid.selected_layer_weights({"trust_remote_code": False}, layers, str(tmp_path))
    expected = {
        n: m.weight.numel()
        for n, m in model.named_modules()
        if n.startswith("model.layers.") and hasattr(m, "in_features")
    }
    assert weights == expected


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")  # one MLflow store for both: creating one takes seconds


@pytest.mark.parametrize(
    "overrides, tag", [(["method.group_size=32", "method.zero_point_domain=float"], "true"), ([], "false")]
)
def test_every_run_is_tagged_and_a_run_on_the_grid_warns(store, caplog, overrides, tag):
    cfg = compose_cfg("method=group_wise", *overrides, f"tracking.uri=sqlite:///{store}/mlflow.db")
    with caplog.at_level(logging.WARNING, logger="pipeline.run"):
        _, _, tags, _ = run.prepare(cfg, [])
    assert tags["on_published_grid"] == tag
    assert ("published on (bits=4, symmetric=False" in caplog.text) is (tag == "true")
