"""Mixed precision: a bit width per layer under an average-bits budget, from measured sensitivities.

The sensitivity of layer l to width b is the second-order estimate of the loss increase that
rounding its weight to b bits causes, ``sum_ij F_ij (W_ij - Q_b(W)_ij)^2``, with F the diagonal
empirical Fisher of the next-token loss on calibration text (squared gradients, one sequence per
backward pass), as in SqueezeLLM's sensitivity-weighted quantization. Q_b is round to nearest on
the method's grid at width b: the method's own algorithm (GPTQ, AWQ) then does better at whatever
width it is given, so the estimate ranks layers rather than predicting their final error.

The budget is counted as ``bits_per_weight`` is: every stored byte of the quantized layers (packed
codes, scales, zero points, bias) over their weight count. The allocation minimises the summed
sensitivity under it, a multiple-choice knapsack: a Lagrangian relaxation (each layer takes the
width minimising sensitivity + lambda * bytes, lambda bisected to the budget), then the upgrades
that still fit, best sensitivity saved per byte first. The result is a list of ordinary
``method.layer_overrides`` entries, so a chosen allocation is reproducible as a config.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from pipeline.device import module_device
from pipeline.progress import progress
from pipeline.quant.packing import packed_numel
from pipeline.quant.primitives import QuantSpec, block_size_for, fake_quantize

OPTION_KEYS = {"budget_bits", "candidates", "samples"}


def check_option_keys(options: Mapping) -> None:
    unknown, missing = set(options) - OPTION_KEYS, OPTION_KEYS - set(options)
    if unknown or missing:
        raise ValueError(
            f"method.allocate takes {', '.join(sorted(OPTION_KEYS))}; unknown: {sorted(unknown) or 'none'}, "
            f"missing: {sorted(missing) or 'none'}"
        )


def check_options(options: Mapping, method_bits: int) -> None:
    """``method.allocate``: ``budget_bits`` (average stored bits per weight), ``candidates`` (widths to
    choose from) and ``samples`` (calibration sequences for the Fisher), checked before any work."""
    check_option_keys(options)
    candidates = options["candidates"]
    if not isinstance(candidates, list | tuple) or len(candidates) < 2:
        raise ValueError(f"method.allocate.candidates must list at least two widths, got {candidates!r}")
    if any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8 for b in candidates):
        raise ValueError(f"method.allocate.candidates must be widths in 2..8, got {candidates!r}")
    if method_bits not in candidates:
        raise ValueError(f"method.bits={method_bits} (the default width) must be in allocate.candidates {candidates}")
    budget = options["budget_bits"]
    if isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0:
        raise ValueError(f"method.allocate.budget_bits must be a positive number of bits per weight, got {budget!r}")
    if isinstance(options["samples"], bool) or not isinstance(options["samples"], int) or options["samples"] < 1:
        raise ValueError(f"method.allocate.samples must be a positive integer, got {options['samples']!r}")


def stored_bytes(shape: tuple[int, int], spec: QuantSpec, block: tuple[int, int], bias: bool) -> int:
    """Bytes a QuantLinear stores for this weight (``QuantLinear.weight_bytes``): packed codes, one scale
    per block, one zero point per block (packed at the weight's width when integer), a float32 bias."""
    rows, cols = shape
    blocks = (rows // block[0]) * (cols // block[1])
    scale_bytes = torch.finfo(spec.scale_dtype).bits // 8
    zero = 0
    if not spec.symmetric:
        zero = packed_numel(blocks, spec.bits) if spec.zero_point_domain == "int" else blocks * scale_bytes
    return packed_numel(rows * cols, spec.bits) + blocks * scale_bytes + zero + (4 * rows if bias else 0)


def fisher_diagonal(
    model: nn.Module, layers: Mapping[str, nn.Module], batches: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Sum over calibration sequences of the squared gradient of the next-token loss with respect to
    each layer's weight (one sequence per backward pass: per-sample squares, not a batch's)."""
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {name: module.weight for name, module in layers.items()}
    fisher = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    device, training = module_device(model), model.training
    model.eval()
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for ids in progress(batches, "allocate: Fisher (one sequence per pass)", "sequence"):
            ids = ids.unsqueeze(0).to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
            grads = torch.autograd.grad(loss, list(weights.values()))
            for name, grad in zip(weights, grads, strict=True):
                fisher[name] += grad.float().square()
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(training)
    return fisher


def sensitivity(weight: torch.Tensor, fisher: torch.Tensor, spec: QuantSpec, block: tuple[int, int]) -> float:
    """``sum F (W - Q(W))^2``: the loss increase rounding ``weight`` on ``spec``'s grid costs, to second order."""
    w = weight.detach().float()
    return float((fisher * (w - fake_quantize(w, spec, block)).square()).sum())


@dataclass(frozen=True)
class LayerChoice:
    """One layer's candidates: bytes and sensitivity per width, and its weight count."""

    name: str
    numel: int
    bytes_by_bits: dict[int, int]
    sensitivity_by_bits: dict[int, float]


def allocate(layers: list[LayerChoice], budget_bits: float) -> dict[str, int]:
    """The width per layer minimising summed sensitivity with total stored bits <= budget_bits per weight."""
    capacity = budget_bits * sum(layer.numel for layer in layers) / 8
    narrowest = {layer.name: min(layer.bytes_by_bits, key=layer.bytes_by_bits.get) for layer in layers}
    least = sum(layer.bytes_by_bits[narrowest[layer.name]] for layer in layers)
    if least > capacity:
        lowest = 8 * least / sum(layer.numel for layer in layers)
        raise ValueError(
            f"method.allocate.budget_bits={budget_bits} is below what the narrowest candidate stores "
            f"({lowest:.3f} bits per weight with scales and zero points); raise it or add a narrower width"
        )

    def choose(lam: float) -> dict[str, int]:
        return {
            layer.name: min(
                layer.bytes_by_bits, key=lambda b, x=layer: (x.sensitivity_by_bits[b] + lam * x.bytes_by_bits[b], b)
            )
            for layer in layers
        }

    def total(choice: Mapping[str, int]) -> int:
        return sum(layer.bytes_by_bits[choice[layer.name]] for layer in layers)

    low, high = 0.0, 1.0
    while total(choose(high)) > capacity:  # a price on bytes high enough to fit
        high *= 2
        if high > 1e30:
            break
    choice = choose(high)
    if total(choose(low)) <= capacity:
        choice = choose(low)
    else:
        for _ in range(100):
            mid = (low + high) / 2
            if total(choose(mid)) <= capacity:
                high = mid
            else:
                low = mid
        choice = choose(high)
    if total(choice) > capacity:  # the bisection did not reach a fit (ties): start from the narrowest
        choice = dict(narrowest)
    return _top_up(layers, choice, capacity - total(choice))


def _top_up(layers: list[LayerChoice], choice: dict[str, int], spare: float) -> dict[str, int]:
    """Spend what the relaxation left: the affordable upgrade saving the most sensitivity per byte, repeatedly."""
    by_name = {layer.name: layer for layer in layers}
    while True:
        best, best_gain = None, 0.0
        for name, bits in choice.items():
            layer = by_name[name]
            for wider in layer.bytes_by_bits:
                extra = layer.bytes_by_bits[wider] - layer.bytes_by_bits[bits]
                saved = layer.sensitivity_by_bits[bits] - layer.sensitivity_by_bits[wider]
                if 0 < extra <= spare and saved > 0 and saved / extra > best_gain:
                    best, best_gain = (name, wider, extra), saved / extra
        if best is None:
            return choice
        name, wider, extra = best
        choice[name], spare = wider, spare - extra


def measure(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: torch.Tensor,
    spec: QuantSpec,
    granularity: str,
    group_size: int | None,
    candidates: list[int],
    input_scale_bytes: Mapping[str, int] | None = None,
) -> list[LayerChoice]:
    """Each layer's stored bytes and Fisher-weighted rounding error at every candidate width.

    ``input_scale_bytes``: bytes a later step will store beside a layer's weight at any width (AWQ's
    explicit input scales), counted in every width's bytes so that the budget holds what is stored.
    """
    fisher = fisher_diagonal(model, layers, batches)
    input_scale_bytes = input_scale_bytes or {}
    choices = []
    for name, module in layers.items():
        weight = module.weight.detach()
        if isinstance(module, Conv1D):  # stored (in, out): rounded as (out, in), the Fisher with it
            weight, fisher[name] = weight.t(), fisher[name].t()
        block = block_size_for(tuple(weight.shape), granularity, group_size)
        bias = getattr(module, "bias", None) is not None
        specs = {b: dataclasses.replace(spec, bits=b) for b in candidates}
        layer_fisher = fisher.pop(name)  # freed layer by layer
        choices.append(
            LayerChoice(
                name,
                weight.numel(),
                {
                    b: stored_bytes(tuple(weight.shape), s, block, bias) + input_scale_bytes.get(name, 0)
                    for b, s in specs.items()
                },
                {b: sensitivity(weight, layer_fisher, s, block) for b, s in specs.items()},
            )
        )
    return choices


def as_overrides(choice: Mapping[str, int], default_bits: int) -> list[dict]:
    """``method.layer_overrides`` entries for the layers whose width differs from ``default_bits``."""
    return [{"pattern": re.escape(name), "bits": bits} for name, bits in choice.items() if bits != default_bits]


def average_bits(layers: list[LayerChoice], choice: Mapping[str, int]) -> float:
    stored = sum(layer.bytes_by_bits[choice[layer.name]] for layer in layers)
    return 8 * stored / sum(layer.numel for layer in layers) if layers else math.nan
