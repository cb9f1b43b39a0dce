"""Mixed precision: bytes counted as stored, the allocation inside its budget, sensitivities that rank."""

import dataclasses

import pytest
import torch
from conftest import layers_cfg, tiny_llama

from pipeline import layers
from pipeline.algorithms import allocate
from pipeline.quant.linear import QuantLinear
from pipeline.quant.primitives import QuantSpec, block_size_for

BATCHES = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "spec,granularity,group,bias",
    [
        (QuantSpec(bits=2, symmetric=False), "group", 32, False),
        (QuantSpec(bits=3, symmetric=False), "group", 64, True),
        (QuantSpec(bits=4, symmetric=False, zero_point_domain="float"), "group", 64, False),
        (QuantSpec(bits=4, symmetric=True), "group", 32, False),
        (QuantSpec(bits=8, symmetric=True), "per_channel", None, True),
    ],
)
def test_stored_bytes_are_what_a_quantized_layer_stores(spec, granularity, group, bias):
    weight = torch.randn(96, 192, generator=torch.Generator().manual_seed(1))
    block = block_size_for(tuple(weight.shape), granularity, group)
    layer = QuantLinear.from_float(weight, spec, block, torch.zeros(96) if bias else None)
    assert allocate.stored_bytes(tuple(weight.shape), spec, block, bias) == layer.weight_bytes


def _choice(name, sensitivity_scale, numel=64 * 64):
    # bytes as a g64 asymmetric layer stores them; sensitivity falls 4x per extra bit
    spec = QuantSpec(bits=2, symmetric=False)
    sizes = {b: allocate.stored_bytes((64, 64), dataclasses.replace(spec, bits=b), (1, 64), False) for b in (2, 3, 4)}
    return allocate.LayerChoice(name, numel, sizes, {b: sensitivity_scale * 4.0 ** (-b) for b in (2, 3, 4)})


def test_the_allocation_keeps_its_budget_and_widens_the_sensitive_layers_first():
    layers_ = [_choice(f"l{i}", scale) for i, scale in enumerate([1.0, 1.0, 1.0, 100.0, 1.0, 30.0])]
    for budget in (2.3, 2.8, 3.3, 3.9):
        choice = allocate.allocate(layers_, budget)
        assert allocate.average_bits(layers_, choice) <= budget
        assert choice["l3"] >= choice["l5"] >= choice["l0"]  # sensitivity order
    assert set(allocate.allocate(layers_, 100.0).values()) == {4}  # all at the widest when it fits
    with pytest.raises(ValueError, match="below what the narrowest candidate stores"):
        allocate.allocate(layers_, 2.0)  # 2-bit g64 stores 2.28 bits per weight with scales and zeros


def test_the_allocation_beats_every_uniform_width_it_can_afford():
    layers_ = [_choice(f"l{i}", s) for i, s in enumerate([50.0, 1.0, 1.0, 1.0, 8.0, 0.5, 3.0, 1.0])]
    uniform3 = {layer.name: 3 for layer in layers_}
    budget = allocate.average_bits(layers_, uniform3)
    choice = allocate.allocate(layers_, budget)

    def total(c):
        return sum(layer.sensitivity_by_bits[c[layer.name]] for layer in layers_)

    assert total(choice) < total(uniform3)


def test_fisher_sensitivities_rank_widths_and_are_reproducible():
    model = tiny_llama()
    selected, _ = layers.select_layers(model, layers_cfg())
    spec = QuantSpec(bits=4, symmetric=False)
    flags = [p.requires_grad for p in model.parameters()]
    first = allocate.measure(model, selected, BATCHES, spec, "group", 32, [2, 3, 4])
    again = allocate.measure(model, selected, BATCHES, spec, "group", 32, [2, 3, 4])
    assert first == again
    for layer in first:
        s = layer.sensitivity_by_bits
        assert s[2] > s[3] > s[4] > 0
    assert [p.requires_grad for p in model.parameters()] == flags  # the model is left as it was
    overrides = allocate.as_overrides(allocate.allocate(first, 3.0), default_bits=4)
    assert overrides and all(set(o) == {"pattern", "bits"} for o in overrides)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"budget_bits": 3.0, "candidates": [2, 3, 4]}, "missing: \\['samples'\\]"),
        ({"budget_bits": 3.0, "candidates": [4], "samples": 8}, "at least two widths"),
        ({"budget_bits": 3.0, "candidates": [1, 4], "samples": 8}, "widths in 2..8"),
        ({"budget_bits": 3.0, "candidates": [2, 3], "samples": 8}, "method.bits=4 .* must be in"),
        ({"budget_bits": 0, "candidates": [2, 4], "samples": 8}, "positive number of bits"),
    ],
)
def test_bad_allocation_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        allocate.check_options(options, method_bits=4)


