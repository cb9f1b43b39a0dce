"""method.steps (pipeline/steps.py): the one check of a method's steps, legacy translation, the tag."""

import logging

import pytest
import torch
from conftest import CONF, compose_cfg, layers_cfg, method_cfg, tiny_llama

from pipeline import layers, quantize, run, steps, train

PRESETS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
GPTQ_OPTIONS = {"damp": 0.01, "block": 128, "act_order": False, "threads": None}
AWQ_OPTIONS = {"grid": 20, "clip": True, "max_shrink": 0.5}


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_lists_its_steps_and_passes_the_run_checks(name):
    method = method_cfg(name)
    assert "algorithm" not in method and isinstance(method["steps"], list)
    run.check_method(method)


def _with(name: str, **changes) -> dict:
    return {**method_cfg(name), **changes}


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (_with("group_wise", steps="rtn"), r"method.steps must be a list of step names \(allocate, smooth, train, awq"),
        (_with("group_wise", steps=["rtn", "smoothquant"]), r"'smoothquant'.*allowed: allocate, smooth, train"),
        (_with("activation_aware", steps=["awq"]), r"must end with exactly one codes step \(rtn, gptq, hqq, lowrank\)"),
        (_with("gptq", steps=["gptq", "rtn"]), "must end with exactly one codes step"),
        (_with("gptq", steps=["rtn", "rtn"], gptq=None), "lists a step twice"),
        (_with("qat", steps=["awq", "train", "rtn"], awq=AWQ_OPTIONS), r"model steps, then block steps.*awq \(block\)"),
        (_with("gptq", steps=["rtn"]), r"method.gptq is set but 'gptq' is not in method.steps \['rtn'\]"),
        (_with("group_wise", steps=["gptq"]), r"step 'gptq' needs its options under method.gptq"),
        (_with("gptq", gptq={"damp": 0.01}), r"method.gptq lacks block, act_order"),
        (_with("group_wise", rtn={"x": 1}), r"step 'rtn' takes no options"),
        (_with("qat", train={**method_cfg("qat")["train"], "steps": 0}), r"method.train.steps > 0"),
        (_with("qat", steps=["train", "gptq"], gptq=GPTQ_OPTIONS), r"train fixes each layer's grid.*got 'gptq'"),
        (_with("group_wise", algorithm="rtn"), r"method.algorithm is gone.*method.steps=\[awq,gptq\]"),
    ],
)
def test_check_steps_names_what_is_wrong_and_what_is_allowed(method, message):
    with pytest.raises(ValueError, match=message):
        steps.check_steps(method)


def _legacy(method: dict) -> dict:
    """A method preset as it was written before method.steps: ``algorithm`` named the codes step."""
    out = {k: v for k, v in method.items() if k != "steps"}
    out["algorithm"] = method["steps"][-1] if method["steps"] else "none"
    return out


# configs from before method.steps had no finish steps (e2e came after them): no legacy form to test
LEGACY_PRESETS = [name for name in PRESETS if "e2e" not in method_cfg(name)["steps"]]


@pytest.mark.parametrize("name", LEGACY_PRESETS)
def test_every_preset_in_its_legacy_form_translates_to_its_steps(name, caplog):
    method = method_cfg(name)
    with caplog.at_level(logging.WARNING, logger="pipeline.steps"):
        translated = steps.with_steps(_legacy(method))
    assert translated == method
    assert f"method.steps=[{','.join(method['steps'])}]" in caplog.text  # the warning names the new form


