"""Affine quantization primitives: choose qparams, quantize, dequantize.

One mechanism covers every granularity through ``block_size``, as in torchao: a 2-D tensor of
shape (rows, cols) is cut into blocks of ``block_size = (block_rows, block_cols)`` and each block
gets one scale (and one zero point when asymmetric).

- per-tensor:   block_size = (rows, cols)
- per-channel:  block_size = (1, cols)       (one scale per output row of a weight)
- group-wise:   block_size = (1, group_size) (groups along the input dimension)
- per-token:    block_size = (1, cols) applied to activations of shape (tokens, features)

Affine map: ``x ≈ (q - zero_point) * scale``. Symmetric quantization has no zero point and a
signed integer range; asymmetric has an integer (or, optionally, float) zero point and an
unsigned range ``[0, 2**bits - 1]``.

Symmetric range: ``full`` uses every signed code ``[-2**(b-1), 2**(b-1) - 1]`` (int4: [-8, 7], 16
levels) with ``scale = max|x| / ((qmax - qmin) / 2)`` (amax / 7.5 at int4), the convention of
torchao's ``choose_qparams_affine``, GPTQ's reference code and llm-compressor; ``restricted`` drops
the most negative code, ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` (int4: [-7, 7], 15 levels, amax / 7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_BITS, MAX_BITS = 2, 8
ZERO_POINT_DOMAINS = ("int", "float")
SYMMETRIC_RANGES = ("full", "restricted")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor. Pure data, hashable, shared by weights and activations."""

    bits: int
    symmetric: bool
    zero_point_domain: str = "int"  # "int": integer zero point; "float": float zero (Q4_1-style)
    scale_dtype: torch.dtype = torch.float16
    symmetric_range: str = "full"  # symmetric only: "full" [-2^(b-1), 2^(b-1)-1]; "restricted" ±(2^(b-1)-1)

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}")
        if self.zero_point_domain not in ZERO_POINT_DOMAINS:
            raise ValueError(f"zero_point_domain must be one of {ZERO_POINT_DOMAINS}, got {self.zero_point_domain!r}")
        if self.symmetric_range not in SYMMETRIC_RANGES:
            raise ValueError(
                f"symmetric_range must be one of {', '.join(SYMMETRIC_RANGES)}, got {self.symmetric_range!r}"
            )
        if self.symmetric and self.bits == 2 and self.symmetric_range == "restricted":
            # The full 2-bit range {-2, -1, 0, 1} has 4 levels like asymmetric 2-bit (a zero point
            # fixed at the middle code); the restricted one is ternary and wastes a level.
            raise ValueError(
                "2-bit symmetric quantization with symmetric_range=restricted has only the levels {-1, 0, +1}; "
                "use symmetric_range=full (levels {-2, -1, 0, +1}) or symmetric=false (4 levels with a zero point)"
            )

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric_range == "restricted" else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def describe(self) -> str:
        """The grid in a few words, e.g. ``int4 sym [-8,7]`` or ``int4 asym [0,15] int-zero``."""
        kind = "sym" if self.symmetric else "asym"
        zero = "" if self.symmetric else f" {self.zero_point_domain}-zero"
        return f"int{self.bits} {kind} [{self.qmin},{self.qmax}]{zero}"


def _check_block_size(shape: torch.Size, block_size: tuple[int, int]) -> None:
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(shape)}")
    for dim, (size, block) in enumerate(zip(shape, block_size)):
        if block <= 0 or size % block:
            raise ValueError(
                f"block_size {tuple(block_size)} does not tile shape {tuple(shape)} "
                f"(dimension {dim}: {size} is not a multiple of {block})"
            )


