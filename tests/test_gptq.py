import pytest
import torch

from pipeline.algorithms import gptq
from pipeline.algorithms.gptq import HessianAccumulator, gptq_quantize, hessian_from_inputs
from pipeline.quant.kernels import cpp
from pipeline.quant.primitives import QuantSpec, choose_qparams, dequantize, quantize

ROWS, IN, OUT = 512, 128, 64

# (name, spec, block_size, act_order)
SETTINGS = [
    ("4bit-asym-g32", QuantSpec(4, False), (1, 32), False),
    ("3bit-asym-per-channel", QuantSpec(3, False), (1, IN), False),
    ("4bit-sym-per-channel", QuantSpec(4, True), (1, IN), False),
    ("4bit-sym-restricted-per-channel", QuantSpec(4, True, symmetric_range="restricted"), (1, IN), False),
    ("4bit-sym-g32-act-order", QuantSpec(4, True), (1, 32), True),
    ("2bit-sym-full-g32", QuantSpec(2, True), (1, 32), False),
    ("2bit-asym-g32", QuantSpec(2, False), (1, 32), False),
    ("4bit-asym-g32-act-order", QuantSpec(4, False), (1, 32), True),
    ("2bit-asym-g32-act-order", QuantSpec(2, False), (1, 32), True),
    ("3bit-asym-per-channel-act-order", QuantSpec(3, False), (1, IN), True),
    ("4bit-asym-float-zero-g32", QuantSpec(4, False, zero_point_domain="float"), (1, 32), False),
    ("4bit-sym-per-tensor", QuantSpec(4, True), (OUT, IN), False),
]