@pytest.mark.parametrize(
    ("legacy", "expected"),
    [
        ({"algorithm": "none", "awq": AWQ_OPTIONS}, []),  # nothing was quantized: AWQ never ran
        ({"algorithm": "gptq", "awq": AWQ_OPTIONS, "gptq": GPTQ_OPTIONS}, ["awq", "gptq"]),
        ({"algorithm": "rtn", "awq": None}, ["rtn"]),
        ({"algorithm": "gptq", "train": {"steps": 1}, "gptq": GPTQ_OPTIONS}, ["train", "rtn"]),  # as it ran
        ({"algorithm": "gptq", "steps": ["awq", "rtn"]}, ["awq", "gptq"]),  # +method.algorithm=gptq on a preset
        ({"algorithm": "none", "steps": ["awq", "rtn"]}, []),
        ({"algorithm": "gptq", "steps": ["awq", "reconstruct", "rtn", "e2e"]}, ["awq", "reconstruct", "gptq", "e2e"]),
    ],
)
def test_legacy_translation_gives_the_steps_that_ran(legacy, expected, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.steps"):
        assert steps.steps_from_legacy(legacy) == expected
    assert "method.algorithm is gone" in caplog.text


def test_legacy_qat_with_another_algorithm_says_it_ran_as_rtn(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.steps"):
        steps.steps_from_legacy({"algorithm": "gptq", "train": {"steps": 1}})
    assert "never by gptq" in caplog.text


def test_an_unknown_legacy_algorithm_is_refused():
    with pytest.raises(ValueError, match=r"unknown method.algorithm 'awq'; it named one of: none, rtn, gptq"):
        steps.steps_from_legacy({"algorithm": "awq"})


def test_an_old_w2_group_config_drops_its_unread_hqq_options_and_says_so(caplog):
    old = {
        **_legacy(method_cfg("w2_group")),
        "hqq": {"iters": 20, "lp_norm": 0.7, "beta": 10.0, "kappa": 1.01},  # w2_group.yaml carried it unread
    }
    with caplog.at_level(logging.WARNING, logger="pipeline.steps"):
        translated = steps.with_steps(old)
    assert translated["steps"] == ["awq", "gptq"] and translated["hqq"] is None and "algorithm" not in translated
    assert "method.hqq is dropped" in caplog.text
    steps.check_steps(translated)
    assert steps.describe_steps(translated) == "awq_scales+clip+gptq(act_order)"


def test_a_legacy_override_is_translated_before_the_run_and_tagged_as_it_runs(tmp_path):
    cfg = compose_cfg("method=w2_group", "+method.algorithm=rtn", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    _, _, tags, _ = run.prepare(cfg, ["method=w2_group", "+method.algorithm=rtn"])
    assert list(cfg.method.steps) == ["awq", "rtn"] and "algorithm" not in cfg.method and cfg.method.gptq is None
    assert tags["algorithm"] == "awq_scales+clip+rtn"


def test_the_tag_joins_the_steps_in_the_order_they_run():
    method = _with("w2_group", steps=["train", "rtn"], train=method_cfg("qat")["train"], awq=None, gptq=None)
    assert steps.describe_steps(method) == "qat(lsq,kd)+rtn"
    assert steps.describe_steps(_with("w2_group", gptq={**GPTQ_OPTIONS, "act_order": False})) == "awq_scales+clip+gptq"


@pytest.mark.parametrize(
    ("name", "sequential", "calibrated"),
    [
        ("fp", False, False),
        ("group_wise", False, False),
        ("ptq_static", False, True),
        ("gptq", True, True),
        ("activation_aware", True, True),
        ("lowrank_w4", False, False),
        ("qat", False, True),
    ],
)
def test_calibration_and_the_block_loop_follow_from_the_steps(name, sequential, calibrated):
    method = method_cfg(name)
    assert steps.is_sequential(method) == sequential and steps.needs_calibration(method) == calibrated


def test_quantize_model_refuses_a_method_whose_model_steps_have_not_run():
    with pytest.raises(ValueError, match=r"model steps \['train'\] that quantize_model does not run"):
        quantize.quantize_model(tiny_llama(), method_cfg("qat"), layers_cfg())


def test_rtn_on_a_trained_grid_rounds_onto_that_grid():
    model = tiny_llama()
    method = method_cfg("qat", "method.train.steps=1", "method.train.loss=ce", "method.train.batch_size=2")
    selected, _ = layers.select_layers(model, layers_cfg())
    fakes = train.prepare(model, selected, method, True, layers.float_weight, quantize.weight_spec(method))
    batches = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    train.fit(model, fakes, batches, method["train"], seed=0)
    fake = next(iter(fakes.values()))
    grid = fake.fixed_grid()
    result = steps.STEPS["rtn"].run(fake.weight.detach(), grid.spec, grid.block_size, None, {}, {}, grid=grid)
    codes, scale, zero = train.converted(fake)
    assert torch.equal(result.codes, codes) and torch.equal(result.scale, scale) and torch.equal(result.zero, zero)
