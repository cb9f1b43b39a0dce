"""HalfLinear: 16-bit storage, fp32 compute, the fused kernel against the widened weight."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.quant import half
from pipeline.quant.half import HalfLinear
from pipeline.quant.kernels import cpp


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_f,in_f", [(13, 24), (40, 200), (192, 576), (7, 5)])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 64])
def test_matches_the_widened_weight(dtype, out_f, in_f, rows):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_f, in_f, generator=gen).to(dtype)
    bias = torch.randn(out_f, generator=gen)
    layer = HalfLinear(weight, bias)
    if not cpp.build("half_linear").ok:
        pytest.skip(f"half_linear {cpp.build('half_linear').describe()}")
    assert layer.kernel == "half_linear"
    x = torch.randn(rows, in_f, generator=gen)
    expected = F.linear(x, weight.float(), bias.to(dtype).float())
    got = layer(x)
    assert got.dtype == torch.float32
    # fp32 accumulation in another order than MKL's: relative error ~1e-6
    assert (got - expected).norm() / expected.norm() < 1e-5


def test_shares_its_weight_and_counts_16_bits():
    weight = torch.randn(32, 16).bfloat16()
    layer = HalfLinear(weight)
    assert layer.weight.data_ptr() == weight.data_ptr()  # a tied tensor stays one tensor
    assert layer.bytes_read_per_call == 32 * 16 * 2


def test_refuses_a_float32_weight():
    with pytest.raises(ValueError, match="bfloat16 or float16 weights, got torch.float32"):
        HalfLinear(torch.randn(4, 4))


def test_without_the_kernel_it_widens_and_says_so(monkeypatch):
    failed = cpp.Build(name="half_linear", isa=None, error="g++: not found")
    monkeypatch.setattr(half.cpp, "build", lambda name: failed)
    layer = HalfLinear(torch.randn(8, 16).half())
    assert layer.kernel == "widen" and "NOT built: g++: not found" in layer.kernel_note
    x = torch.randn(2, 16)
    assert torch.allclose(layer(x), x @ layer.weight.float().T)
