"""Block-wise reconstruction: OmniQuant's learnable weight clipping (LWC, Shao et al. 2024) and, as an
option, EfficientQAT's training of the weights themselves (Block-AP, Chen et al. 2024), on our primitives.

For one decoder block: the float block's outputs on its calibration inputs are the target. Each
selected layer gets, per quantization block, a learnable clipping strength of its range (the block
quantizes [sigmoid(beta) * min, sigmoid(gamma) * max]; symmetric grids: sigmoid(gamma) * max|w|) and,
with ``weight_lr``, a trainable change of its weight (in steps of its initial grid). They are trained
together so that the block with fake-quantized weights reproduces the target (mean squared error;
rounding is a straight-through estimator). The learned range becomes the layer's fixed grid (``train.FixedGrid``)
that the ``rtn`` codes step rounds the (learned) weight onto: the exported layer is an ordinary
packed QuantLinear, its learned range ordinary scales and zero points.

The block's inputs are the partly quantized model's (as for GPTQ and AWQ here); its target (``target``)
is, as in both papers, the float model's own output at that block (``float``: the float path is
carried from block to block, so a block also learns to undo earlier blocks' errors), or the float
block's output on the same inputs (``block``). Simplifications vs the papers' code: the step sizes are
not trained end to end afterwards (EfficientQAT's E2E-QP); OmniQuant's learnable equivalent
transformation is not learned (an ``awq`` step before this one gives the block its scales).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.algorithms.sequential import block_output
from pipeline.quant.primitives import (
    QuantSpec,
    choose_qparams,
    dequantize,
    expand_blocks,
    fake_quantize_ste,
    qparams_from_range,
    quantize,
    to_blocks,
)

log = logging.getLogger(__name__)

OPTION_KEYS = ("epochs", "lr", "weight_lr", "micro_batch", "init", "target")
TARGETS = ("float", "block")


def check_options(options: Mapping) -> None:
    missing = [k for k in OPTION_KEYS if k not in options]
    if missing:
        raise ValueError(f"method.reconstruct lacks {', '.join(missing)} (it takes {', '.join(OPTION_KEYS)})")
    if int(options["epochs"]) <= 0:
        raise ValueError(f"method.reconstruct.epochs must be a positive integer, got {options['epochs']!r}")
    if float(options["lr"]) <= 0:
        raise ValueError(f"method.reconstruct.lr must be positive, got {options['lr']!r}")
    if options["weight_lr"] is not None and float(options["weight_lr"]) <= 0:
        raise ValueError(
            f"method.reconstruct.weight_lr must be null (weights frozen: clipping only) or positive, "
            f"got {options['weight_lr']!r}"
        )
    if options["target"] not in TARGETS:
        raise ValueError(
            "method.reconstruct.target must be float (the float model's outputs: later blocks also undo earlier "
            f"blocks' errors) or block (the float block on the partly quantized inputs), got {options['target']!r}"
        )
    if int(options["micro_batch"]) <= 0:
        raise ValueError(f"method.reconstruct.micro_batch must be a positive integer, got {options['micro_batch']!r}")


@dataclass(frozen=True)
class LayerGrid:
    """What reconstruction leaves for one layer: its weight (trained, or as it was) and its grid."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


