"""HQQ (zero-point optimization) and quantization with low-rank error correction (LoftQ-style)."""

import itertools

import pytest
import torch

from pipeline.algorithms.hqq import hqq_objective, hqq_quantize
from pipeline.algorithms.lowrank import lowrank_quantize
from pipeline.quant.primitives import QuantSpec, choose_qparams, dequantize, quantize


def _heavy_tailed(rows=256, cols=512, std=0.02, seed=0):
    """Student-t (3 degrees of freedom) weights: a Gaussian bulk with outliers, like LLM layers."""
    g = torch.Generator().manual_seed(seed)
    chi2 = sum(torch.randn(rows, cols, generator=g) ** 2 for _ in range(3))
    return std * torch.randn(rows, cols, generator=g) / (chi2 / 3).sqrt()


def _low_rank_plus_noise(rows=256, cols=512, rank=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    structure = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g) / rank**0.5
    return 0.06 * structure + 0.02 * torch.randn(rows, cols, generator=g)


def _rtn(w, spec, block):
    scale, zero = choose_qparams(w, spec, block)
    return quantize(w, scale, zero, spec, block), scale, zero


def _mse(w, codes, scale, zero, block):
    return float((w - dequantize(codes, scale, zero, block)).pow(2).mean())


# -- HQQ ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [QuantSpec(4, True), QuantSpec(4, False, "int")], ids=["symmetric", "int_zero"])
def test_hqq_refuses_specs_without_a_float_zero_point(spec):
    with pytest.raises(ValueError, match="float zero point.*symmetric=false, zero_point_domain=float"):
        hqq_quantize(_heavy_tailed(16, 64), spec, (1, 32))


@pytest.mark.parametrize("std", [0.02, 1.0], ids=["llm_scale", "unit_scale"])
@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64)])
def test_hqq_reconstructs_better_than_rtn(bits, group, std):
    w, spec, block = _heavy_tailed(std=std), QuantSpec(bits, False, "float"), (1, group)
    rtn, hqq = _rtn(w, spec, block), hqq_quantize(w, spec, block)
    assert hqq_objective(w, *hqq, block) < 0.99 * hqq_objective(w, *rtn, block)
    assert _mse(w, *hqq, block) < 0.95 * _mse(w, *rtn, block)


@pytest.mark.parametrize("early_stop", [True, False])
def test_hqq_objective_descends_and_the_best_iterate_is_returned(early_stop):
    w, spec, block = _heavy_tailed(), QuantSpec(3, False, "float"), (1, 64)
    history: list[float] = []
    codes, scale, zero = hqq_quantize(w, spec, block, early_stop=early_stop, history=history)
    # The starting point is min-max RTN with a float zero point.
    assert history[0] == pytest.approx(hqq_objective(w, *_rtn(w, spec, block), block), rel=1e-6)
    if early_stop:  # strictly decreasing until the step that stopped the loop
        assert all(b < a for a, b in itertools.pairwise(history[:-1]))
    else:  # the fp16 zero point leaves only rounding-level bumps
        assert all(b <= a * (1 + 1e-4) for a, b in itertools.pairwise(history))
    assert len(history) > 5
    assert hqq_objective(w, codes, scale, zero, block) == pytest.approx(min(history), rel=1e-6)
    assert min(history) < history[0]


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [(1, 32), (1, 512), (256, 512)], ids=["group", "per_channel", "per_tensor"])
def test_hqq_returns_the_layout_of_choose_qparams_and_is_scored_as_stored(block, scale_dtype):
    w, spec = _heavy_tailed(), QuantSpec(2, False, "float", scale_dtype)
    ref_codes, ref_scale, ref_zero = _rtn(w, spec, block)
    history: list[float] = []
    codes, scale, zero = hqq_quantize(w, spec, block, history=history)
    assert codes.shape == ref_codes.shape and codes.dtype == ref_codes.dtype == torch.uint8
    assert torch.equal(scale, ref_scale)  # HQQ keeps the min-max scale
    assert zero.shape == ref_zero.shape and zero.dtype == ref_zero.dtype == scale_dtype
    assert torch.equal(codes, quantize(w, scale, zero, spec, block))
    assert hqq_objective(w, codes, scale, zero, block) == pytest.approx(min(history), rel=1e-6)


# -- low-rank error correction ----------------------------------------------------------------
def _residual(w, codes, scale, zero, a, b, block):
    return float(torch.linalg.matrix_norm(w - dequantize(codes, scale, zero, block) - a.float() @ b.float()))


def test_lowrank_residual_shrinks_with_rank_and_iterations():
    w, spec, block = _low_rank_plus_noise(), QuantSpec(4, False), (1, 64)
    by_rank = []
    for rank in (4, 16, 64):
        one = _residual(w, *lowrank_quantize(w, spec, block, rank=rank, iters=1), block)
        more = _residual(w, *lowrank_quantize(w, spec, block, rank=rank, iters=5), block)
        assert more <= one
        by_rank.append(more)
    rtn_only = float(torch.linalg.matrix_norm(w - dequantize(*_rtn(w, spec, block), block)))
    assert rtn_only > by_rank[0] > by_rank[1] > by_rank[2]


@pytest.mark.parametrize("factor_dtype", [torch.float16, torch.float32])
def test_lowrank_factor_shapes_and_dtypes(factor_dtype):
    w, spec, block = _low_rank_plus_noise(64, 128), QuantSpec(4, False), (1, 32)
    codes, scale, zero, a, b = lowrank_quantize(w, spec, block, rank=8, iters=2, factor_dtype=factor_dtype)
    ref_codes, ref_scale, ref_zero = _rtn(w, spec, block)
    assert codes.shape == ref_codes.shape and codes.dtype == ref_codes.dtype
    assert scale.shape == ref_scale.shape and scale.dtype == ref_scale.dtype
    assert zero.shape == ref_zero.shape and zero.dtype == ref_zero.dtype
    assert a.shape == (64, 8) and b.shape == (8, 128)
    assert a.dtype == b.dtype == factor_dtype


@pytest.mark.parametrize("rank", [0, -1, 64, 100])
def test_lowrank_rejects_ranks_outside_the_layer_range(rank):
    w = _low_rank_plus_noise(64, 128)
    with pytest.raises(ValueError, match=r"rank must be in 1\.\.63 .*\(64, 128\)"):
        lowrank_quantize(w, QuantSpec(4, False), (1, 32), rank=rank)


def test_lowrank_rejects_zero_iterations():
    with pytest.raises(ValueError, match="iters must be >= 1"):
        lowrank_quantize(_low_rank_plus_noise(64, 128), QuantSpec(4, False), (1, 32), rank=4, iters=0)
