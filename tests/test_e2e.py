"""End-to-end step-size training (pipeline/algorithms/e2e.py, the ``e2e`` finish step) on a tiny Llama."""

import copy

import pytest
import torch
from conftest import compose_cfg, tiny_llama
from omegaconf import OmegaConf

from pipeline import run, steps, train
from pipeline.algorithms import e2e
from pipeline.quant.linear import QuantLinear

BATCHES = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
OPTIONS = {"steps": 30, "batch_size": 4, "lr": 2e-3, "warmup_fraction": 0.1, "max_grad_norm": 1.0, "loss": "kd"}


W2_RTN = ("method=w2_group", "method.steps=[rtn]", "method.awq=null", "method.gptq=null")


def _container(*overrides: str, e2e_options: dict | None = None) -> dict:
    container = OmegaConf.to_container(compose_cfg(*(overrides or W2_RTN)), resolve=True)
    if e2e_options is not None:
        container["method"]["steps"] = [*container["method"]["steps"], "e2e"]
        container["method"]["e2e"] = dict(e2e_options)
    return container


def _quantized(container: dict) -> tuple[torch.nn.Module, dict]:
    model, logged = tiny_llama(), {}
    run.quantize_stage(model, container, lambda: BATCHES, 0, "auto", logged.update, log_step=lambda *_: None)
    return model, logged


@torch.no_grad()
def _kl(model, teacher, ids) -> float:
    return float(train.distillation_loss(model(input_ids=ids).logits, teacher(input_ids=ids).logits))


def _layers(model) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_training_the_step_sizes_brings_the_model_closer_to_the_float_one():
    """The defining property: with codes and zero points fixed, the trained scales lower the KL to
    the float model on the calibration text; nothing but the scales changes, and the bytes stay.
    (A random tiny model on random tokens has nothing to generalise, so no held-out text here.)"""
    teacher = tiny_llama()
    rtn, _ = _quantized(_container())
    trained, logged = _quantized(_container(e2e_options=OPTIONS))
    assert _kl(trained, teacher, BATCHES) < 0.6 * _kl(rtn, teacher, BATCHES)
    assert logged["e2e_loss_last"] < logged["e2e_loss_first"] and logged["e2e_scale_change"] > 0
    before, after = _layers(rtn), _layers(trained)
    assert before.keys() == after.keys()
    for name, layer in after.items():
        assert torch.equal(layer.codes(), before[name].codes()), name
        assert torch.equal(layer.zero_points(), before[name].zero_points()), name
        assert layer.scale.dtype == before[name].scale.dtype and layer.weight_bytes == before[name].weight_bytes
    assert any(not torch.equal(after[n].scale, before[n].scale) for n in after)


def test_the_same_seed_trains_the_same_scales():
    first, _ = _quantized(_container(e2e_options={**OPTIONS, "steps": 5}))
    second, _ = _quantized(_container(e2e_options={**OPTIONS, "steps": 5}))
    for name, layer in _layers(first).items():
        assert torch.equal(layer.scale, _layers(second)[name].scale), name


def test_a_step_size_layer_computes_what_its_quantized_layer_computes():
    """Before any training, the trainable view reproduces the packed layer: codes, zero points, bias,
    the low-rank term and an explicit input scale included."""
    weight, bias = torch.randn(24, 64), torch.randn(24)
    for kwargs in ({}, {"lowrank": (torch.randn(24, 4), torch.randn(4, 64))}, {"input_scale": torch.rand(64) + 0.5}):
        layer = QuantLinear.from_float(
            weight, run.quantize.weight_spec(_container()["method"]), (1, 32), bias, **kwargs
        )
        x = torch.randn(5, 64)
        assert torch.allclose(e2e.StepSizeLinear(layer)(x), layer(x), atol=1e-5)


def test_cross_entropy_needs_no_teacher_and_kd_without_one_is_refused():
    container = _container(e2e_options={**OPTIONS, "steps": 3, "loss": "ce"})
    assert not steps.needs_teacher(container["method"])
    assert steps.needs_teacher(_container(e2e_options=OPTIONS)["method"])
    _, logged = _quantized(container)
    assert logged["e2e_s"] > 0
    model = copy.deepcopy(_quantized(_container())[0])
    with pytest.raises(ValueError, match="distills from the float model, but no teacher was kept"):
        e2e.train_step_sizes(model, None, BATCHES, OPTIONS, 0)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"steps": 0}, "method.e2e.steps must be a positive integer"),
        ({"lr": -1.0}, "method.e2e.lr must be a positive number"),
        ({"loss": "mse"}, "method.e2e.loss must be one of kd, ce"),
        ({"warmup_fraction": 1.0}, r"warmup_fraction must be in \[0, 1\)"),
        ({"epochs": 3}, "unknown: \\['epochs'\\]"),
    ],
)
def test_bad_options_are_refused_before_any_model_loads(change, message):
    with pytest.raises(ValueError, match=message):
        steps.check_steps(_container(e2e_options={**OPTIONS, **change})["method"])


def test_e2e_comes_after_the_codes_step_and_on_weight_only_layers():
    method = _container(e2e_options=OPTIONS)["method"]
    steps.check_steps(method)
    assert steps.describe_steps(method) == "rtn+e2e_scales(kd,30st)"
    with pytest.raises(ValueError, match=r"then the codes step, then finish steps; got e2e \(finish\), rtn"):
        steps.check_steps({**method, "steps": ["e2e", "rtn"]})
    with pytest.raises(ValueError, match="must end with exactly one codes step .*only finish steps, e2e"):
        steps.check_steps({**method, "steps": ["e2e"]})
    static = _container("method=ptq_static", e2e_options=OPTIONS)["method"]
    with pytest.raises(ValueError, match="method.e2e trains the weight scales of weight-only layers"):
        steps.check_steps(static)
