import pytest
import torch

from pipeline.quant.kernels import cpp
from pipeline.quant.linear import ActivationQuant, QuantLinear
from pipeline.quant.primitives import QuantSpec, block_size_for

OUT, IN = 192, 576  # SmolLM2's k_proj shape: 576 inputs is not a multiple of 128

CASES = [  # bits, symmetric, granularity, group, a kernel that computes it (forced by name)
    (8, True, "per_channel", None, "aten_int8_weight_only"),
    (8, True, "per_tensor", None, "aten_int8_weight_only"),
    (4, False, "group", 64, "aten_int4_groupwise"),
    (4, True, "group", 32, "aten_int4_groupwise"),
    (4, True, "per_channel", None, "aten_int4_groupwise"),
    (4, False, "per_channel", None, "aten_int4_groupwise"),
    (4, False, "group", 96, "lowbit_cpu"),  # the int4 kernel takes groups of 32..256 in powers of two
    (8, False, "per_channel", None, "lowbit_cpu"),  # the int8 kernel has no zero point
    (3, False, "group", 64, "lowbit_cpu"),
    (2, False, "group", 32, "lowbit_cpu"),
    (4, False, "group", 64, "lowbit_cpu"),
    (4, True, "per_channel", None, "lowbit_cpu"),
    (8, True, "per_channel", None, "lowbit_cpu"),
]
LOWBIT_BUILT = cpp.build("lowbit_cpu")


def _layer(bits, symmetric, granularity, group, kernels="auto", activation=None, act_scale=None, sym_range="full"):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(OUT, IN, generator=gen)
    bias = torch.randn(OUT, generator=gen)
    spec = QuantSpec(bits, symmetric, symmetric_range=sym_range)
    block = block_size_for(w.shape, granularity, group)
    return QuantLinear.from_float(
        w, spec, block, bias, activation=activation, activation_scale=act_scale, kernel_preference=kernels
    )


@pytest.mark.parametrize("sym_range", ["full", "restricted"])
@pytest.mark.parametrize("bits,symmetric,granularity,group,kernel", CASES)
def test_each_kernel_matches_the_dequantized_reference(bits, symmetric, granularity, group, kernel, sym_range):
    if not symmetric and sym_range == "restricted":
        pytest.skip("the symmetric range does not apply to asymmetric grids")
    if kernel == "lowbit_cpu" and not LOWBIT_BUILT.ok:
        pytest.skip(f"the fused kernel could not be built: {LOWBIT_BUILT.error}")
    layer = _layer(bits, symmetric, granularity, group, kernels=kernel, sym_range=sym_range)
    assert layer.kernel == kernel
    codes = layer.codes()
    assert int(codes.min()) >= layer.spec.qmin and int(codes.max()) <= layer.spec.qmax
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(1))
    expected = x @ layer.dequantized_weight().T + layer.bias
    got = layer(x)
    # bf16 activations in the aten kernels: relative error ~ 2**-8; dequant and lowbit_cpu are fp32
    tolerance = 1e-5 if kernel in ("dequant", "lowbit_cpu") else 2e-2
    assert (got - expected).norm() / expected.norm() < tolerance


