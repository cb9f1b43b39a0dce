"""Activation quantization: static per tensor and dynamic per token, both symmetries, both kernels."""

import pytest
import torch
from conftest import layers_cfg, method_cfg

from pipeline import calibrate, layers, quantize
from pipeline.calibrate import ActivationStats, activation_qparams, observe_range
from pipeline.quant.kernels import cpp
from pipeline.quant.linear import ActivationQuant, QuantLinear
from pipeline.quant.primitives import QuantSpec, dequantize

OUT, IN = 192, 576
SYMMETRIES = [(True, "full"), (True, "restricted"), (False, "full")]


def _inputs(rows=7, seed=2, shift=0.0):
    # Post-norm hidden states are signed; a shift makes the range lopsided (asymmetric helps).
    return torch.randn(rows, IN, generator=torch.Generator().manual_seed(seed)) + shift


def _act(symmetric, symmetric_range, mode, bits=8):
    return ActivationQuant(QuantSpec(bits, symmetric, scale_dtype=torch.float32, symmetric_range=symmetric_range), mode)


def _stats(x, seed=0):
    stats = ActivationStats()
    stats.update(x, torch.Generator().manual_seed(seed))
    return stats


def _layer(act, x, kernels="auto", observer="minmax", weight_range="full"):
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0))
    scale = zero = None
    if act.mode == "static":
        scale, zero = activation_qparams(_stats(x), act.spec, observer)
    return QuantLinear.from_float(
        w,
        QuantSpec(8, True, symmetric_range=weight_range),
        (1, IN),
        activation=act,
        activation_scale=scale,
        activation_zero_point=zero,
        kernel_preference=kernels,
    )


def _dequantized_input(layer, x):
    q, scale, zero, block = layer.quantize_input(x)
    return q, dequantize(q, scale, zero, block)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("symmetric,symmetric_range", SYMMETRIES)
def test_round_trip_error_is_at_most_half_a_step(mode, symmetric, symmetric_range):
    x = _inputs(shift=0.7)
    layer = _layer(_act(symmetric, symmetric_range, mode), x)
    q, x_hat = _dequantized_input(layer, x)
    spec = layer.activation.spec
    assert q.dtype == (torch.int8 if symmetric else torch.uint8)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    # static: one scale per tensor; dynamic: one per token (row)
    _q, scale, _zero, block = layer.quantize_input(x)
    assert block == ((7, IN) if mode == "static" else (1, IN))
    assert scale.shape == ((1, 1) if mode == "static" else (7, 1))
    # minmax covers every value, so the only error is rounding (+ half a step where the full
    # symmetric range clips its most positive value)
    assert torch.all((x_hat - x).abs() <= scale / 2 * (1 + 1e-4))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_asymmetric_activations_keep_negative_values(mode):
    # The old quantize_input dropped the zero point: with uint8 codes clamped at 0, every negative
    # activation came back as 0.
    x = _inputs(shift=0.7)
    layer = _layer(_act(False, "full", mode), x)
    _q, x_hat = _dequantized_input(layer, x)
    negative = x < -0.05
    assert negative.sum() > 100
    assert torch.all(x_hat[negative] < 0)
    assert (x_hat[negative] - x[negative]).abs().max() < 0.05


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_asymmetric_beats_symmetric_on_a_lopsided_range(mode):
    x = _inputs(shift=3.0)  # mostly positive: the symmetric grid wastes most negative codes
    errors = {}
    for symmetric in (True, False):
        layer = _layer(_act(symmetric, "full", mode, bits=4), x, kernels="dequant")
        errors[symmetric] = (_dequantized_input(layer, x)[1] - x).pow(2).mean()
    assert errors[False] < errors[True] / 2


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("symmetric,symmetric_range", SYMMETRIES)
@pytest.mark.parametrize("weight_range", ["full", "restricted"])
def test_int_mm_equals_the_dequantized_path(mode, symmetric, symmetric_range, weight_range):
    x = _inputs(shift=0.7)
    act = _act(symmetric, symmetric_range, mode)
    # int8_cpu comes first where it builds (tests/test_int8_kernel.py); _int_mm is named here.
    fast = _layer(act, x, "int8_int_mm", weight_range=weight_range)
    slow = _layer(act, x, "dequant", weight_range=weight_range)
    assert (fast.kernel, slow.kernel) == ("int8_int_mm", "dequant")
    assert ("asymmetric" in fast.kernel_note) == (not symmetric)
    if weight_range == "full":
        assert int(fast.codes().min()) == -128  # the int8 codes include -128: _int_mm handles them
    expected = slow(x)
    assert torch.allclose(fast(x), expected, rtol=1e-5, atol=1e-4 * expected.abs().max())


