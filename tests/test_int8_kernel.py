"""int8_cpu, our W8A8 kernel: the codes of quantize_activation, the integers of int8_int_mm, its outputs bit for bit."""

import pytest
import torch
from conftest import layers_cfg, method_cfg

from pipeline import calibrate, layers, quantize
from pipeline.device import torch_threads
from pipeline.quant import kernels
from pipeline.quant.activation import ActivationQuant, quantize_activation
from pipeline.quant.kernels import cpp, int8_cpu
from pipeline.quant.linear import QuantLinear
from pipeline.quant.primitives import QuantSpec, qparams_from_range

SYMMETRIES = [(True, "full"), (True, "restricted"), (False, "full")]
MODES = ["static", "dynamic"]
ROWS = [1, 3, 8, 16, 17, 64]
SHAPES = [(13, 24), (13, 200), (40, 200)]  # (out, in): odd out, in not a multiple of 16


@pytest.fixture(scope="module")
def ext():
    built = cpp.build("int8_cpu")
    if not built.ok:
        pytest.skip(f"int8 kernel {built.describe()}")
    return cpp.ops("int8_cpu")


def _act(symmetric, symmetric_range, mode, scale_dtype=torch.float32):
    return ActivationQuant(QuantSpec(8, symmetric, scale_dtype=scale_dtype, symmetric_range=symmetric_range), mode)


def _inputs(rows, features, seed=0):
    # Lopsided rows with outliers: asymmetric zero points land away from 128, codes reach both ends.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=gen) * 2 + 0.5
    x[:, 0] = 9.0
    x[0::2, 1] = -9.0  # symmetric dynamic codes reach the most negative end on even rows
    x[1::2, 1] = -3.0
    return x


def _static_qparams(x, spec):
    # A range narrower than the data, so that static codes clip at qmin and qmax.
    scale, zero = qparams_from_range(x.min() * 0.5, x.max() * 0.5, spec)
    return scale.reshape(1, 1), None if zero is None else zero.reshape(1, 1)


def _layer(act, x, out_features, kernel, codes=None):
    gen = torch.Generator().manual_seed(1)
    in_features = x.shape[1]
    spec = QuantSpec(8, True, symmetric_range="full")
    if codes is None:
        codes = torch.randint(-128, 128, (out_features, in_features), generator=gen, dtype=torch.int32)
        codes[0, :] = -128  # the most negative code, a full row of it: the worst case for saturation
        codes[1, :] = 127
    scale = (torch.rand(out_features, 1, generator=gen) * 0.02 + 0.001).to(torch.float16)
    act_scale = act_zero = None
    if act.mode == "static":
        act_scale, act_zero = _static_qparams(x, act.spec)
    bias = torch.randn(out_features, generator=gen)
    return QuantLinear(
        codes,
        scale,
        None,
        spec,
        (1, in_features),
        bias,
        activation=act,
        activation_scale=act_scale,
        activation_zero_point=act_zero,
        kernel_preference=kernel,
    )


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("symmetric,symmetric_range", SYMMETRIES)
@pytest.mark.parametrize("rows,features", [(1, 24), (17, 200), (64, 576)])
def test_codes_scales_and_zeros_are_those_of_quantize_activation(
    ext, rows, features, symmetric, symmetric_range, mode, scale_dtype
):
    act = _act(symmetric, symmetric_range, mode, scale_dtype)
    x = _inputs(rows, features)
    static_scale = static_zero = None
    if mode == "static":
        static_scale, static_zero = _static_qparams(x, act.spec)
    params = int8_cpu.Int8Cpu().prepare(_layer(act, x, 13, "int8_cpu").tensors())["params"]
    q, scale, zero, _block = quantize_activation(x, act, static_scale, static_zero)
    d, got_scale, got_zero = ext.quantize_rows(x, *params)
    zero_per_row = torch.zeros(rows, dtype=torch.int32) if zero is None else zero.int().reshape(-1).expand(rows)
    assert torch.equal(got_zero, zero_per_row)
    assert torch.equal(got_scale, scale.float().reshape(-1).expand(rows))
    assert torch.equal(d.int() + got_zero[:, None], q.int())
    # Static ranges clip: both ends of the grid are taken. Dynamic ones reach them to within a rounding.
    slack = 0 if mode == "static" else 1
    assert int(q.min()) <= act.spec.qmin + slack and int(q.max()) >= act.spec.qmax - slack