class LearnedClipLinear(nn.Module):
    """A linear layer whose weight is fake-quantized on a learnably clipped grid (LWC)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: QuantSpec,
        block_size: tuple[int, int],
        init: float,
        train_weight: bool,
        input_multiplier: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.spec, self.block_size = spec, block_size
        self.register_buffer("base", weight.detach().float().clone())
        # Block-AP's trainable weight as base + step * delta: delta counts steps of the layer's initial
        # grid, so one learning rate means the same at 2 bits as at 4
        step, _ = choose_qparams(self.base, spec, block_size)
        self.register_buffer("step", expand_blocks(step.float(), block_size) if train_weight else None)
        self.delta = nn.Parameter(torch.zeros_like(self.base)) if train_weight else None
        blocks = to_blocks(self.base, block_size).shape[:2]
        self.gamma = nn.Parameter(torch.full(blocks, float(init), device=weight.device))
        self.beta = None if spec.symmetric else nn.Parameter(torch.full(blocks, float(init), device=weight.device))
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.register_buffer("input_multiplier", input_multiplier)

    @property
    def weight(self) -> torch.Tensor:
        return self.base if self.delta is None else self.base + self.step * self.delta

    def clipped_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) per quantization block, differentiable in gamma, beta and the weight."""
        blocks = to_blocks(self.weight, self.block_size)
        if self.spec.symmetric:
            hi = blocks.abs().amax(-1) * torch.sigmoid(self.gamma)
            return -hi, hi
        return blocks.amin(-1) * torch.sigmoid(self.beta), blocks.amax(-1) * torch.sigmoid(self.gamma)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero point as trained: float32, the zero point rounded straight-through on an int grid."""
        lo, hi = self.clipped_range()
        spec = self.spec
        if spec.symmetric:
            return (hi / ((spec.qmax - spec.qmin) / 2)).clamp_min(1e-6), None
        if spec.zero_point_domain == "int":  # 0.0 stays exactly representable, as in qparams_from_range
            lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(1e-6)
        zero = spec.qmin - lo / scale
        if spec.zero_point_domain == "int":
            zero = (zero + (zero.round() - zero).detach()).clamp(spec.qmin, spec.qmax)
        return scale, zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = self.qparams()
        w = fake_quantize_ste(self.weight, scale, zero, self.spec, self.block_size)
        if self.input_multiplier is not None:
            x = x * self.input_multiplier.to(x.dtype)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def result(self) -> LayerGrid:
        """The trained weight and its grid in the storage dtypes (``qparams_from_range`` of the learned range)."""
        lo, hi = self.clipped_range()
        scale, zero = qparams_from_range(lo, hi, self.spec)
        return LayerGrid(self.weight.detach().clone(), scale, zero)


def _batch_kwargs(kwargs: Mapping, rows: slice, batch: int) -> dict:
    """The block's keyword inputs for rows ``rows`` of a batch of ``batch`` sequences: tensors (and
    tuples of them, e.g. rotary embeddings) with a leading batch dimension are sliced, others kept."""

    def cut(value):
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch and batch > 1:
            return value[rows]
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        return value

    return {k: cut(v) for k, v in kwargs.items()}


def _micro_batches(state: list, size: int) -> list[tuple[torch.Tensor, dict, int]]:
    """The calibration pass's (hidden, kwargs) batches cut into batches of at most ``size`` sequences;
    each with its index in ``state`` and its rows there, so targets are cut the same way."""
    out = []
    for index, (hidden, kwargs) in enumerate(state):
        batch = hidden.shape[0]
        for start in range(0, batch, size):
            rows = slice(start, min(start + size, batch))
            out.append((index, rows, hidden[rows], _batch_kwargs(kwargs, rows, batch)))
    return out


def reconstruct_block(
    block: nn.Module,
    layers: Mapping[str, tuple[torch.Tensor, QuantSpec, tuple[int, int]]],
    state: list,
    targets: list[torch.Tensor],
    options: Mapping,
    input_multipliers: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, LayerGrid], dict[str, float]]:
    """Learn the clipping (and, with ``weight_lr``, the weights) of ``layers`` (local name in ``block``
    -> (float weight (out, in), spec, block size)) so that ``block`` reproduces ``targets`` (its float
    outputs on ``state``, the calibration pass's (hidden, kwargs) batches).

    The block's own modules are put back unchanged; returns each layer's result and the block's
    mean squared output error before training (at the initial clipping) and after it (on the exported
    grid, hard-rounded), over all calibration batches.
    """
    check_options(options)
    multipliers = input_multipliers or {}
    modules = dict(block.named_modules())
    originals = {name: modules[name] for name in layers}
    learners = {
        name: LearnedClipLinear(
            weight,
            getattr(originals[name], "bias", None),
            spec,
            size,
            float(options["init"]),
            options["weight_lr"] is not None,
            multipliers.get(name),
        )
        for name, (weight, spec, size) in layers.items()
    }
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    _swap(block, learners)
    try:
        before = _block_error(block, state, targets)
        batches = _micro_batches(state, int(options["micro_batch"]))
        steps = int(options["epochs"]) * len(batches)
        groups = [{"params": [p for m in learners.values() for p in (m.gamma, m.beta) if p is not None]}]
        groups[0]["lr"] = float(options["lr"])
        if options["weight_lr"] is not None:
            groups.append({"params": [m.delta for m in learners.values()], "lr": float(options["weight_lr"])})
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
        )
        with torch.enable_grad():
            for _ in range(int(options["epochs"])):
                for index, rows, hidden, kwargs in batches:
                    out = block_output(block, hidden, kwargs)
                    loss = F.mse_loss(out.float(), targets[index][rows].float())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
        results = {name: learner.result() for name, learner in learners.items()}
    finally:
        _swap(block, originals)
        for p, requires_grad in frozen:
            p.requires_grad_(requires_grad)
    after = exported_block_error(block, layers, results, state, targets, multipliers)
    return results, {"mse_before": before, "mse_after": after}


def _swap(block: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, module)


@torch.no_grad()
def _block_error(block: nn.Module, state: list, targets: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for (hidden, kwargs), target in zip(state, targets, strict=True):
        diff = block_output(block, hidden, kwargs).float() - target.float()
        total, count = total + float(diff.pow(2).sum()), count + diff.numel()
    return total / count


@torch.no_grad()
def exported_block_error(
    block: nn.Module,
    layers: Mapping[str, tuple[torch.Tensor, QuantSpec, tuple[int, int]]],
    results: Mapping[str, LayerGrid],
    state: list,
    targets: list[torch.Tensor],
    multipliers: Mapping[str, torch.Tensor],
) -> float:
    """The block's error with each layer's weight rounded onto its exported grid (storage dtypes)."""
    modules = dict(block.named_modules())
    exported = {}
    for name, (_weight, spec, size) in layers.items():
        r = results[name]
        exported[name] = _RoundedLinear(r, spec, size, getattr(modules[name], "bias", None), multipliers.get(name))
    originals = {name: modules[name] for name in layers}
    _swap(block, exported)
    try:
        return _block_error(block, state, targets)
    finally:
        _swap(block, originals)


class _RoundedLinear(nn.Module):
    """A layer computing with its weight rounded onto a fixed grid: what the packed layer will compute."""

    def __init__(self, r: LayerGrid, spec: QuantSpec, size, bias, multiplier) -> None:
        super().__init__()
        self.weight = dequantize(quantize(r.weight, r.scale, r.zero, spec, size), r.scale, r.zero, size)
        self.bias, self.multiplier = bias, multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.multiplier is not None:
            x = x * self.multiplier.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