def _problem(seed: int = 0, feature_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated inputs X = Z M, M with a decaying spectrum as real activations have; optionally
    with feature scales spread over 100x (outlier-like features)."""
    g = torch.Generator().manual_seed(seed)
    u, _, v = torch.linalg.svd(torch.randn(IN, IN, generator=g))
    x = torch.randn(ROWS, IN, generator=g) @ (u * torch.logspace(0, -2, IN)) @ v
    if feature_scales:
        x = x * torch.logspace(-1, 1, IN)[torch.randperm(IN, generator=g)]
    return x, torch.randn(OUT, IN, generator=g)


def _rtn(w, spec, block_size):
    scale, zero = choose_qparams(w, spec, block_size)
    return quantize(w, scale, zero, spec, block_size), scale, zero


def _output_error(x, w, result, block_size):
    codes, scale, zero = result
    return torch.linalg.norm(x @ w.T - x @ dequantize(codes, scale, zero, block_size).T).item()


@pytest.mark.parametrize("name,spec,block_size,act_order", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_gptq_beats_rtn_on_correlated_inputs(name, spec, block_size, act_order):
    x, w = _problem()
    result = gptq_quantize(w, hessian_from_inputs(x), spec, block_size, act_order=act_order)
    ratio = _output_error(x, w, result, block_size) / _output_error(x, w, _rtn(w, spec, block_size), block_size)
    print(f"{name}: GPTQ/RTN output error = {ratio:.3f}")
    assert ratio < 0.7


def test_act_order_helps_with_outlier_features_at_2_bits():
    """Spread feature scales make error feedback inflate later groups' ranges when their qparams are
    chosen during the sweep; act_order with static groups keeps 2-bit GPTQ well ahead of RTN."""
    x, w = _problem(feature_scales=True)
    spec, block_size = QuantSpec(2, False), (1, 32)
    rtn_error = _output_error(x, w, _rtn(w, spec, block_size), block_size)
    result = gptq_quantize(w, hessian_from_inputs(x), spec, block_size, act_order=True)
    ratio = _output_error(x, w, result, block_size) / rtn_error
    print(f"2bit-asym-g32-act-order, outlier features: GPTQ/RTN output error = {ratio:.3f}")
    assert ratio < 0.75


@pytest.mark.parametrize("name,spec,block_size,act_order", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_output_has_rtn_format_and_round_trips(name, spec, block_size, act_order):
    x, w = _problem(1)
    codes, scale, zero = gptq_quantize(w, hessian_from_inputs(x), spec, block_size, act_order=act_order)
    ref_codes, ref_scale, ref_zero = _rtn(w, spec, block_size)
    assert codes.shape == ref_codes.shape and codes.dtype == ref_codes.dtype
    assert scale.shape == ref_scale.shape and scale.dtype == ref_scale.dtype
    if ref_zero is None:
        assert zero is None
    else:
        assert zero.shape == ref_zero.shape and zero.dtype == ref_zero.dtype
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    # The codes are the grid points of their own dequantized values: no re-rounding drift.
    solution = dequantize(codes, scale, zero, block_size)
    assert torch.equal(quantize(solution, scale, zero, spec, block_size), codes)


@pytest.mark.parametrize("block_size", [(1, IN), (1, 32)])
@pytest.mark.parametrize("block", [16, 24, 96])
def test_lazy_block_size_does_not_change_the_solution(block_size, block):
    """Lazy batching (and the pending update of groups that straddle blocks) is exact algebra."""
    x, w = _problem(2)
    h, spec = hessian_from_inputs(x), QuantSpec(4, False)
    codes, *_ = gptq_quantize(w, h, spec, block_size, block=IN)
    other, *_ = gptq_quantize(w, h, spec, block_size, block=block)
    assert (codes == other).float().mean() > 0.99  # float rounding may flip a rare tie


def _explicit_obs(w, h, spec, block_size, damp=0.01):
    """Textbook OBQ sweep in float64: explicit inverse of H, downdated (Schur complement) per column."""
    w, h = w.double().clone(), h.double() + damp * h.diag().mean() * torch.eye(IN, dtype=torch.float64)
    scale, zero = choose_qparams(w.float(), spec, block_size)
    g, codes, hinv = block_size[1], [], torch.linalg.inv(h)
    for i in range(IN):
        if g < IN and i % g == 0:
            scale[:, i // g : i // g + 1], z = choose_qparams(w[:, i : i + g].float(), spec, block_size)
            if zero is not None:
                zero[:, i // g : i // g + 1] = z
        s, z = scale[:, i // g, None], None if zero is None else zero[:, i // g, None]
        codes.append(quantize(w[:, i : i + 1].float(), s, z, spec, (1, 1)))
        err = (w[:, i] - dequantize(codes[-1], s, z, (1, 1)).double()[:, 0]) / hinv[0, 0]
        w[:, i:] -= err[:, None] * hinv[0]
        hinv = hinv[1:, 1:] - hinv[1:, :1] @ hinv[:1, 1:] / hinv[0, 0]
    return torch.cat(codes, dim=1), scale, zero


@pytest.mark.parametrize("spec,block_size", [(QuantSpec(2, False), (1, 32)), (QuantSpec(4, True), (1, IN))])
def test_matches_explicit_column_by_column_reference(spec, block_size):
    x, w = _problem(7)
    h = hessian_from_inputs(x)
    codes, scale, _ = gptq_quantize(w, h, spec, block_size, block=48)
    ref_codes, ref_scale, _ = _explicit_obs(w, h, spec, block_size)
    assert (codes == ref_codes).float().mean() > 0.99  # float32 vs float64: a rare tie may flip
    torch.testing.assert_close(scale.float(), ref_scale.float(), rtol=1e-2, atol=1e-3)


def test_identity_hessian_per_channel_equals_rtn():
    _, w = _problem(3)
    for spec in (QuantSpec(4, False), QuantSpec(3, True)):
        result = gptq_quantize(w, torch.eye(IN), spec, (1, IN))
        for got, ref in zip(result, _rtn(w, spec, (1, IN))):
            assert (got is None and ref is None) or torch.equal(got, ref)


def test_accumulator_matches_concatenation():
    x, _ = _problem(4)
    acc = HessianAccumulator()
    for batch in (x[:100], x[100:356].reshape(4, 64, IN), x[356:]):
        acc.add(batch)
    assert acc.rows == ROWS
    torch.testing.assert_close(acc.hessian, hessian_from_inputs(x), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(acc.hessian, 2 / ROWS * x.double().T @ x.double(), rtol=1e-4, atol=1e-2)
    with pytest.raises(ValueError, match="features"):
        acc.add(torch.randn(3, IN + 1))
    with pytest.raises(ValueError, match="no inputs"):
        _ = HessianAccumulator().hessian


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", [QuantSpec(4, False), QuantSpec(4, True)], ids=["asym", "sym"])
def test_dead_inputs_are_zeroed_without_nan(spec, act_order):
    x, w = _problem(5)
    dead = [*range(32), 70]  # a whole dead group (zero range, float16 scale) and a lone dead column
    x[:, dead] = 0.0
    block_size = (1, 32)
    codes, scale, zero = gptq_quantize(w, hessian_from_inputs(x), spec, block_size, act_order=act_order)
    solution = dequantize(codes, scale, zero, block_size)
    assert torch.isfinite(solution).all() and torch.isfinite(scale.float()).all()
    assert torch.all(solution[:, dead] == 0)
    rtn_error = _output_error(x, w, _rtn(w, spec, block_size), block_size)
    assert _output_error(x, w, (codes, scale, zero), block_size) < rtn_error


def test_bad_hessian_raises_clear_errors():
    _, w = _problem(6)
    with pytest.raises(ValueError, match=r"does not match in_features=128"):
        gptq_quantize(w, torch.eye(IN - 1), QuantSpec(4, False), (1, IN))
    with pytest.raises(ValueError, match="increase damp"):
        gptq_quantize(w, -torch.eye(IN), QuantSpec(4, False), (1, IN))


@pytest.mark.parametrize("name,spec,block_size,act_order", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_threads_sweep_row_slices_with_bit_identical_results(name, spec, block_size, act_order):
    x, w = _problem(2)
    h = hessian_from_inputs(x)
    one = gptq_quantize(w, h, spec, block_size, act_order=act_order, threads=1)
    timings = {}
    three = gptq_quantize(w, h, spec, block_size, act_order=act_order, threads=3, timings=timings)
    for a, b in zip(one, three, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert timings["hessian"] > 0 and timings["sweep"] > 0
    with pytest.raises(ValueError, match="method.gptq.threads must be a positive integer or null"):
        gptq_quantize(w, h, spec, block_size, threads=0)


def _torch_sweep_only(monkeypatch) -> None:
    """Make gptq_quantize run its column sweep in torch ops, as on a machine without the C++ build."""
    monkeypatch.setattr(gptq, "sweep_columns_for", lambda _device: gptq.sweep_columns_torch)


@pytest.mark.parametrize("name,spec,block_size,act_order", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_cpp_sweep_gives_the_torch_sweeps_codes_bit_for_bit(monkeypatch, name, spec, block_size, act_order):
    if not cpp.build("gptq_sweep").ok:
        pytest.skip(f"gptq_sweep kernel not built: {cpp.build('gptq_sweep').error}")
    assert gptq.sweep_columns_for(torch.device("cpu")) is not gptq.sweep_columns_torch
    x, w = _problem(3, feature_scales=True)
    h = hessian_from_inputs(x)
    grid = choose_qparams(w * 0.8, spec, block_size)  # a fixed grid (reconstruction's) as well
    # block=48: lazy blocks that cut through groups of 32, so dynamic group starts fall mid-block
    runs = [dict(act_order=act_order, block=48), dict(act_order=act_order, grid=grid), dict(threads=1)]
    kernel = [gptq_quantize(w, h, spec, block_size, **kw) for kw in runs]
    _torch_sweep_only(monkeypatch)
    reference = [gptq_quantize(w, h, spec, block_size, **kw) for kw in runs]
    for got, want in zip(kernel, reference, strict=True):
        for a, b in zip(got, want, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


def test_cpp_sweep_refuses_tensors_it_cannot_read():
    if not cpp.build("gptq_sweep").ok:
        pytest.skip(f"gptq_sweep kernel not built: {cpp.build('gptq_sweep').error}")
    sweep = cpp.op("gptq_sweep", "sweep_columns")
    w, h = torch.randn(4, 8), torch.eye(8)
    codes, err = torch.empty(4, 8), torch.empty(4, 8)
    with pytest.raises(RuntimeError, match="scale must be a contiguous float32"):
        sweep(w, h, torch.ones(4, 8).T.contiguous().T, None, codes, err, 0, 8, -8.0, 7.0)
    with pytest.raises(RuntimeError, match=r"hinv must have shape \(8, 8\)"):
        sweep(w, torch.eye(7), torch.ones(4, 8), None, codes, err, 0, 8, -8.0, 7.0)
    with pytest.raises(RuntimeError, match=r"columns \[0, 9\) outside 0..8"):
        sweep(w, h, torch.ones(4, 8), None, codes, err, 0, 9, -8.0, 7.0)
