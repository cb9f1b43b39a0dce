"""Half-Quadratic Quantization (Badri & Shaji 2023): calibration-free zero-point optimization.

HQQ minimizes the sparsity-promoting loss ``sum |W - dequant(quant(W))|^p`` (p < 1, so a few large
errors cost less than many medium ones) over the zero point, with the min-max scale held fixed.
Half-quadratic splitting adds an auxiliary error W_e ≈ W - W_r and alternates two closed forms:

    W_e  = shrink_lp(W - W_r, beta)                 # generalized soft-thresholding (prox of |.|^p)
    zero = mean_group(Q - (W - W_e) / scale)        # least-squares zero given the codes Q

with ``beta *= kappa`` each step. The update is not guaranteed to descend, so the best zero point
seen is kept, and by default the loop stops at the first step that does not improve.

Reference: mobiusml/hqq, hqq/core/optimize.py (``optimize_weights_proximal_legacy``); HQQ keeps an
inverse scale there (``Q = W * scale + zero``), here the project convention ``x ≈ (q - zero) * scale``.
"""

from __future__ import annotations

import torch

from pipeline.quant.primitives import QuantSpec, choose_qparams, dequantize, expand_blocks, quantize, to_blocks


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-thresholding: zero out errors below (1/beta)|x|^(p-1), keep the large ones."""
    # At x == 0 the power is inf, the relu clamps it to 0: no NaN.
    return torch.sign(x) * torch.relu(x.abs() - x.abs().pow(p - 1) / beta)


def _lp(err: torch.Tensor, p: float) -> float:
    # float64 accumulation: objective values of neighbouring iterates differ in late digits.
    return float(err.double().abs().pow(p).sum())


def hqq_objective(
    weight: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    block_size: tuple[int, int],
    lp_norm: float = 0.7,
) -> float:
    """``sum |W - dequantize(codes, scale, zero)|^p``: the quantity HQQ minimizes."""
    return _lp(weight.float() - dequantize(codes, scale, zero, block_size), lp_norm)


@torch.no_grad()
def hqq_quantize(
    weight: torch.Tensor,
    spec: QuantSpec,
    block_size: tuple[int, int],
    *,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    early_stop: bool = True,
    history: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8), scale and float zero point (both ``spec.scale_dtype``, one per block).

    ``history``, when given, receives the objective of the starting point (min-max RTN with a float
    zero) and then of each iterate; the returned parameters attain ``min(history)``.
    """
    if spec.symmetric or spec.zero_point_domain != "float":
        raise ValueError(
            "HQQ optimizes a float zero point, so it needs an asymmetric spec with a float zero point "
            f"(got symmetric={spec.symmetric}, zero_point_domain={spec.zero_point_domain!r}); "
            "set symmetric=false, zero_point_domain=float"
        )
    if not 0.0 < lp_norm <= 1.0:
        raise ValueError(f"lp_norm must be in (0, 1] (the shrink operator is the prox of |x|^p, p <= 1), got {lp_norm}")
    w = weight.float()
    scale, zero = choose_qparams(w, spec, block_size)
    s = expand_blocks(scale.float(), block_size)

    def evaluate(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        # z is always the zero point as stored (rounded to scale_dtype): what dequantize will see.
        q = quantize(w, scale, z, spec, block_size)
        w_r = dequantize(q, scale, z, block_size)
        return q, w_r, _lp(w - w_r, lp_norm)

    q, w_r, best_err = evaluate(zero)
    best_zero, trace = zero, [best_err]
    for _ in range(iters):
        w_e = _shrink_lp(w - w_r, beta, lp_norm)
        # Mean over each block's elements (to_blocks' last dimension).
        zero = to_blocks(q.float() - (w - w_e) / s, block_size).mean(dim=-1).to(spec.scale_dtype)
        beta *= kappa
        q, w_r, err = evaluate(zero)
        trace.append(err)
        if err < best_err:
            best_zero, best_err = zero, err
        elif early_stop:
            break
    if history is not None:
        history.extend(trace)
    return quantize(w, scale, best_zero, spec, block_size), scale, best_zero