@pytest.mark.parametrize("symmetric", [True, False])
def test_rounding_ties_go_to_even_like_torch_round(ext, symmetric):
    # x / scale lands exactly on k + 0.5 (a power-of-two scale divides exactly): half-to-even.
    act = _act(symmetric, "full", "static")
    scale = torch.tensor([[0.25]])
    zero = None if symmetric else torch.tensor([[128]], dtype=torch.uint8)
    x = (torch.arange(-60, 60, dtype=torch.float32) + 0.5).reshape(1, -1) * 0.25
    q, *_ = quantize_activation(x, act, scale, zero)
    params = (False, symmetric, act.spec.qmin, act.spec.qmax, 0.0, 1e-8, 0, 0.25, 0 if symmetric else 128)
    d, _scale, got_zero = ext.quantize_rows(x, *params)
    assert torch.equal(d.int() + got_zero[:, None], q.int())
    assert torch.equal(q[0, :4].int() - (0 if symmetric else 128), torch.tensor([-60, -58, -58, -56]))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_accumulators_equal_int_mm_on_extreme_codes(ext, rows, out_features, in_features, symmetric):
    gen = torch.Generator().manual_seed(rows * 1000 + in_features)
    w = torch.randint(-128, 128, (out_features, in_features), generator=gen, dtype=torch.int8)
    w[0], w[1] = -128, 127
    if symmetric:
        q = torch.randint(-128, 128, (rows, in_features), generator=gen, dtype=torch.int8)
        q[0] = -128  # (-128) * (-128) pairs: 32768 each, over int16
        zero = torch.zeros(rows, 1, dtype=torch.int32)
        reference = torch._int_mm(q, w.t().contiguous())
    else:
        q = torch.randint(0, 256, (rows, in_features), generator=gen, dtype=torch.int16).to(torch.uint8)
        q[0] = 255
        q[-1, ::2] = 0
        zero = torch.randint(0, 256, (rows, 1), generator=gen, dtype=torch.int32)
        zero[0] = 0  # 255 - 0 = 255 against -128: the widest product
        # int8_int_mm's form: uint8 codes shifted into int8, the zero point folded in afterwards.
        shifted = (q.to(torch.int16) - 128).to(torch.int8)
        reference = torch._int_mm(shifted, w.t().contiguous()) - (zero - 128) * w.sum(dim=1, dtype=torch.int32)
    d = (q.to(torch.int32) - zero).to(torch.int16)
    acc = ext.accumulators(d, w)
    assert acc.dtype == torch.int32 and torch.equal(acc, reference)
    assert torch.equal(acc.long(), d.long() @ w.long().t())


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("symmetric,symmetric_range", SYMMETRIES)
def test_outputs_are_bit_identical_to_int8_int_mm(
    ext, symmetric, symmetric_range, mode, out_features, in_features, rows
):
    act = _act(symmetric, symmetric_range, mode)
    x = _inputs(rows, in_features, seed=rows)
    ours, theirs = _layer(act, x, out_features, "auto"), _layer(act, x, out_features, "int8_int_mm")
    assert ours.kernel == "int8_cpu" and theirs.kernel == "int8_int_mm"
    # The same integers, then the same float ops in the same order (float(acc) * s_x * s_w + bias).
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("symmetric,symmetric_range", SYMMETRIES)
def test_outputs_match_the_dequantized_path(ext, symmetric, symmetric_range, mode):
    act = _act(symmetric, symmetric_range, mode)
    x = _inputs(9, 200)
    ours, slow = _layer(act, x, 40, "int8_cpu"), _layer(act, x, 40, "dequant")
    expected = slow(x)
    # The dequant path multiplies dequantized floats: equal up to float rounding of K-term sums.
    assert torch.allclose(ours(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_inputs_of_other_dtypes_and_batch_shapes(ext):
    act = _act(True, "full", "dynamic")
    x = _inputs(6, 200)
    layer = _layer(act, x, 13, "int8_cpu")
    assert torch.equal(layer(x.reshape(2, 3, 200)), layer(x).reshape(2, 3, 13))
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.equal(y, layer(x.bfloat16().float()).bfloat16())


def test_bad_tensors_are_refused_with_what_was_expected(ext):
    w = torch.zeros(4, 24, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="d must be a contiguous 2-D int16 tensor"):
        ext.accumulators(torch.zeros(2, 24, dtype=torch.int32), w)
    with pytest.raises(RuntimeError, match="weight has 24 inputs, the activations have 16"):
        ext.accumulators(torch.zeros(2, 16, dtype=torch.int16), w)
    with pytest.raises(RuntimeError, match="x must be a contiguous 2-D float32 tensor"):
        x = torch.zeros(2, 24, dtype=torch.float64)
        ext.linear(x, w, torch.ones(4), True, True, -128, 127, 127.5, 1e-8, 0, 0, 0)


@pytest.mark.parametrize("name", ["ptq_dynamic", "ptq_static"])
@pytest.mark.parametrize("symmetric", ["true", "false"])
def test_ptq_methods_run_their_layers_on_int8_cpu(ext, llama, name, symmetric):
    method = method_cfg(name, f"method.activations.symmetric={symmetric}")
    names = list(layers.select_layers(llama, layers_cfg())[0])
    batches = torch.randint(0, llama.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    stats = calibrate.collect_activation_stats(llama, names, batches, seed=0)
    quantize.quantize_model(llama, method, layers_cfg(), stats=stats)
    chosen = {llama.get_submodule(n).kernel for n in names}
    assert chosen == {"int8_cpu"}
    with torch.no_grad():
        logits = llama(batches).logits
    assert torch.isfinite(logits).all()


def test_an_unbuilt_kernel_falls_back_to_int8_int_mm_and_says_why(monkeypatch):
    failed = cpp.Build(name="int8_cpu", isa=None, error="RuntimeError: Error building extension (test)")
    monkeypatch.setattr(int8_cpu.cpp, "build", lambda stem: failed)
    act = _act(False, "full", "dynamic")
    x = _inputs(3, 24)
    layer = _layer(act, x, 13, "auto")
    assert layer.kernel == "int8_int_mm"
    assert "int8_cpu: not built: RuntimeError: Error building extension (test)" in layer.kernel_note
    with pytest.raises(ValueError, match="kernels=int8_cpu cannot compute .* not built"):
        _layer(act, x, 13, "int8_cpu")
    # Weight-only layers never mention it: the kernel does not fit their layout anyway.
    weight_only = QuantLinear.from_float(torch.randn(13, 24), QuantSpec(8, True), (1, 24))
    assert weight_only.kernel == "aten_int8_weight_only" and "int8_cpu" not in weight_only.kernel_note


def test_layers_too_wide_for_int32_accumulators_go_to_int8_int_mm(ext):
    act = _act(True, "full", "dynamic")
    wide = int8_cpu.MAX_IN_FEATURES + 16
    layer = QuantLinear.from_float(torch.randn(2, wide), QuantSpec(8, True), (1, wide), activation=act)
    assert layer.kernel == "int8_int_mm"
    assert "overflow" in int8_cpu.Int8Cpu().supports(layer.tensors())


@pytest.mark.slow  # ~45 s: the kernel's scalar path built and run beside the vector one
def test_the_scalar_path_computes_the_same_integers():
    # Built without -march=native: no __AVX2__, the portable loop runs (the same source, its own build).
    cpp.compile_library("int8_cpu", "quantbench_int8_cpu_scalar", ("-O3", "-fopenmp", "-ffp-contract=off"))
    scalar = torch.ops.quantbench_int8_cpu_scalar
    assert scalar.isa() == "scalar"
    gen = torch.Generator().manual_seed(5)
    w = torch.randint(-128, 128, (13, 200), generator=gen, dtype=torch.int8)
    d = torch.randint(-255, 256, (17, 200), generator=gen, dtype=torch.int16)
    assert torch.equal(scalar.accumulators(d, w).long(), d.long() @ w.long().t())
    act = _act(False, "full", "dynamic")
    x = _inputs(17, 200)
    params = int8_cpu.Int8Cpu().prepare(_layer(act, x, 13, "int8_cpu").tensors())["params"]
    q, *_ = quantize_activation(x, act)
    codes, _scale, zero = scalar.quantize_rows(x, *params)
    assert torch.equal(codes.int() + zero[:, None], q.int())


def test_registry_prefers_int8_cpu_over_int_mm():
    names = [k.name for k in kernels.REGISTRY]
    assert names.index("int8_cpu") < names.index("int8_int_mm")


def test_output_rows_split_across_threads_give_the_same_result(ext):
    gen = torch.Generator().manual_seed(7)
    w = torch.randint(-128, 128, (1000, 200), generator=gen, dtype=torch.int8)
    d = torch.randint(-255, 256, (37, 200), generator=gen, dtype=torch.int16)
    with torch_threads(2):
        assert torch.get_num_threads() == 2
        acc = ext.accumulators(d, w)
    assert torch.equal(acc.long(), d.long() @ w.long().t())
