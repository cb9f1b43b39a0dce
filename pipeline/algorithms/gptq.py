"""GPTQ: quantize a weight column by column, feeding each column's rounding error back into the
columns not yet quantized so that the layer output ``X @ W.T`` changes as little as possible.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers". The loss is ``||X W^T - X Wq^T||^2``, whose Hessian with respect to a row of W is
``H = 2 X^T X``; the optimal update of the remaining columns after quantizing column i is
``-err_i * Hinv[i, i:] / Hinv[i, i]``, which the upper Cholesky factor of ``H^-1`` gives row by row.
Updates are applied lazily: exactly within a block of columns, to the rest once per block.

Codes, scales and zero points come out in the format of ``choose_qparams``/``quantize`` for the
given ``block_size``, so GPTQ is a drop-in replacement for round-to-nearest.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from pipeline.device import torch_threads
from pipeline.quant.kernels import cpp
from pipeline.quant.primitives import QuantSpec, choose_qparams

log = logging.getLogger(__name__)


class HessianAccumulator:
    """Running ``H = 2/n X^T X`` over batches of layer inputs, n = total rows (tokens) seen.

    The sum is kept in float64 so that many calibration batches add up without drift; each batch's
    product is taken in float32, which is accurate enough and fast on any device.
    """

    def __init__(self) -> None:
        self._xtx: torch.Tensor | None = None
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.add_product((x.T @ x).double(), x.shape[0])

    def add_product(self, xtx: torch.Tensor, rows: int) -> None:
        """Add a precomputed X^T X of ``rows`` rows (layers that share an input share this product)."""
        if self._xtx is not None and self._xtx.shape != xtx.shape:
            raise ValueError(f"inputs have {xtx.shape[0]} features, earlier batches had {self._xtx.shape[0]}")
        self._xtx = xtx if self._xtx is None else self._xtx + xtx
        self.rows += rows

    @property
    def hessian(self) -> torch.Tensor:
        if self._xtx is None or self.rows == 0:
            raise ValueError("no inputs were added: the Hessian needs at least one calibration row")
        return self._xtx * (2.0 / self.rows)


def hessian_from_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2/n * X^T X (float64) from layer inputs of shape (..., in_features)."""
    acc = HessianAccumulator()
    acc.add(inputs)
    return acc.hessian


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``h^-1``: its rows are the error-feedback directions, in order."""
    lower, info = torch.linalg.cholesky_ex(h)
    if not info:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info or not torch.isfinite(upper).all():
        raise ValueError(
            "GPTQ: the Hessian is not positive definite even after damping; "
            "increase damp or the number of calibration samples"
        )
    return upper


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    block_size: tuple[int, int],
    *,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
    threads: int | None = None,
    timings: dict[str, float] | None = None,
    grid: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns (codes, scale, zero_point) in exactly the format `choose_qparams`/`quantize` produce for
    `block_size`, in the ORIGINAL column order, such that dequantize(codes, scale, zero, block_size) is
    the GPTQ solution.

    Per-tensor and per-channel qparams (and all group qparams when ``act_order``: "static groups")
    are fixed up front from the weight. Otherwise a group's qparams are chosen from the
    error-updated weights when the sweep reaches its first column, as the reference code does.
    ``act_order`` quantizes columns in order of decreasing ``H[i, i]`` (most important first).
    ``grid``: (scale, zero_point) fixed by an earlier step (reconstruction's learned range): the
    sweep rounds onto it and chooses no qparams of its own.

    The sweep is independent per row: ``threads`` (default ``torch.get_num_threads()`` on a CPU, 1
    on a GPU) sweep rows at once. On a CPU the C++ sweep (csrc/gptq_sweep.cpp) splits the rows over
    that many threads; the torch-op sweep (a GPU, or a CPU without the build) runs disjoint slices of
    whole qparams rows, one intra-op thread each (thousands of small ops, which intra-op threads slow
    down). Either way, and for any ``threads``, the codes are the same bits. ``timings`` gets the
    seconds of the Hessian inverse (``hessian``) and of the sweep (``sweep``) added.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"Hessian shape {tuple(hessian.shape)} does not match in_features={cols} of the weight "
            f"(expected ({cols}, {cols}))"
        )
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    if threads is None:  # a GPU sweeps all rows at once: more slices would only add kernel launches
        threads = torch.get_num_threads() if weight.device.type == "cpu" else 1
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"method.gptq.threads must be a positive integer or null (all torch threads), got {threads!r}")
    timings = {} if timings is None else timings
    start = time.perf_counter()
    w = weight.detach().float().clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float64, copy=True)

    # Inputs that are always zero carry no information: any value works, so quantize zero exactly.
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scale, zero = choose_qparams(w, spec, block_size) if grid is None else (grid[0].clone(), _clone(grid[1]))
    br, bc = block_size
    dynamic = bc < cols and not act_order and grid is None

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = _inverse_cholesky(h).float()
    del h
    timings["hessian"] = timings.get("hessian", 0.0) + time.perf_counter() - start

    start = time.perf_counter()
    sweep_columns = sweep_columns_for(w.device)
    if sweep_columns is not sweep_columns_torch:
        # the C++ sweep splits the rows over the intra-op threads itself, with no Python per column
        with torch_threads(threads):
            parts = [_sweep(w, hinv, perm, scale, zero, spec, block_size, block, dynamic, sweep_columns)]
    else:
        # qparams rows per slice: whole qparams rows, about the same count for every thread
        qrows = scale.shape[0]
        bounds = [round(qrows * t / threads) for t in range(threads + 1)]
        slices = [(a * br, b * br, a, b) for a, b in itertools.pairwise(bounds) if b > a]

        def sweep(rows: tuple[int, int, int, int]) -> torch.Tensor:
            r0, r1, q0, q1 = rows
            sub_zero = None if zero is None else zero[q0:q1]
            return _sweep(w[r0:r1], hinv, perm, scale[q0:q1], sub_zero, spec, block_size, block, dynamic, sweep_columns)

        with torch_threads(1):
            if len(slices) == 1:
                parts = [sweep(slices[0])]
            else:
                with ThreadPoolExecutor(len(slices)) as pool:
                    parts = list(pool.map(sweep, slices))
    timings["sweep"] = timings.get("sweep", 0.0) + time.perf_counter() - start
    return torch.cat(parts)[:, torch.argsort(perm)], scale, zero


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


def sweep_columns_torch(
    w: torch.Tensor,
    hinv: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    codes: torch.Tensor,
    err: torch.Tensor,
    start: int,
    stop: int,
    qmin: float,
    qmax: float,
) -> None:
    """Columns [start, stop) of one lazy block, in place, in torch ops (csrc/gptq_sweep.cpp's
    ``sweep_columns`` is the same loop in C++): round each column onto its grid (``scale``/``zero``:
    each column's qparams, as float (rows, columns)), write its codes and scaled error, and feed the
    error into the block's later columns. ``quantize``/``dequantize`` spelled out on one column."""
    for i in range(start, stop):
        x = w[:, i] / scale[:, i]
        if zero is not None:
            x = x + zero[:, i]
        q = x.round_().clamp_(qmin, qmax)
        codes[:, i] = q
        if zero is not None:
            q = q - zero[:, i]
        e = (w[:, i] - q * scale[:, i]) / hinv[i, i]
        w[:, i:] -= e[:, None] * hinv[i, i:][None, :]
        err[:, i] = e


@functools.cache
def _cpu_sweep() -> Callable | None:
    """The C++ column sweep, or None (logged once) where it did not build: the torch loop then runs,
    with the same codes, 1.7-15x slower (experiments/scale/gptq_sweep.md)."""
    outcome = cpp.build("gptq_sweep")
    if not outcome.ok:
        log.warning("the gptq_sweep kernel is not built (%s): GPTQ's column sweep runs in torch ops", outcome.error)
        return None
    return cpp.op("gptq_sweep", "sweep_columns")


def sweep_columns_for(device: torch.device) -> Callable:
    """The column sweep for tensors on ``device``: the C++ loop on a CPU (if built), else torch ops
    (on a GPU all rows of a column go in one launch, which the torch ops already do)."""
    return (_cpu_sweep() if device.type == "cpu" else None) or sweep_columns_torch


def _sweep(
    w: torch.Tensor,
    hinv: torch.Tensor,
    perm: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    spec: QuantSpec,
    block_size: tuple[int, int],
    block: int,
    dynamic: bool,
    sweep_columns: Callable,
) -> torch.Tensor:
    """The column sweep over rows ``w`` (permuted columns; updated in place); codes in permuted order.

    ``scale``/``zero`` are these rows' qparams (views: dynamic groups are written into them).
    Each lazy block gathers its columns' qparams once; ``sweep_columns`` runs the columns between
    dynamic group starts (where the next group's qparams are chosen).
    """
    br, bc = block_size
    cols = w.shape[1]
    group_of = (perm // bc).tolist()  # qparams column of each (permuted) weight column
    codes = torch.empty_like(w)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2].contiguous()
        err, codes1 = torch.zeros_like(w1), torch.empty_like(w1)
        s1, z1 = _column_qparams(scale, zero, group_of[i1:i2], br)
        starts = [j for j in range(i1, i2) if j % bc == 0] if dynamic else []
        cuts = sorted({i1, i2, *starts})
        for a, b in itertools.pairwise(cuts):
            i = a - i1
            if dynamic and a % bc == 0:
                # The group as the sweep sees it now: columns in this block are up to date in w1;
                # those past the block still lack this block's pending update, added here.
                ahead = w[:, i2 : a + bc] - err[:, :i] @ hinv[i1:a, i2 : a + bc]
                group = torch.cat([w1[:, i:], ahead], dim=1)[:, :bc]
                s, z = choose_qparams(group, spec, (br, bc))
                scale[:, a // bc] = s[:, 0]
                s1[:, i : i + bc] = s.float().repeat_interleave(br, 0)
                if zero is not None:
                    zero[:, a // bc] = z[:, 0]
                    z1[:, i : i + bc] = z.float().repeat_interleave(br, 0)
            sweep_columns(w1, hinv1, s1, z1, codes1, err, i, b - i1, float(spec.qmin), float(spec.qmax))
        codes[:, i1:i2] = codes1
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return codes.to(torch.int8 if spec.symmetric else torch.uint8)


def _column_qparams(
    scale: torch.Tensor, zero: torch.Tensor | None, groups: list[int], br: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each column's scale (and zero point) as float (rows, columns): qparams column ``groups[c]``
    for column c, each qparams row repeated for the ``br`` weight rows it covers."""
    index = torch.tensor(groups, device=scale.device)
    s = scale.float()[:, index].repeat_interleave(br, 0)
    return s, None if zero is None else zero.float()[:, index].repeat_interleave(br, 0)
