"""Every algorithm keeps its codes on the chosen symmetric range and round-trips through the primitives."""

import pytest
import torch

from pipeline.algorithms.gptq import gptq_quantize, hessian_from_inputs
from pipeline.algorithms.lowrank import lowrank_quantize
from pipeline.quant.linear import QuantLinear
from pipeline.quant.primitives import QuantSpec, choose_qparams, dequantize, fake_quantize
from pipeline.train import FakeQuantLinear, converted

RANGES = ["full", "restricted"]


def _weight(rows=32, cols=128, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _in_range(codes, spec):
    return spec.qmin <= int(codes.min()) and int(codes.max()) <= spec.qmax


@pytest.mark.parametrize("sym_range", RANGES)
def test_gptq_and_lowrank_codes_stay_on_the_range(sym_range):
    spec, block, w = QuantSpec(4, True, symmetric_range=sym_range), (1, 32), _weight()
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(1))
    codes, scale, zero = gptq_quantize(w, hessian_from_inputs(x), spec, block)
    assert zero is None and _in_range(codes, spec)
    # scales are RTN's, chosen per group from the weights the sweep sees: (qmax - qmin) / 2 steps per amax
    assert torch.all(scale.float() > 0)
    codes, scale, zero, a, b = lowrank_quantize(w, spec, block, rank=4, iters=2)
    assert zero is None and _in_range(codes, spec)
    # the stored layer (codes offset by 2**(bits-1) to pack) gives back the same codes
    layer = QuantLinear(codes, scale, zero, spec, block, lowrank=(a, b), kernel_preference="dequant")
    assert torch.equal(layer.codes(), codes.to(torch.int32))


@pytest.mark.parametrize("learnable_scale", [True, False])
@pytest.mark.parametrize("sym_range", RANGES)
def test_qat_fake_weight_is_the_primitive_round_trip_and_converts_exactly(sym_range, learnable_scale):
    spec, block, w = QuantSpec(4, True, scale_dtype=torch.float32, symmetric_range=sym_range), (1, 32), _weight()
    fake = FakeQuantLinear(w, None, spec, block, learnable_scale)
    fake_w = fake.fake_weight()
    # LSQ's gradient-scaling trick (s - s*g) + s*g changes the scale in its last bit, which can flip
    # the rounding of a block's extreme (x / s = ±7.5 at the full range): at most one value per block.
    mismatched = (fake_w - fake_quantize(w, spec, block)).abs() > 1e-6
    assert int(mismatched.sum()) <= (0 if not learnable_scale else w.numel() // 32)
    codes, scale, zero = converted(fake)
    assert zero is None and _in_range(codes, spec)
    assert torch.allclose(dequantize(codes, scale, zero, block), fake_w.detach(), atol=1e-6)
    # gradients flow to the weights (STE) and, when learnable, to the scales (LSQ)
    fake_w.pow(2).sum().backward()
    assert fake.weight.grad.abs().sum() > 0
    assert (fake.scale.grad is not None) == learnable_scale


def test_the_full_range_has_a_finer_step_than_the_restricted_one():
    w = _weight()
    full, _ = choose_qparams(w, QuantSpec(4, True, scale_dtype=torch.float32), (1, 32))
    restricted, _ = choose_qparams(
        w, QuantSpec(4, True, scale_dtype=torch.float32, symmetric_range="restricted"), (1, 32)
    )
    assert torch.allclose(full * 7.5, restricted * 7.0)
