"""Calibrate stage: run calibration text through the model and record each layer's inputs.

For every selected layer we keep the exact max |x| and a seeded uniform subsample of input
values, from which the observers below derive a static activation range (activation-aware
methods record their own statistics block by block, in pipeline/algorithms/sequential.py):

- minmax:     the exact max |x|.
- percentile: the given percentile of |x| (clips rare outliers).
- mse:        the clipping value, among a grid up to max |x|, that minimizes the quantization MSE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.quant.primitives import QuantSpec, choose_qparams, dequantize, quantize

log = logging.getLogger(__name__)

OBSERVERS = ("minmax", "percentile", "mse")
SAMPLES_PER_BATCH = 4096


@dataclass
class ActivationStats:
    absmax: float = 0.0
    samples: list[torch.Tensor] = field(default_factory=list)

    def update(self, x: torch.Tensor, generator: torch.Generator) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        self.absmax = max(self.absmax, float(x.abs().max()))
        flat = x.reshape(-1)
        idx = torch.randint(0, flat.numel(), (min(SAMPLES_PER_BATCH, flat.numel()),), generator=generator)
        self.samples.append(flat[idx])


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module, layer_names: list[str], batches: torch.Tensor, seed: int, batch_size: int = 8
) -> dict[str, ActivationStats]:
    """Run ``batches`` (num_samples, seq_len) through ``model`` and record each layer's inputs."""
    modules = dict(model.named_modules())
    stats = {name: ActivationStats() for name in layer_names}
    generator = torch.Generator().manual_seed(seed)
    hooks = [
        modules[name].register_forward_pre_hook(lambda _m, args, n=name: stats[n].update(args[0], generator))
        for name in layer_names
    ]
    try:
        for start in range(0, batches.shape[0], batch_size):
            model(input_ids=batches[start : start + batch_size], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def observe_range(stats: ActivationStats, spec: QuantSpec, observer: str, percentile: float = 99.99) -> float:
    """The clipping value (max |x| to represent) that ``observer`` picks for a symmetric range."""
    if observer not in OBSERVERS:
        raise ValueError(f"unknown observer {observer!r}; allowed: {', '.join(OBSERVERS)}")
    if observer == "minmax":
        return stats.absmax
    values = torch.cat(stats.samples).abs()
    if observer == "percentile":
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        k = max(1, round(values.numel() * percentile / 100))
        return float(values.kthvalue(k).values)
    # mse: the clip that minimizes the round-trip error of the sampled values.
    x = torch.cat(stats.samples).reshape(1, -1)
    best, best_err = stats.absmax, float("inf")
    for fraction in torch.linspace(0.3, 1.0, 36).tolist():
        clip = torch.tensor([[stats.absmax * fraction]])
        scale, zero = choose_qparams(x, spec, x.shape, min_val=-clip, max_val=clip)
        err = float((dequantize(quantize(x, scale, zero, spec, x.shape), scale, zero, x.shape) - x).pow(2).mean())
        if err < best_err:
            best, best_err = float(clip), err
    return best