def test_the_allocate_step_runs_in_the_quantize_stage_and_its_overrides_reproduce_it(monkeypatch):
    """mixed_w3 end to end on a tiny model: mixed widths reach the quantized layers, they store at most
    the budget, and the logged overrides with steps [gptq] reproduce the same weights without the step."""
    from conftest import compose_cfg
    from omegaconf import OmegaConf

    from pipeline import checkpoint, profile, run

    artifacts = {}
    monkeypatch.setattr(run.mlflow, "active_run", lambda: True)
    monkeypatch.setattr(run.mlflow, "log_dict", lambda content, name: artifacts.__setitem__(name, content))

    def quantized(*overrides, layer_overrides=()):
        container = OmegaConf.to_container(compose_cfg("method=mixed_w3", *overrides), resolve=True)
        container["method"]["group_size"] = 32
        container["method"]["layer_overrides"] = list(layer_overrides)
        model, logged = tiny_llama(), {}
        run.quantize_stage(model, container, lambda: BATCHES, 0, "auto", logged.update, log_step=lambda *_: None)
        return model, logged

    model, logged = quantized("method.allocate.samples=2")
    n_params, ref_bytes = profile.parameter_footprint(tiny_llama())
    assert profile.memory_metrics(model, n_params, ref_bytes)["bits_per_weight"] <= 3.0
    assert logged["allocate_bits_per_weight"] <= 3.0
    assert len({m.spec.bits for m in model.modules() if hasattr(m, "packed")}) > 1  # mixed
    overrides = artifacts["allocation_overrides.yaml"]["layer_overrides"]
    assert len(artifacts["allocation.json"]) == 14 and overrides
    again, _ = quantized("method.steps=[gptq]", "method.allocate=null", layer_overrides=overrides)
    digest = [checkpoint.weights_sha256(checkpoint.model_tensors(m)[0]) for m in (model, again)]
    assert digest[0] == digest[1]


def test_an_allocation_composes_with_awq_and_reconstruction_each_layer_on_its_own_width():
    """[allocate, awq, reconstruct, rtn]: reconstruction trains each layer at the width the allocation
    gave it (its grid is fixed at that width), so the packed layers keep the mixed widths."""
    from conftest import compose_cfg
    from omegaconf import OmegaConf

    from pipeline import run

    container = OmegaConf.to_container(
        compose_cfg(
            "method=mixed_w3",
            "method.steps=[allocate,awq,reconstruct,rtn]",
            "method.gptq=null",
            "+method.awq={grid:4,clip:false,max_shrink:0.5}",
            "+method.reconstruct={epochs:1,lr:0.1,weight_lr:0.02,micro_batch:4,init:4.0,target:float}",
            "method.allocate.samples=2",
            "method.group_size=32",
        ),
        resolve=True,
    )
    model, logged = tiny_llama(), {}
    records = run.quantize_stage(model, container, lambda: BATCHES, 0, "auto", logged.update, log_step=lambda *_: None)
    widths = {r.layer: r.bits for r in records if r.quantized}
    assert len(set(widths.values())) > 1 and logged["reconstruct_mse_ratio"] > 0
    packed = {name: m.spec.bits for name, m in model.named_modules() if hasattr(m, "packed")}
    assert packed == widths  # each layer packed at the width the allocation chose, through reconstruction


def test_with_awq_the_budget_counts_the_explicit_input_scales_awq_will_store():
    """[allocate, awq, rtn]: AWQ keeps an fp16 input scale where no norm can absorb its scale
    (o_proj, down_proj). The allocation predicts those layers before AWQ runs and counts their bytes,
    so what is stored is what the allocation counted, within the budget."""
    from conftest import compose_cfg
    from omegaconf import OmegaConf

    from pipeline import profile, run
    from pipeline.algorithms import awq

    container = OmegaConf.to_container(
        compose_cfg(
            "method=mixed_w3",
            "method.steps=[allocate,awq,rtn]",
            "method.gptq=null",
            "+method.awq={grid:4,clip:false,max_shrink:0.5}",
            "method.allocate.samples=2",
            "method.group_size=32",
        ),
        resolve=True,
    )
    names = list(layers.select_layers(tiny_llama(), container["layers"])[0])
    predicted = awq.explicit_scale_layers(tiny_llama(), names, BATCHES[0])
    assert predicted and all(n.endswith(("o_proj", "down_proj")) for n in predicted)
    model, logged = tiny_llama(), {}
    run.quantize_stage(model, container, lambda: BATCHES, 0, "auto", logged.update, log_step=lambda *_: None)
    explicit = {n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.input_scale is not None}
    assert explicit == predicted
    n_params, ref_bytes = profile.parameter_footprint(tiny_llama())
    stored = profile.memory_metrics(model, n_params, ref_bytes)["bits_per_weight"]
    assert stored == pytest.approx(logged["allocate_bits_per_weight"], abs=1e-9) and stored <= 3.0
