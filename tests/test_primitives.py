import itertools

import pytest
import torch

from pipeline.quant.packing import pack, packed_numel, unpack
from pipeline.quant.primitives import (
    QuantSpec,
    block_size_for,
    choose_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_ste,
    quantize,
    to_blocks,
)

GRANULARITIES = [("per_tensor", None), ("per_channel", None), ("group", 32), ("group", 64)]


def _weight(rows=48, cols=128, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric,symmetric_range", [(True, "full"), (True, "restricted"), (False, "full")])
@pytest.mark.parametrize("granularity,group", GRANULARITIES)
def test_round_trip_error_is_at_most_half_a_step(bits, symmetric, symmetric_range, granularity, group):
    if symmetric and bits == 2 and symmetric_range == "restricted":
        pytest.skip("2-bit symmetric restricted is refused")
    w = _weight()
    spec = QuantSpec(bits, symmetric, scale_dtype=torch.float32, symmetric_range=symmetric_range)
    block = block_size_for(w.shape, granularity, group)
    scale, zero = choose_qparams(w, spec, block)
    q = quantize(w, scale, zero, spec, block)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    err = (dequantize(q, scale, zero, block) - w).abs()
    step = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    assert torch.all(err <= step / 2 + 1e-5)


@pytest.mark.parametrize(
    "granularity,group,shape",
    [
        ("per_tensor", None, (1, 1)),
        ("per_channel", None, (48, 1)),
        ("group", 32, (48, 4)),
    ],
)
def test_each_granularity_gives_one_scale_per_block(granularity, group, shape):
    w = _weight()
    scale, zero = choose_qparams(w, QuantSpec(4, False), block_size_for(w.shape, granularity, group))
    assert scale.shape == shape and zero.shape == shape


def test_restricted_symmetric_is_odd_and_keeps_zero():
    w = _weight()
    w[0, :5] = 0.0
    spec = QuantSpec(4, True, symmetric_range="restricted")
    block = (1, 32)
    assert torch.equal(fake_quantize(-w, spec, block), -fake_quantize(w, spec, block))
    assert torch.all(fake_quantize(w, spec, block)[0, :5] == 0)


@pytest.mark.parametrize(
    "bits,symmetric_range,qmin,qmax,divisor",
    [
        (4, "full", -8, 7, 7.5),
        (4, "restricted", -7, 7, 7.0),
        (8, "full", -128, 127, 127.5),
        (8, "restricted", -127, 127, 127.0),
        (2, "full", -2, 1, 1.5),
    ],
)
def test_symmetric_range_and_scale_follow_torchao(bits, symmetric_range, qmin, qmax, divisor):
    # torchao choose_qparams_affine (symmetric): scale = amax / ((quant_max - quant_min) / 2)
    w = _weight()
    w[0, 0] = -5.0  # the block's amax is on the negative side: it uses the lowest code
    spec = QuantSpec(bits, True, scale_dtype=torch.float32, symmetric_range=symmetric_range)
    assert (spec.qmin, spec.qmax) == (qmin, qmax)
    assert spec.describe() == f"int{bits} sym [{qmin},{qmax}]"
    scale, zero = choose_qparams(w, spec, (1, 128))
    assert zero is None
    assert scale[0, 0].item() == pytest.approx(5.0 / divisor)
    q = quantize(w, scale, zero, spec, (1, 128))
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    # the extremes clip to the range's own ends: qmin is a code of the full range, not of the restricted one
    far = torch.tensor([[-1e6, 1e6]])
    assert quantize(far, scale[:1], None, spec, (1, 2)).tolist() == [[qmin, qmax]]


def test_full_symmetric_int4_uses_16_levels_and_keeps_zero():
    w = _weight()
    w[0, :5] = 0.0
    spec, block = QuantSpec(4, True), (1, 32)  # full is the default
    scale, zero = choose_qparams(w, spec, block)
    q = quantize(w, scale, zero, spec, block)
    assert torch.unique(q).tolist() == list(range(-8, 8))
    assert torch.all(dequantize(q, scale, zero, block)[0, :5] == 0)
    # at the same scale the full grid has one more level than the restricted one: less error
    restricted = QuantSpec(4, True, symmetric_range="restricted")
    err_full = (fake_quantize(w, spec, block) - w).pow(2).mean()
    err_restricted = (fake_quantize(w, restricted, block) - w).pow(2).mean()
    assert err_full < err_restricted


def test_asymmetric_and_float_zero_labels():
    assert QuantSpec(4, False).describe() == "int4 asym [0,15] int-zero"
    assert QuantSpec(3, False, "float").describe() == "int3 asym [0,7] float-zero"


def test_unknown_symmetric_range_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="symmetric_range must be one of full, restricted, got 'half'"):
        QuantSpec(4, True, symmetric_range="half")