def test_static_zero_point_is_a_counted_buffer():
    x = _inputs(shift=0.7)
    asym, sym = _layer(_act(False, "full", "static"), x), _layer(_act(True, "full", "static"), x)
    assert asym.activation_zero_point.dtype == torch.uint8 and asym.activation_zero_point.shape == (1, 1)
    assert "activation_zero_point" in dict(asym.named_buffers())
    assert sym.activation_zero_point is None
    assert asym.weight_bytes == sym.weight_bytes + 1
    assert asym.grid == "int8 sym [-128,127]; act int8 asym [0,255] int-zero per-tensor static"


def test_static_asymmetric_needs_its_zero_point():
    act = _act(False, "full", "static")
    w = torch.randn(OUT, IN)
    with pytest.raises(ValueError, match="activation_zero_point exactly when it is asymmetric"):
        QuantLinear.from_float(w, QuantSpec(8, True), (1, IN), activation=act, activation_scale=torch.tensor(0.1))


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_static_observers_give_asymmetric_ranges(observer):
    x = _inputs(rows=64, shift=2.0)  # range about [-2, 6.5]
    stats = _stats(x)
    lo, hi = observe_range(stats, QuantSpec(8, False), observer, 99.9)
    assert lo < 0 < hi and hi > 2 * -lo  # follows the data, not ±max|x|
    assert x.min() <= lo and hi <= x.max()
    s_lo, s_hi = observe_range(stats, QuantSpec(8, True), observer, 99.9)
    assert s_lo == -s_hi  # symmetric specs get a symmetric range
    if observer == "minmax":
        assert (lo, hi) == pytest.approx((float(x.min()), float(x.max())))
        assert s_hi == pytest.approx(float(x.abs().max()))
    _scale, zero = activation_qparams(stats, QuantSpec(8, False, scale_dtype=torch.float32), observer, 99.9)
    assert zero.dtype == torch.uint8 and 0 < int(zero) < 128  # zero sits low: most of the range is positive


@pytest.mark.parametrize(
    "name,overrides,grid",
    [
        ("symmetric", (), "int4 sym [-8,7]"),
        ("symmetric", ("method.symmetric_range=restricted",), "int4 sym [-7,7]"),
        ("group_wise", (), "int4 asym [0,15] int-zero"),
        (
            "ptq_dynamic",
            ("method.activations.symmetric=false",),
            "int8 sym [-128,127]; act int8 asym [0,255] int-zero per-token dynamic",
        ),
        (
            "ptq_static",
            ("method.activations.symmetric=false",),
            "int8 sym [-128,127]; act int8 asym [0,255] int-zero per-tensor static",
        ),
    ],
)
def test_method_config_sets_the_grid_that_each_layer_records(llama, name, overrides, grid):
    method = method_cfg(name, *overrides)
    names = list(layers.select_layers(llama, layers_cfg())[0])
    batches = torch.randint(0, llama.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    stats = calibrate.collect_activation_stats(llama, names, batches, seed=0)
    records = quantize.quantize_model(llama, method, layers_cfg(), stats=stats)
    assert {r.grid for r in records if r.quantized} == {grid}
    if name == "ptq_static":
        layer = llama.get_submodule(names[0])
        w8a8_kernel = "int8_cpu" if cpp.build("int8_cpu").ok else "int8_int_mm"
        assert layer.activation_zero_point is not None and layer.kernel == w8a8_kernel
