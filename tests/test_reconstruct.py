"""Block-wise reconstruction (pipeline/algorithms/reconstruct.py): its defining property, on a tiny Llama."""

import copy

import pytest
import torch
from conftest import layers_cfg, method_cfg, tiny_llama

from pipeline import quantize as quantize_stage
from pipeline import steps
from pipeline.algorithms import reconstruct
from pipeline.algorithms.gptq import gptq_quantize
from pipeline.algorithms.sequential import _first_block_inputs, block_output, decoder_blocks, run_blocks
from pipeline.layers import float_weight
from pipeline.quant.linear import QuantLinear
from pipeline.quant.primitives import (
    QuantSpec,
    block_size_for,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
    to_blocks,
)

OPTIONS = {"epochs": 20, "lr": 0.1, "weight_lr": None, "micro_batch": 2, "init": 4.0, "target": "block"}
SPEC = QuantSpec(bits=2, symmetric=False)
LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")
LAYERS += ("mlp.up_proj", "mlp.down_proj")


def _block_and_data(seed: int = 0):
    model = tiny_llama(seed=seed)
    _, blocks = decoder_blocks(model)
    batches = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        state = _first_block_inputs(model, blocks[0], batches, batch_size=4)
        targets = [block_output(blocks[0], h, kw) for h, kw in state]
    return blocks[0], state, targets


def _layers(block, spec=SPEC, group=32):
    modules = dict(block.named_modules())
    out = {}
    for name in LAYERS:
        w = float_weight(modules[name]).float()
        out[name] = (w, spec, block_size_for(w.shape, "group", group))
    return out


@torch.no_grad()
def _rtn_error(block, layers, state, targets) -> float:
    rtn = copy.deepcopy(block)
    modules = dict(rtn.named_modules())
    for name, (w, spec, size) in layers.items():
        modules[name].weight.copy_(fake_quantize(w, spec, size))
    diffs = [(block_output(rtn, h, kw) - t).pow(2) for (h, kw), t in zip(state, targets, strict=True)]
    return float(sum(d.sum() for d in diffs) / sum(d.numel() for d in diffs))


@pytest.mark.parametrize("weight_lr", [None, 0.02])
def test_reconstruction_lowers_the_block_output_error_against_rtn_at_the_same_bits(weight_lr):
    block, state, targets = _block_and_data()
    layers = _layers(block)
    before = {n: p.clone() for n, p in block.state_dict().items()}
    results, errors = reconstruct.reconstruct_block(block, layers, state, targets, {**OPTIONS, "weight_lr": weight_lr})
    rtn = _rtn_error(block, layers, state, targets)
    # the exported grid (hard rounding, fp16 scales, integer zeros) beats round to nearest by a margin
    assert errors["mse_after"] < 0.8 * rtn, (errors, rtn)
    # the block is handed back unchanged (the step writes the learned weights itself)
    assert all(torch.equal(before[n], p) for n, p in block.state_dict().items())
    assert set(results) == set(LAYERS)
    for name, r in results.items():
        assert r.scale.dtype == torch.float16 and r.zero.dtype == torch.uint8
        assert torch.equal(r.weight, layers[name][0]) == (weight_lr is None)  # frozen unless Block-AP


def test_reconstruction_is_deterministic():
    block, state, targets = _block_and_data()
    options = {**OPTIONS, "epochs": 2, "weight_lr": 0.02}
    first, _ = reconstruct.reconstruct_block(block, _layers(block), state, targets, options)
    second, _ = reconstruct.reconstruct_block(block, _layers(block), state, targets, options)
    assert all(torch.equal(first[n].scale, second[n].scale) for n in first)
    assert all(torch.equal(first[n].weight, second[n].weight) for n in first)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"weight_lr": -1.0}, r"weight_lr must be null \(weights frozen: clipping only\) or positive"),
        ({"micro_batch": 0}, "micro_batch must be a positive integer"),
        ({"lr": 0}, "lr must be positive"),
        ({"target": "teacher"}, r"target must be float \(the float model's outputs.*got 'teacher'"),
    ],
)
def test_bad_options_say_what_is_allowed(change, message):
    method = method_cfg("w2_reconstruct")
    method["reconstruct"] = {**method["reconstruct"], **change}
    with pytest.raises(ValueError, match=message):
        steps.check_steps(method)


def test_reconstruction_fixes_the_grid_so_only_a_grid_rounding_codes_step_may_follow():
    method = method_cfg("w2_reconstruct")
    method["steps"] = ["awq", "reconstruct", "hqq"]
    method["hqq"] = {"iters": 20, "lp_norm": 0.7, "beta": 10.0, "kappa": 1.01}
    with pytest.raises(ValueError, match=r"reconstruct fixes each layer's grid.*\(rtn, gptq\), got 'hqq'"):
        steps.check_steps(method)


def test_gptq_on_a_fixed_grid_keeps_the_grid_and_lowers_the_output_error_of_rounding_onto_it():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=generator)
    x = torch.randn(512, 64, generator=generator) @ torch.randn(64, 64, generator=generator)  # correlated inputs
    hessian = (x.T @ x).double()
    size = (1, 32)
    scale, zero = choose_qparams(w, SPEC, size, min_val=to_blocks(w, size).amin(-1) * 0.8)  # a narrowed range
    codes, s, z = gptq_quantize(w, hessian, SPEC, size, act_order=True, grid=(scale, zero))
    assert torch.equal(s, scale) and torch.equal(z, zero)
    rtn = dequantize(quantize(w, scale, zero, SPEC, size), scale, zero, size)
    gptq = dequantize(codes, scale, zero, size)
    assert ((gptq - w) @ x.T).pow(2).sum() < 0.8 * ((rtn - w) @ x.T).pow(2).sum()


def test_after_awq_the_block_computes_the_float_function_and_exports_packed_layers():
    """At 8 bits the clipping starts near lossless: a tiny starting error shows that the layers AWQ left
    with an explicit input scale (o_proj, down_proj) compute x * scale inside reconstruction too."""
    model = tiny_llama()
    method = method_cfg("w2_reconstruct", "method.bits=8", "method.reconstruct.epochs=2")
    calibration = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    metrics: dict[str, float] = {}
    records = quantize_stage.quantize_model(model, method, layers_cfg(), calibration=calibration, metrics=metrics)
    assert metrics["reconstruct_mse_before"] < 1e-4, metrics
    quantized = [r for r in records if r.quantized]
    assert len(quantized) == 14 and all(r.bits == 8 for r in quantized)
    assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), QuantLinear)
    assert steps.describe_steps(method) == "awq_scales+reconstruct(lwc+weights,2ep)+rtn"


def test_the_float_path_carries_the_float_models_own_block_outputs_past_quantized_blocks():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    outputs = {}
    for i, block in enumerate(decoder_blocks(reference)[1]):
        block.register_forward_hook(
            lambda _m, _a, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
    batches = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference(input_ids=batches, use_cache=False)
    seen = {}

    def damage(block_name, _inputs, state, float_outputs):  # "quantizes" the block: its outputs change
        seen[block_name] = (torch.cat([h for h, _ in state]), torch.cat(float_outputs))
        with torch.no_grad():
            model.get_submodule(block_name).mlp.down_proj.weight.mul_(3.0)

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    run_blocks(model, names, batches, damage, hessian=False, float_path=True)
    quantized_inputs, float_outputs = seen["model.layers.1"]
    assert torch.allclose(float_outputs, outputs[1], atol=1e-5)  # past a damaged block 0, still the float model's
    assert not torch.allclose(quantized_inputs, outputs[0], atol=1e-3)  # while block 1's inputs carry the damage