@pytest.mark.parametrize("spec", [QuantSpec(4, True), QuantSpec(4, False), QuantSpec(3, False, "float")])
def test_straight_through_round_trip_matches_fake_quantize_and_passes_gradients(spec):
    w = _weight().requires_grad_(True)
    scale, zero = choose_qparams(w.detach(), spec, (1, 32))
    scale = scale.float().requires_grad_(True)
    zero = None if zero is None else zero.float()
    out = fake_quantize_ste(w, scale, zero, spec, (1, 32))
    assert torch.equal(out.detach(), fake_quantize(w.detach(), spec, (1, 32)).float())
    out.sum().backward()
    inside = (w.grad != 0).float().mean()  # STE: identity inside the grid, zero where clipped
    assert inside > 0.9 and torch.all((w.grad == 0) | (w.grad == 1))
    assert scale.grad is not None and scale.grad.abs().sum() > 0


def test_asymmetric_uses_the_whole_range_of_a_shifted_tensor():
    w = _weight().abs() + 3.0  # all positive: symmetric wastes the negative half
    sym = (fake_quantize(w, QuantSpec(4, True), (1, 32)) - w).pow(2).mean()
    asym_float = (fake_quantize(w, QuantSpec(4, False, "float"), (1, 32)) - w).pow(2).mean()
    assert asym_float < sym / 4
    scale, zero = choose_qparams(w, QuantSpec(4, False, "float"), (1, 32))
    q = quantize(w, scale, zero, QuantSpec(4, False, "float"), (1, 32))
    assert int(q.min()) == 0 and int(q.max()) == 15


def test_float_zero_point_reproduces_a_q4_1_grid_exactly():
    # Q4_1: w = d * q + m per block of 32, q in 0..15, both ends of the range in use.
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (16, 128), generator=gen).float()
    q[:, ::32] = 0
    q[:, 1::32] = 15
    d = torch.rand(16, 4, generator=gen).repeat_interleave(32, 1) + 0.1
    m = torch.randn(16, 4, generator=gen).repeat_interleave(32, 1)
    w = d * q + m
    spec = QuantSpec(4, False, "float", scale_dtype=torch.float32)
    assert torch.allclose(fake_quantize(w, spec, (1, 32)), w, atol=1e-5)
    # the integer zero point (our default) is off that grid
    assert not torch.allclose(fake_quantize(w, QuantSpec(4, False, "int", torch.float32), (1, 32)), w, atol=1e-3)


def test_more_bits_less_error():
    w = _weight()
    errors = [(fake_quantize(w, QuantSpec(b, False), (1, 32)) - w).pow(2).mean() for b in range(2, 9)]
    assert all(a > b for a, b in itertools.pairwise(errors))


@pytest.mark.parametrize("bits", [1, 9, 0, 3.5])
def test_bits_outside_2_to_8_are_refused(bits):
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        QuantSpec(bits, False)


def test_two_bit_restricted_symmetric_is_refused_with_the_alternatives():
    with pytest.raises(ValueError, match="symmetric_range=full .* or symmetric=false"):
        QuantSpec(2, True, symmetric_range="restricted")
    assert (QuantSpec(2, True).qmin, QuantSpec(2, True).qmax) == (-2, 1)  # full: 4 levels, allowed


def test_block_that_does_not_tile_is_refused():
    with pytest.raises(ValueError, match="is not a multiple of 48"):
        choose_qparams(_weight(cols=100), QuantSpec(4, False), (1, 48))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("numel", [1, 7, 8, 333, 4096])
def test_packing_round_trips_exactly_at_every_width(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_numel(numel, bits)
    assert torch.equal(unpack(packed, bits, numel), codes.to(torch.int32))


def test_packing_refuses_codes_that_do_not_fit():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack(torch.tensor([0, 8]), 3)


@pytest.mark.parametrize("zero_point_domain", ["int", "float"])
def test_a_constant_block_stays_finite_with_float16_scales(zero_point_domain):
    w = _weight()
    w[:, :32] = 0.0
    out = fake_quantize(w, QuantSpec(4, False, zero_point_domain), (1, 32))
    assert torch.isfinite(out).all() and torch.equal(out[:, :32], w[:, :32])


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(4, False),
        QuantSpec(3, True),
        QuantSpec(2, False, "float"),
        QuantSpec(8, True, symmetric_range="restricted"),
    ],
    ids=str,
)
@pytest.mark.parametrize("block", [(1, 32), (1, 128), (4, 64), (16, 128)])
def test_fake_quantize_is_the_codes_round_trip_bit_for_bit(spec, block):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(3)) * torch.logspace(-2, 1, 128)
    scale, zero = choose_qparams(w, spec, block)
    assert torch.equal(
        fake_quantize(w, spec, block), dequantize(quantize(w, scale, zero, spec, block), scale, zero, block)
    )
    lo, hi = to_blocks(w, block).amin(-1) * 0.7, to_blocks(w, block).amax(-1) * 0.7  # a narrowed range
    scale, zero = choose_qparams(w, spec, block, min_val=lo, max_val=hi)
    narrowed = dequantize(quantize(w, scale, zero, spec, block), scale, zero, block)
    assert torch.equal(fake_quantize(w, spec, block, min_val=lo, max_val=hi), narrowed)
    assert fake_quantize(w.bfloat16(), spec, block).dtype == torch.bfloat16
