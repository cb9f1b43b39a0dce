"""The fused low-bit CPU kernel (csrc/lowbit_cpu.cpp) against the dequantized reference.

Tolerance: the kernel accumulates in fp32 in another order than F.linear and subtracts the zero
point through the group sums of x (y = sum_j s (acc_j - z xsum_j)), so each output may differ by
a few hundred fp32 roundings of the magnitudes summed; every element must lie within
``1e-5 * (|x| @ ((u + |z|) |s|).T)``, the sum of the absolute terms it adds up (1e-5 ≈ 170 ulp).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.quant import kernels
from pipeline.quant.kernels import cpp, lowbit_cpu
from pipeline.quant.kernels.base import LayerTensors, dequantized
from pipeline.quant.linear import QuantLinear
from pipeline.quant.primitives import QuantSpec, block_size_for

RELATIVE_TOLERANCE = 1e-5
KERNEL = lowbit_cpu.LowbitCpu()
needs_build = pytest.mark.skipif(
    not cpp.build("lowbit_cpu").ok, reason=f"the fused kernel could not be built: {cpp.build('lowbit_cpu').error}"
)


def _layer(
    out_f: int,
    in_f: int,
    bits: int,
    zero: str,
    granularity: str,
    group: int | None = None,
    seed: int = 0,
    codes: torch.Tensor | None = None,
) -> QuantLinear:
    """A layer with random codes over the whole grid; ``zero`` is "symmetric", "int" or "float"."""
    gen = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits, zero == "symmetric", zero_point_domain="float" if zero == "float" else "int")
    block = block_size_for((out_f, in_f), granularity, group)
    if codes is None:
        codes = torch.randint(spec.qmin, spec.qmax + 1, (out_f, in_f), generator=gen, dtype=torch.int32)
    grid = (out_f // block[0], in_f // block[1])
    scale = (torch.rand(grid, generator=gen) * 0.02 + 0.005).to(torch.float16)
    if zero == "symmetric":
        zero_point = None
    elif zero == "int":
        zero_point = torch.randint(0, 2**bits, grid, generator=gen, dtype=torch.int32).to(torch.uint8)
    else:
        zero_point = torch.rand(grid, generator=gen) * (2**bits - 1)
    return QuantLinear(codes, scale, zero_point, spec, block, kernel_preference="dequant")


def _check(layer: QuantLinear, rows: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> None:
    tensors = layer.tensors()
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)
    expected = F.linear(x.float(), dequantized(tensors))
    got = KERNEL.run(x, KERNEL.prepare(tensors))
    assert got.dtype == torch.float32 and got.shape == expected.shape
    group = tensors.block_size[1]
    unsigned = tensors.codes() + tensors.offset
    zero = tensors.unsigned_zero_per_row_group(group).repeat_interleave(group, dim=1)
    scale = tensors.scale_per_row_group(group).repeat_interleave(group, dim=1)
    magnitude = x.float().abs() @ ((unsigned + zero.abs()) * scale.abs()).T
    excess = (got - expected).abs() - RELATIVE_TOLERANCE * magnitude
    assert excess.max() <= 0, f"rows={rows}: worst error {(got - expected).abs().max():.3g} over the tolerance"


GROUPINGS = [  # granularity, group
    ("group", 8),
    ("group", 32),
    ("group", 64),
    ("group", 128),
    ("per_channel", None),
    ("per_tensor", None),
]


@needs_build
@pytest.mark.parametrize("granularity,group", GROUPINGS)
@pytest.mark.parametrize("zero", ["symmetric", "int", "float"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_width_zero_and_grouping_matches_the_reference(bits, zero, granularity, group):
    layer = _layer(40, 256, bits, zero, granularity, group)
    for rows in (1, 4, 5):
        _check(layer, rows)


@needs_build
@pytest.mark.parametrize("out_f,in_f,granularity,group", [(13, 8, "group", 8), (13, 24, "group", 8),
                                                          (40, 200, "group", 8), (13, 200, "per_channel", None),
                                                          (37, 96, "group", 32)])  # fmt: skip
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_odd_shapes_and_every_batch_size(bits, out_f, in_f, granularity, group):
    # N not a multiple of the 4-row blocks; the last row read from its padded copy; M through the
    # 4/2/1-row tiles (1..17) and the dequantized-tile GEMM (64).
    layer = _layer(out_f, in_f, bits, "int", granularity, group, seed=bits)
    for rows in (1, 2, 3, 4, 5, 16, 17, 64):
        _check(layer, rows)


@needs_build
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bf16_activations_are_widened_exactly(bits):
    layer = _layer(40, 256, bits, "float", "group", 32)
    for rows in (1, 5, 64):
        _check(layer, rows, torch.bfloat16)


@needs_build
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_extreme_codes(bits):
    spec = QuantSpec(bits, False)
    for fill in (spec.qmin, spec.qmax):
        _check(_layer(13, 64, bits, "int", "group", 32, codes=torch.full((13, 64), fill, dtype=torch.int32)), 3)
    codes = torch.randint(0, 2, (21, 128), generator=torch.Generator().manual_seed(4), dtype=torch.int32) * spec.qmax
    for rows in (1, 4, 64):
        _check(_layer(21, 128, bits, "int", "group", 64, codes=codes), rows)


@needs_build
@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (3, 32)])
def test_two_and_three_bit_layers_select_the_fused_kernel(bits, group):
    w = torch.randn(48, 192, generator=torch.Generator().manual_seed(0))
    layer = QuantLinear.from_float(w, QuantSpec(bits, False), (1, group), torch.randn(48))
    assert layer.kernel == "lowbit_cpu" and f"fused {bits}-bit" in layer.kernel_note
    x = torch.randn(3, 2, 192)  # any leading shape, through QuantLinear.forward
    expected = F.linear(x, layer.dequantized_weight(), layer.bias)
    assert torch.allclose(layer(x), expected, rtol=1e-4, atol=1e-4)


@needs_build
@pytest.mark.parametrize("rows", [1, 64])  # both paths: register-blocked and dequantized tile + at::mm
def test_inputs_that_require_grad_run_forward(rows):
    layer = QuantLinear.from_float(torch.randn(16, 64), QuantSpec(4, False), (1, 32), kernel_preference="lowbit_cpu")
    x = torch.randn(rows, 64, requires_grad=True)  # a model called outside torch.no_grad()
    assert torch.allclose(layer(x), F.linear(x.detach(), layer.dequantized_weight()), rtol=1e-4, atol=1e-4)


@needs_build
def test_the_kernel_reads_the_stored_codes_and_keeps_only_float_scales_and_zeros():
    layer = QuantLinear.from_float(torch.randn(48, 192), QuantSpec(2, False), (1, 32))
    state = KERNEL.prepare(layer.tensors())
    assert state["packed"] is layer.packed
    assert layer.kernel_cache_bytes == 2 * 48 * (192 // 32) * 4  # float32 scale and zero, (out, in / group)


def test_a_failed_build_sends_layers_to_dequant_and_says_why(monkeypatch):
    failed = cpp.Build(name="lowbit_cpu", isa=None, error="lowbit_cpu.cpp:1: error: no compiler")
    monkeypatch.setattr(lowbit_cpu.cpp, "build", lambda stem: failed)
    layer = QuantLinear.from_float(torch.randn(48, 192), QuantSpec(3, False), (1, 64))
    assert layer.kernel == "dequant"
    assert "lowbit_cpu: not built: lowbit_cpu.cpp:1: error: no compiler" in layer.kernel_note
    with pytest.raises(RuntimeError, match="not built"):
        KERNEL.prepare(layer.tensors())


def test_compiler_errors_are_reduced_to_their_first_lines():
    message = (
        "Error building extension 'quantbench_lowbit': [1/2] c++ -c lowbit_cpu.cpp\n"
        "FAILED: lowbit_cpu.o\n"
        "lowbit_cpu.cpp:10:3: error: 'foo' was not declared in this scope\n"
        "lowbit_cpu.cpp:11:3: error: expected ';'\n"
        "lowbit_cpu.cpp:12:3: error: third\n"
        "lowbit_cpu.cpp:13:3: error: fourth\n"
    )
    reason = cpp._first_error_lines(message)
    assert reason.startswith("lowbit_cpu.cpp:10:3: error: 'foo' was not declared")
    assert "third" in reason and "fourth" not in reason and "Error building" not in reason


@pytest.mark.parametrize(
    "bits,in_f,block,reason",
    [
        (5, 64, (1, 32), "5-bit weights"),
        (4, 60, (1, 60), "in_features 60 is not a multiple of 8"),
        (4, 96, (1, 12), "block width 12 is not a multiple of 8"),
    ],
)
def test_layouts_the_kernel_declines(bits, in_f, block, reason):
    layer = LayerTensors(
        packed=torch.zeros(0, dtype=torch.uint8),
        spec=QuantSpec(bits, False),
        out_features=16,
        in_features=in_f,
        block_size=block,
        scale=torch.ones(16, in_f // block[1]),
        zero_point=None,
    )
    assert reason in KERNEL.supports(layer)


@needs_build
def test_the_op_rejects_bad_arguments_with_what_is_allowed():
    layer = _layer(16, 64, 4, "int", "group", 32)
    state = KERNEL.prepare(layer.tensors())
    op = cpp.ops("lowbit_cpu").linear
    x = torch.randn(2, 64)
    args = (state["packed"], 4, 16, 64, 32, state["scale"], state["zero"])
    with pytest.raises(RuntimeError, match="bits must be 2, 3, 4 or 8, got 5"):
        op(x, args[0], 5, *args[2:])
    with pytest.raises(RuntimeError, match=r"x must be \(rows, 64\)"):
        op(torch.randn(2, 63), *args)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        op(x.half(), *args)
    with pytest.raises(RuntimeError, match="group must be a multiple of 8 that divides in_features 64"):
        op(x, *args[:4], 24, *args[5:])


def test_the_registry_tries_the_fused_kernel_before_the_aten_kernels_and_dequant():
    # ours computes fp32 activations exactly and beat aten's int4/int8 on every benchmarked shape
    names = [k.name for k in kernels.REGISTRY]
    assert names.index("lowbit_cpu") < min(names.index("aten_int4_groupwise"), names.index("aten_int8_weight_only"))
    assert names[-1] == "dequant"
