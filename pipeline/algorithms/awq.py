"""Activation-aware weight quantization (AWQ, Lin et al. 2023), on our primitives.

Salient weights are the ones that meet large activations. Scaling input channel j of W by
s_j (and the input by 1/s_j) leaves the float layer unchanged but shrinks the relative rounding
error of the salient channels. Per group of layers that read the same input, we search
s = mean|x|^alpha over a grid of alpha in [0, 1) for the one that minimizes the group's output
error on calibration inputs (alpha = 0 is plain RTN, so the search never does worse than RTN
on that objective). Then, per layer, the clipping range of each quantization block is shrunk
where that lowers the layer's output error. The scale is folded into the preceding norm when a
norm produces the input; otherwise the layer keeps 1/s as an explicit, counted input scale.

Simplification vs the paper's code: the error is measured at the outputs of the group's linear
layers, not of their parent module (attention or MLP).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from pipeline.algorithms.sequential import LayerInputs, norm_producers
from pipeline.layers import float_weight, store_float_weight
from pipeline.quant.primitives import QuantSpec, block_size_for, fake_quantize

INPUT_SCALE_DTYPE = torch.float16  # an explicit (unfolded) input scale 1/s is stored in this dtype


def _output_error(gram: torch.Tensor, diff: torch.Tensor) -> float:
    """||X diff^T||^2 through the Gram matrix G = X^T X: sum over rows of d G d^T (exact, and
    cheaper than the outputs themselves once the calibration has more rows than features)."""
    return float(((diff @ gram) * diff).sum())


def search_scale(
    gram: torch.Tensor,
    channel_mean: torch.Tensor,
    weights: list[torch.Tensor],
    spec: QuantSpec,
    blocks: list[tuple[int, int]],
    grid: int,
) -> tuple[torch.Tensor, list[float]]:
    """Per-input-channel scale s for layers sharing one input; returns (s, error per alpha).

    ``gram`` is X^T X of the shared input, ``channel_mean`` its mean |x| per channel.
    """
    channel_mean = channel_mean.clamp_min(1e-6)
    candidates, errors = [], []
    for i in range(grid):
        s = channel_mean.pow(i / grid)
        s = s / (s.max() * s.min()).sqrt()  # keep scales centred around 1
        candidates.append(s)
        errors.append(
            sum(
                _output_error(gram, w - fake_quantize(w * s, spec, b) / s) for w, b in zip(weights, blocks, strict=True)
            )
        )
    return candidates[min(range(grid), key=errors.__getitem__)], errors


def search_clip(
    gram: torch.Tensor, w: torch.Tensor, spec: QuantSpec, block: tuple[int, int], grid: int, max_shrink: float
) -> torch.Tensor:
    """Clamp each quantization block of ``w`` to the shrunken range that minimizes output error.

    A block's rows and columns meet only the diagonal block of the Gram matrix that belongs to
    its columns, so each (row, group) is scored on its own.
    """
    rows, cols = w.shape
    block_rows, block_cols = block
    if block_rows != 1:  # per-tensor: one shared range; the per-row search does not apply
        return w
    n_groups = cols // block_cols
    wg = w.reshape(rows, n_groups, block_cols)
    gram_g = torch.stack(
        [gram[g * block_cols : (g + 1) * block_cols, g * block_cols : (g + 1) * block_cols] for g in range(n_groups)]
    )
    lo, hi = wg.amin(-1), wg.amax(-1)
    best_err = torch.full((rows, n_groups), float("inf"), device=w.device)
    best_ratio = torch.ones(rows, n_groups, device=w.device)
    for i in range(grid):
        ratio = 1 - max_shrink * i / grid
        diff = wg - fake_quantize(w, spec, block, min_val=lo * ratio, max_val=hi * ratio).reshape(rows, n_groups, -1)
        err = torch.einsum("rgk,gkl,rgl->rg", diff, gram_g, diff)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    limit_lo, limit_hi = (lo * best_ratio)[..., None], (hi * best_ratio)[..., None]
    return torch.maximum(torch.minimum(wg, limit_hi), limit_lo).reshape(rows, cols)


@torch.no_grad()
def scales_by_division(norm: nn.Module, s: torch.Tensor) -> bool:
    """Whether dividing the norm's weight (and bias) by s divides its output by s.

    A property of its formula, checked on a float32 copy: in the model's own dtype (bf16) the
    rounding of weight / s alone exceeds any tolerance that still tells y = x_hat * w from, e.g.,
    y = x_hat * (1 + w).
    """
    probe = torch.randn(4, s.numel(), generator=torch.Generator().manual_seed(0), device="cpu").to(s.device)
    trial = copy.deepcopy(norm).float()
    before = trial(probe)
    trial.weight.div_(s)
    if getattr(trial, "bias", None) is not None:
        trial.bias.div_(s)
    return torch.allclose(trial(probe) * s, before, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def fold_into_norm(norm: nn.Module, s: torch.Tensor) -> bool:
    """Divide an elementwise-affine norm's output by s; False (and unchanged) if it does not scale so."""
    if not scales_by_division(norm, s):
        return False  # e.g. a (1 + weight) norm: keep s explicit
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    return True