@pytest.mark.parametrize(
    "bits,granularity,group,kernel",
    [(8, "per_channel", None, "aten_int8_weight_only"), (4, "group", 64, "aten_int4_groupwise")],
)
@pytest.mark.parametrize("sym_range", ["full", "restricted"])
def test_kernels_are_exact_on_every_code_of_the_symmetric_range(bits, granularity, group, kernel, sym_range):
    # Random codes over the whole range, the most negative one (-128 / -8 for the full range) included.
    spec = QuantSpec(bits, True, symmetric_range=sym_range)
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (OUT, IN), generator=gen, dtype=torch.int32)
    codes[0, 0] = spec.qmin
    block = block_size_for((OUT, IN), granularity, group)
    scale = (torch.rand(OUT // block[0], IN // block[1], generator=gen) * 0.02 + 0.01).to(torch.float16)
    fast = QuantLinear(codes, scale, None, spec, block, kernel_preference=kernel)
    slow = QuantLinear(codes, scale, None, spec, block, kernel_preference="dequant")
    assert fast.kernel == kernel and torch.equal(fast.codes(), codes)
    x = torch.randn(5, IN, generator=gen)
    expected = slow(x)
    assert (fast(x) - expected).norm() / expected.norm() < 2e-2  # bf16 activations in the aten kernels


def test_auto_picks_the_fused_kernel_for_every_weight_only_width_where_it_is_built():
    expected = "lowbit_cpu" if LOWBIT_BUILT.ok else None
    for bits, symmetric, granularity, group, kernel in CASES:
        layer = _layer(bits, symmetric, granularity, group)
        assert layer.kernel == (expected or kernel), (bits, symmetric, granularity, group)


def test_dequant_preference_forces_the_fallback_and_agrees_with_the_kernel():
    fast, slow = _layer(4, False, "group", 64), _layer(4, False, "group", 64, kernels="dequant")
    assert fast.kernel != "dequant" and slow.kernel == "dequant"
    x = torch.randn(3, IN)
    assert torch.allclose(fast(x), slow(x), rtol=0.05, atol=0.3)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_w8a8_runs_int_mm_and_matches_simulated_quantization(mode):
    act = ActivationQuant(QuantSpec(8, True, scale_dtype=torch.float32), mode)
    x = torch.randn(7, IN, generator=torch.Generator().manual_seed(2))
    act_scale = x.abs().max() / 127 if mode == "static" else None
    # int8_cpu comes first where it builds (tests/test_int8_kernel.py); _int_mm is named here.
    layer = _layer(8, True, "per_channel", None, kernels="int8_int_mm", activation=act, act_scale=act_scale)
    sim = _layer(8, True, "per_channel", None, kernels="dequant", activation=act, act_scale=act_scale)
    assert layer.kernel == "int8_int_mm" and sim.kernel == "dequant"
    assert torch.allclose(layer(x), sim(x), rtol=1e-4, atol=1e-3)
    # and activation quantization really happens: differs from the weight-only output
    weight_only = x @ layer.dequantized_weight().T + layer.bias
    assert not torch.allclose(layer(x), weight_only, atol=1e-4)


def test_static_activations_need_a_scale():
    act = ActivationQuant(QuantSpec(8, True, scale_dtype=torch.float32), "static")
    with pytest.raises(ValueError, match="activation_scale"):
        _layer(8, True, "per_channel", None, activation=act)


@pytest.mark.parametrize(
    "bits,group,expected_bits_per_weight",
    [
        (4, 64, 4 + 16 / 64 + 4 / 64),  # codes + fp16 scale + 4-bit packed zero point per group
        (2, 32, 2 + 16 / 32 + 2 / 32),
        (3, 64, 3 + 16 / 64 + 3 / 64),
    ],
)
def test_weight_bytes_count_codes_scales_and_zeros(bits, group, expected_bits_per_weight):
    layer = _layer(bits, False, "group", group, kernels="dequant")
    bias_bits = OUT * 32
    assert (layer.weight_bytes * 8 - bias_bits) / (OUT * IN) == pytest.approx(expected_bits_per_weight)


def test_stored_codes_round_trip_through_packing():
    w = torch.randn(OUT, IN)
    spec = QuantSpec(3, False)
    layer = QuantLinear.from_float(w, spec, (1, 64))
    from pipeline.quant.primitives import choose_qparams, quantize

    scale, zero = choose_qparams(w, spec, (1, 64))
    assert torch.equal(layer.codes(), quantize(w, scale, zero, spec, (1, 64)).to(torch.int32))
    assert torch.equal(layer.zero_points(), zero)
