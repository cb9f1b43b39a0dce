"""half_linear: a kept 16-bit linear layer's decode matmul, fp32 accumulation on weights widened in registers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import kept
from pipeline.quant.kernels import cpp


@pytest.fixture(scope="module")
def op():
    built = cpp.build("half_linear")
    if not built.ok:
        pytest.skip(f"half_linear {built.describe()}")
    return cpp.ops("half_linear").linear


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_f,in_f", [(13, 24), (40, 200), (192, 576), (7, 5)])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 64])
def test_matches_the_widened_weight(op, dtype, out_f, in_f, rows):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_f, in_f, generator=gen).to(dtype)
    x = torch.randn(rows, in_f, generator=gen)
    expected = F.linear(x, weight.float())
    got = op(x, weight)
    assert got.dtype == torch.float32
    # fp32 accumulation in another order than MKL's: relative error ~1e-7
    assert (got - expected).norm() / expected.norm() < 1e-5


def test_refuses_what_it_cannot_compute(op):
    with pytest.raises(RuntimeError, match="weight must be bfloat16 or float16"):
        op(torch.randn(2, 4), torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="x has 5 features, weight 4"):
        op(torch.randn(2, 5), torch.randn(3, 4).bfloat16())


@pytest.mark.parametrize("rows", [1, 16, 17])
def test_a_kept_linear_layer_decodes_with_it_and_prefills_in_fp32(op, rows):
    layer = nn.Linear(24, 13)
    model = nn.Sequential(layer)
    kept.store_kept(model, torch.bfloat16, torch.float32)
    assert layer.weight.dtype == torch.bfloat16 and layer.kernel == "half_linear"
    x = torch.randn(rows, 24)
    expected = F.linear(x, layer.weight.float(), layer.bias.float())
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_without_the_kernel_the_layer_table_says_what_runs(monkeypatch):
    failed = cpp.Build(name="half_linear", isa=None, error="g++: not found")
    monkeypatch.setattr(kept.cpp, "build", lambda stem: failed)
    layer = nn.Linear(8, 4)
    kept.store_kept(nn.Sequential(layer), torch.bfloat16, torch.float32)
    assert layer.kernel == "bfloat16 F.linear"
    x = torch.randn(2, 8)
    assert torch.allclose(layer(x), F.linear(x.bfloat16(), layer.weight, layer.bias).float())
