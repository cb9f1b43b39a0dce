"""End-to-end training of the quantization step sizes (EfficientQAT's E2E-QP, Chen et al. 2024).

After the codes step every quantized layer stores integer codes q, zero points z and one scale s per
block: W = (q - z) * s. Block-wise reconstruction fits each decoder block on its own; E2E-QP then
trains only the scales of all layers together against the whole model's output, with the codes and
zero points fixed: the blocks can correct one another, and the trained parameters are one per group
(1/32 of the weights at group 32), not the weights. The loss is distillation from the float model (KL
at every position, as QAT's ``kd``; the float model is a copy kept for the step) or next-token
cross-entropy on the calibration text. The trained scales are stored in the layer's scale dtype, so
the exported layer is the same packed QuantLinear, with the same bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import train
from pipeline.layers import set_module
from pipeline.quant.linear import QuantLinear
from pipeline.quant.primitives import expand_blocks

log = logging.getLogger(__name__)
OPTION_KEYS = ("steps", "batch_size", "lr", "warmup_fraction", "max_grad_norm", "loss")
LOSSES = ("kd", "ce")


def check_options(options: Mapping) -> None:
    """``method.e2e``, checked before any model loads."""
    unknown, missing = set(options) - set(OPTION_KEYS), set(OPTION_KEYS) - set(options)
    if unknown or missing:
        raise ValueError(
            f"method.e2e takes {', '.join(OPTION_KEYS)}; unknown: {sorted(unknown) or 'none'}, "
            f"missing: {sorted(missing) or 'none'}"
        )
    for key in ("steps", "batch_size"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"method.e2e.{key} must be a positive integer, got {value!r}")
    for key in ("lr", "max_grad_norm"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"method.e2e.{key} must be a positive number, got {value!r}")
    if not 0 <= float(options["warmup_fraction"]) < 1:
        raise ValueError(f"method.e2e.warmup_fraction must be in [0, 1), got {options['warmup_fraction']!r}")
    if options["loss"] not in LOSSES:
        raise ValueError(f"method.e2e.loss must be one of {', '.join(LOSSES)}, got {options['loss']!r}")


def check_in_method(method: Mapping) -> None:
    """Step sizes train on weight-only layers: an activation grid would need its own straight-through path."""
    if method.get("activations"):
        raise ValueError("method.e2e trains the weight scales of weight-only layers; set method.activations=null")


class StepSizeLinear(nn.Module):
    """A QuantLinear with its codes and zero points fixed and its scales trainable: W = (q - z) * s
    (plus its low-rank term and explicit input scale, as ``QuantLinear.effective_weight``)."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        self.layer = layer  # written back by ``store``
        zero = layer.zero_points()
        centered = layer.codes().float()
        if zero is not None:
            centered = centered - expand_blocks(zero.float(), layer.block_size)
        self.register_buffer("centered", centered)
        self.scale = nn.Parameter(layer.scale.float().clone())
        self._tiny = torch.finfo(layer.scale.dtype).tiny  # a scale the stored dtype can still hold

    def weight(self) -> torch.Tensor:
        w = self.centered * expand_blocks(self.scale.clamp_min(self._tiny), self.layer.block_size)
        if self.layer.lowrank_a is not None:
            w = w + self.layer.lowrank_a.float() @ self.layer.lowrank_b.float()
        if self.layer.input_scale is not None:
            w = w * self.layer.input_scale.float()
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.layer.bias
        return F.linear(x, self.weight().to(x.dtype), None if bias is None else bias.to(x.dtype))

    @torch.no_grad()
    def store(self) -> float:
        """Write the trained scales into the layer (its scale dtype); returns their mean relative change."""
        old = self.layer.scale.float()
        new = self.scale.clamp_min(self._tiny).to(self.layer.scale.dtype)
        self.layer.set_scale(new)
        return float(((new.float() - old).abs() / old.abs().clamp_min(self._tiny)).mean())


def train_step_sizes(
    model: nn.Module,
    teacher: nn.Module | None,
    batches: torch.Tensor,
    options: Mapping,
    seed: int,
    log_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train the scales of every QuantLinear of ``model`` end to end; ``teacher`` (the float model)
    for ``loss: kd``. The layers stay QuantLinears with new scales; returns the step's metrics."""
    check_options(options)
    if options["loss"] == "kd" and teacher is None:
        raise ValueError("method.e2e.loss=kd distills from the float model, but no teacher was kept")
    start = time.perf_counter()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("method.e2e found no quantized layer to train: it runs after the codes step")
    refused = [name for name, m in layers.items() if m.activation is not None]
    if refused:
        raise ValueError(f"method.e2e trains weight-only layers; {refused[0]} quantizes its activations")
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    trained = {name: StepSizeLinear(layer) for name, layer in layers.items()}
    for name, wrapper in trained.items():
        set_module(model, name, wrapper)
    scales = [w.scale for w in trained.values()]

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        if options["loss"] == "ce":
            return model(input_ids=ids, labels=ids, use_cache=False).loss
        with torch.no_grad():
            target = teacher(input_ids=ids, use_cache=False).logits
        return train.distillation_loss(model(input_ids=ids, use_cache=False).logits, target)

    try:
        groups = [{"params": scales, "lr": float(options["lr"])}]
        label = "e2e: training the step sizes"
        losses = train.optimize(model, groups, batches, options, seed, loss_of, label, log_step, prefix="e2e_")
        changes = [wrapper.store() for wrapper in trained.values()]  # only once training finished
    finally:  # the layers go back, with the trained scales if training finished, as they were if not
        for name, wrapper in trained.items():
            set_module(model, name, wrapper.layer)
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    log.info("e2e: %d steps, loss %.4f -> %.4f", len(losses), losses[0], losses[-1])
    return {
        "e2e_s": time.perf_counter() - start,
        "e2e_loss_first": losses[0],
        "e2e_loss_last": losses[-1],
        "e2e_scale_change": sum(changes) / len(changes),
    }
