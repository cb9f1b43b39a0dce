"""Calibrate stage: run calibration text through the model and record each layer's inputs.

For every selected layer we keep the exact min and max of its inputs and a seeded uniform
subsample of input values, from which the observers below derive a static activation range
(min, max) (activation-aware methods record their own statistics block by block, in
pipeline/algorithms/sequential.py). For a symmetric spec the range is symmetric about 0:

- minmax:     the exact (min, max); symmetric: (-max |x|, max |x|).
- percentile: the (100 - p, p) percentiles of x (clips rare outliers); symmetric: ± the p-th of |x|.
- mse:        the range (min, max) * f, f on a grid in [0.3, 1], whose round trip of the sampled
              values has the least squared error (the same f shrinks both ends, as llm-compressor's
              MSE observer does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.device import module_device
from pipeline.progress import progress
from pipeline.quant.primitives import QuantSpec, dequantize, qparams_from_range, quantize

log = logging.getLogger(__name__)

OBSERVERS = ("minmax", "percentile", "mse")
SAMPLES_PER_BATCH = 4096


@dataclass
class ActivationStats:
    # Running extremes of the inputs; both start at 0, which every integer-zero grid keeps anyway.
    min_val: float = 0.0
    max_val: float = 0.0
    samples: list[torch.Tensor] = field(default_factory=list)
    device: str = "cpu"  # of the activations seen: the qparams are made there

    @property
    def absmax(self) -> float:
        return max(-self.min_val, self.max_val)

    def update(self, x: torch.Tensor, generator: torch.Generator) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        self.device = str(x.device)
        self.min_val = min(self.min_val, float(x.min()))
        self.max_val = max(self.max_val, float(x.max()))
        flat = x.reshape(-1)
        # drawn by a CPU generator on every device: the same positions wherever the model runs
        count = min(SAMPLES_PER_BATCH, flat.numel())
        idx = torch.randint(0, flat.numel(), (count,), generator=generator, device="cpu").to(flat.device)
        self.samples.append(flat[idx])


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module, layer_names: list[str], batches: torch.Tensor, seed: int, batch_size: int = 8
) -> dict[str, ActivationStats]:
    """Run ``batches`` (num_samples, seq_len) through ``model`` and record each layer's inputs."""
    modules = dict(model.named_modules())
    stats = {name: ActivationStats() for name in layer_names}
    generator = torch.Generator().manual_seed(seed)
    device = module_device(model)
    hooks = [
        modules[name].register_forward_pre_hook(lambda _m, args, n=name: stats[n].update(args[0], generator))
        for name in layer_names
    ]
    try:
        starts = range(0, batches.shape[0], batch_size)
        for start in progress(starts, f"calibrate: batches of {batch_size} sequences", "batch"):
            model(input_ids=batches[start : start + batch_size].to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def observe_range(
    stats: ActivationStats, spec: QuantSpec, observer: str, percentile: float = 99.99
) -> tuple[float, float]:
    """The range (min, max) that ``observer`` picks for ``spec`` (symmetric about 0 for a symmetric spec)."""
    if observer not in OBSERVERS:
        raise ValueError(f"unknown observer {observer!r}; allowed: {', '.join(OBSERVERS)}")
    if observer == "minmax":
        return (-stats.absmax, stats.absmax) if spec.symmetric else (stats.min_val, stats.max_val)
    values = torch.cat(stats.samples)
    if observer == "percentile":
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if spec.symmetric:
            clip = _kth_smallest(values.abs(), percentile)
            return -clip, clip
        return _kth_smallest(values, 100 - percentile), _kth_smallest(values, percentile)
    # mse: the shrink factor whose range minimizes the round-trip error of the sampled values.
    x = values.reshape(1, -1)
    lo, hi = (-stats.absmax, stats.absmax) if spec.symmetric else (stats.min_val, stats.max_val)
    best, best_err = (lo, hi), float("inf")
    for fraction in torch.linspace(0.3, 1.0, 36, device="cpu").tolist():
        scale, zero = qparams_from_range(_cell(lo * fraction, x.device), _cell(hi * fraction, x.device), spec)
        err = float((dequantize(quantize(x, scale, zero, spec, x.shape), scale, zero, x.shape) - x).pow(2).mean())
        if err < best_err:
            best, best_err = (lo * fraction, hi * fraction), err
    return best


def _kth_smallest(values: torch.Tensor, percentile: float) -> float:
    """The ``percentile``-th percentile of ``values`` (nearest rank, at least the smallest value)."""
    k = max(1, round(values.numel() * percentile / 100))
    return float(values.kthvalue(k).values)


def activation_qparams(
    stats: ActivationStats, spec: QuantSpec, observer: str, percentile: float = 99.99
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Static per-tensor (scale, zero point) of shape (1, 1) from the observed range; zero is None
    for a symmetric spec."""
    lo, hi = observe_range(stats, spec, observer, percentile)
    return qparams_from_range(_cell(lo, stats.device), _cell(hi, stats.device), spec)


def _cell(value: float, device: torch.device) -> torch.Tensor:
    return torch.tensor([[value]], device=device)
