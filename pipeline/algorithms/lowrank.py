"""Quantization plus low-rank error correction (LoftQ, Li et al. 2023, Algorithm 1).

W ≈ dequant(Q) + A @ B with A (out, r), B (r, in). Starting from A @ B = 0, alternate:

    Q    = RTN(W - A @ B)                       # quantize what the factors do not explain
    A, B = rank-r truncated SVD of W - dequant(Q)

As in the public LoftQ code, the singular values are split evenly, A = U sqrt(S), B = sqrt(S) Vh,
so both factors have the same scale (fp16-friendly, and balanced for later LoRA fine-tuning).
"""

from __future__ import annotations

import torch

from pipeline.quant.primitives import QuantSpec, choose_qparams, dequantize, quantize


def _factors(residual: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD of ``residual`` (m, n) as (A, B) in ``dtype``, A = U sqrt(S), B = sqrt(S) Vh.

    Exact, without a full SVD: the top singular pairs from the eigendecomposition of the smaller
    Gram matrix (R R^T if m <= n, else R^T R), taken in float64 so that squaring the singular values
    costs no accuracy in the top ones. With R R^T = U S^2 U^T: B = sqrt(S) Vh = S^-1/2 U^T R; the
    other case is the same on R^T. A 2048 x 8192 residual: one 2048^2 x 8192 product and a 2048^2
    eigendecomposition instead of the SVD (see experiments/scale/quantize_time.md).
    """
    if residual.shape[0] > residual.shape[1]:
        b, a = _factors(residual.T, rank, dtype)
        return a.T, b.T
    r = residual.double()
    eigenvalues, eigenvectors = torch.linalg.eigh(r @ r.T)  # ascending
    sigma = eigenvalues[-rank:].flip(0).clamp_min(0).sqrt()
    u = eigenvectors[:, -rank:].flip(1)
    root = sigma.sqrt()
    # a zero singular value has no direction to give: its row of B is zero, as A's column is
    b = torch.where(sigma[:, None] > 0, (u.T @ r) / root.clamp_min(1e-300)[:, None], 0.0)
    return (u * root).to(dtype), b.to(dtype)


@torch.no_grad()
def lowrank_quantize(
    weight: torch.Tensor,
    spec: QuantSpec,
    block_size: tuple[int, int],
    *,
    rank: int,
    iters: int = 5,
    factor_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero, A, B) with ``W ≈ dequantize(codes, scale, zero) + A @ B``.

    Returns the iterate with the smallest ``||W - dequant(Q) - A @ B||_F``: RTN with a min-max
    scale is not the least-squares quantizer of the residual, so the alternation may not descend.
    """
    out_features, in_features = weight.shape
    if not 1 <= rank < min(out_features, in_features):
        raise ValueError(
            f"rank must be in 1..{min(out_features, in_features) - 1} for a layer of shape "
            f"(out, in) = ({out_features}, {in_features}), got {rank}"
        )
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    w = weight.float()
    lowrank = torch.zeros_like(w)
    best: tuple | None = None
    best_err = float("inf")
    for _ in range(iters):
        target = w - lowrank
        scale, zero = choose_qparams(target, spec, block_size)
        codes = quantize(target, scale, zero, spec, block_size)
        deq = dequantize(codes, scale, zero, block_size)
        a, b = _factors(w - deq, rank, factor_dtype)
        # The product of the factors as stored, so the next step and the error see what inference sees.
        lowrank = a.float() @ b.float()
        err = float(torch.linalg.matrix_norm(w - deq - lowrank))
        if err < best_err:
            best, best_err = (codes, scale, zero, a, b), err
    return best