def to_blocks(x: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """View (rows, cols) as (n_row_blocks, n_col_blocks, block_rows * block_cols)."""
    rows, cols = x.shape
    br, bc = block_size
    return x.reshape(rows // br, br, cols // bc, bc).permute(0, 2, 1, 3).reshape(rows // br, cols // bc, br * bc)


def expand_blocks(p: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """Broadcast per-block parameters (n_row_blocks, n_col_blocks) back to element shape."""
    br, bc = block_size
    return p.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)


def _blockwise(x: torch.Tensor, params: list[torch.Tensor | None], block_size: tuple[int, int]):
    """x as (row blocks, br, col blocks, bc) and params as (row blocks, 1, col blocks, 1): they
    broadcast against each other without materializing full-size parameter tensors."""
    rows, cols = x.shape
    br, bc = block_size
    x4 = x.reshape(rows // br, br, cols // bc, bc)
    return x4, [None if p is None else p.float()[:, None, :, None] for p in params]


def choose_qparams(
    x: torch.Tensor,
    spec: QuantSpec,
    block_size: tuple[int, int],
    *,
    min_val: torch.Tensor | None = None,
    max_val: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) for each block of ``x``, in ``spec.scale_dtype``.

    ``min_val``/``max_val`` (per block) override the block's range: observers and clipping
    searches pass a narrowed range here instead of writing a second qparams routine.
    Returns ``(scale, zero_point)``; ``zero_point`` is None for symmetric specs.
    """
    _check_block_size(x.shape, block_size)
    blocks = to_blocks(x.float(), block_size)
    lo = blocks.amin(dim=-1) if min_val is None else min_val
    hi = blocks.amax(dim=-1) if max_val is None else max_val
    return qparams_from_range(lo, hi, spec, eps=eps)


def qparams_from_range(
    min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec, *, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) that map the range ``[min_val, max_val]`` (elementwise) onto the grid.

    Symmetric: ``scale = max(|min|, |max|) / ((qmax - qmin) / 2)``, as torchao does: amax / 7.5 for
    the full int4 range [-8, 7], amax / 7 for the restricted one. At the full range the extremes
    land on ±7.5: -amax takes code -8 (a rounding tie, to even), +amax is clipped to 7 (half a
    step, the same bound as rounding); the gain is the finer step.
    """
    lo, hi = min_val.float(), max_val.float()
    # A constant block has zero range: clamp to a scale the storage dtype can represent (an eps of
    # 1e-8 would round to 0 in float16 and turn the block into NaNs).
    eps = max(eps, torch.finfo(spec.scale_dtype).tiny)
    if spec.symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / ((spec.qmax - spec.qmin) / 2)
        return scale.clamp_min(eps).to(spec.scale_dtype), None
    if spec.zero_point_domain == "int":
        # Keep 0.0 exactly representable (padding, ReLU zeros) as GPTQ and torchao do.
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(eps).to(spec.scale_dtype)
    # The zero point is computed from the scale as stored, so dequantization uses the same value.
    zero = spec.qmin - lo / scale.float()
    if spec.zero_point_domain == "int":
        zero = zero.round().clamp(spec.qmin, spec.qmax).to(torch.uint8)
    else:
        zero = zero.to(spec.scale_dtype)
    return scale, zero


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    block_size: tuple[int, int],
) -> torch.Tensor:
    """Integer codes of ``x``: int8 for symmetric specs, uint8 for asymmetric ones."""
    _check_block_size(x.shape, block_size)
    x4, (s, z) = _blockwise(x.float(), [scale, zero_point], block_size)
    q = x4 / s
    if z is not None:
        q = q + z
    q = q.round().clamp(spec.qmin, spec.qmax).reshape(x.shape)
    return q.to(torch.int8 if spec.symmetric else torch.uint8)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    block_size: tuple[int, int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Float values ``(q - zero_point) * scale`` in ``dtype``."""
    _check_block_size(q.shape, block_size)
    x4, (s, z) = _blockwise(q.float(), [scale, zero_point], block_size)
    if z is not None:
        x4 = x4 - z
    return (x4 * s).reshape(q.shape).to(dtype)


def fake_quantize_ste(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    block_size: tuple[int, int],
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in float32 that gradients flow through (quantization-aware training).

    Rounding is a straight-through estimator (identity gradient), clipping a hard cut (zero
    gradient outside the grid); ``scale`` gets its LSQ gradient through both uses. ``zero_point``
    may be float (it is added as is).
    """
    _check_block_size(x.shape, block_size)
    x4, (s, z) = _blockwise(x.float(), [scale, zero_point], block_size)
    v = x4 / s
    if z is not None:
        v = v + z
    q = (v + (v.round() - v).detach()).clamp(spec.qmin, spec.qmax)
    if z is not None:
        q = q - z
    return (q * s).reshape(x.shape)


def fake_quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    block_size: tuple[int, int],
    *,
    min_val: torch.Tensor | None = None,
    max_val: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round trip through the grid (round-to-nearest), same shape and dtype as ``x``.

    ``min_val``/``max_val`` narrow each block's range, as in ``choose_qparams``. The values of
    ``dequantize(quantize(...))``, in place on one float buffer: searches call this thousands of
    times, and the integer codes in between would cost two more passes.
    """
    scale, zero = choose_qparams(x, spec, block_size, min_val=min_val, max_val=max_val)
    x4, (s, z) = _blockwise(x.float(), [scale, zero], block_size)
    t = x4 / s
    if z is not None:
        t += z
    t = t.round_().clamp_(spec.qmin, spec.qmax)
    if z is not None:
        t -= z
    t *= s
    return t.reshape(x.shape).to(x.dtype)


def block_size_for(shape: torch.Size, granularity: str, group_size: int | None = None) -> tuple[int, int]:
    """The block size that a named granularity means for a 2-D tensor of ``shape``."""
    rows, cols = shape
    if granularity == "per_tensor":
        return (rows, cols)
    if granularity == "per_channel":
        return (1, cols)
    if granularity == "group":
        if group_size is None or group_size <= 0:
            raise ValueError(f"granularity=group needs a positive group_size, got {group_size!r}")
        return (1, group_size)
    raise ValueError(f"granularity must be one of per_tensor, per_channel, group; got {granularity!r}")