@torch.no_grad()
def apply_awq(
    block: nn.Module,
    block_name: str,
    inputs: Mapping[str, LayerInputs],
    spec: QuantSpec,
    granularity: str,
    group_size: int | None,
    options: Mapping,
) -> dict[str, tuple[torch.Tensor, bool]]:
    """Rescale (and clip) the float weights of one block in place.

    Returns, per layer, (s, folded): its input is now divided by s, either by the preceding norm
    (folded) or by an explicit input scale 1/s that the caller must store in the layer.
    """
    modules = dict(block.named_modules())
    groups: dict[str | None, list[str]] = {}
    for full, rec in inputs.items():
        groups.setdefault(rec.producer or f"#{full}", []).append(full)
    result = {}
    for producer, members in groups.items():
        shared = inputs[members[0]]  # members read the same tensor
        gram = shared.hessian.hessian.float()  # 2/n X^T X: the scale does not move the argmin
        layers = [modules[m.removeprefix(block_name + ".")] for m in members]
        weights = [float_weight(layer).float() for layer in layers]
        blocks = [block_size_for(w.shape, granularity, group_size) for w in weights]
        s, _ = search_scale(gram, shared.channel_abs_mean, weights, spec, blocks, int(options["grid"]))
        folded = not producer.startswith("#") and fold_into_norm(modules[producer], s)
        if not folded:
            s = 1 / (1 / s).to(INPUT_SCALE_DTYPE).float()  # the value the stored explicit scale has
        for member, layer, w, b in zip(members, layers, weights, blocks, strict=True):
            scaled = w * s
            if options["clip"]:
                gram_scaled = gram / s[:, None] / s[None, :]  # the Gram matrix of x / s
                scaled = search_clip(gram_scaled, scaled, spec, b, int(options["grid"]), float(options["max_shrink"]))
            store_float_weight(layer, scaled)
            result[member] = (s, folded)
    return result


@torch.no_grad()
def explicit_scale_layers(model: nn.Module, layer_names: list[str], ids: torch.Tensor) -> set[str]:
    """The layers whose AWQ scale will be stored as an explicit input scale: those whose input no
    norm produces, or whose norm cannot absorb a division (what ``apply_awq`` decides per block),
    found in one forward pass over ``ids`` (one sequence) before anything is quantized."""
    modules = dict(model.named_modules())
    producers = norm_producers(model, layer_names, ids)
    explicit = set()
    for name in layer_names:
        norm = modules.get(producers.get(name))
        weight = getattr(norm, "weight", None)
        if weight is None or not scales_by_division(norm, torch.linspace(0.5, 2.0, weight.numel()).to(weight.device)):
            explicit.add(name)
    return explicit
