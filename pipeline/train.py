"""Train stage (QAT only): fake quantization with a straight-through estimator, then real packing.

``prepare`` swaps the selected linear layers for ``FakeQuantLinear``: the forward pass uses the
weight rounded to the method's grid, the backward pass treats rounding as identity (STE) and
clipping as a hard cut. With ``learnable_scale`` the per-block scales are parameters trained with
LSQ's gradient scaling (Esser et al. 2020); otherwise they follow the weights' min-max every step.
``fit`` trains only those layers (weights and scales) with AdamW, warm-up + cosine schedule and
gradient clipping, on next-token cross-entropy or on distillation from the float model (``kd``,
as LLM-QAT does: a few hundred CPU steps cannot teach a new domain, but can teach the quantized
model to imitate the reference). ``convert`` turns the result into ordinary packed QuantLinears.

The distillation teacher is the student itself with its original float weights (``float_teacher``):
each FakeQuantLinear keeps the weight it was made from (the loaded tensor, no copy), and every other
module is frozen and shared, so the teacher's outputs are exactly the float model's without a second
model in memory.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from pipeline.device import module_device
from pipeline.progress import progress
from pipeline.quant.primitives import QuantSpec, block_size_for, choose_qparams, fake_quantize_ste, quantize

log = logging.getLogger(__name__)
LOSSES = ("ce", "kd")


@dataclass(frozen=True)
class FixedGrid:
    """A layer's quantization grid fixed before its codes are chosen (QAT's trained scales): the
    ``rtn`` codes step rounds the layer's weight onto it instead of choosing its own."""

    spec: QuantSpec
    block_size: tuple[int, int]
    scale: torch.Tensor
    zero: torch.Tensor | None


class FakeQuantLinear(nn.Module):
    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: QuantSpec,
        block_size: tuple[int, int],
        learnable_scale: bool,
    ) -> None:
        super().__init__()
        self.spec, self.block_size, self.learnable_scale = spec, block_size, learnable_scale
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().float().clone())
        # the weight as loaded (not a copy), for the float teacher; not saved with the layer
        self.register_buffer("teacher_weight", weight.detach(), persistent=False)
        self.as_float = False  # True inside ``float_teacher``
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        scale, zero = choose_qparams(self.weight.detach(), spec, block_size)
        self.scale = nn.Parameter(scale.float(), requires_grad=learnable_scale)
        self.register_buffer("zero", None if zero is None else zero.float())
        # LSQ: scale gradients by 1/sqrt(elements per block * qmax) so scales learn at the weights' pace.
        self._grad_scale = 1 / math.sqrt(block_size[0] * block_size[1] * spec.qmax)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.learnable_scale:
            s = self.scale.clamp_min(1e-8)
            return (s - s * self._grad_scale).detach() + s * self._grad_scale, self.zero
        scale, zero = choose_qparams(self.weight.detach(), self.spec, self.block_size)
        return scale.float(), None if zero is None else zero.float()

    def fake_weight(self) -> torch.Tensor:
        scale, zero = self.qparams()
        return fake_quantize_ste(self.weight, scale, zero, self.spec, self.block_size)

    def fixed_grid(self) -> FixedGrid:
        """The trained grid the codes step rounds this layer onto."""
        return trained_grid(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.teacher_weight if self.as_float else self.fake_weight()
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@contextmanager
def float_teacher(model: nn.Module, fakes: Mapping[str, FakeQuantLinear]) -> Iterator[nn.Module]:
    """``model`` as the float model it was before ``prepare``: its fake-quantized layers compute with
    their original weights, in eval mode (as a loaded model is) and without gradients."""
    training = model.training
    model.eval()
    for fake in fakes.values():
        fake.as_float = True
    try:
        with torch.no_grad():
            yield model
    finally:
        for fake in fakes.values():
            fake.as_float = False
        model.train(training)


def prepare(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    method: Mapping,
    learnable_scale: bool,
    weight_of: Callable[[nn.Module], torch.Tensor],
    spec: QuantSpec,
) -> dict[str, FakeQuantLinear]:
    """Swap ``layers`` (name -> module) for fake-quantized copies; freeze everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    fakes = {}
    for name, module in layers.items():
        weight = weight_of(module)  # as loaded: the FakeQuantLinear trains a float32 copy and keeps this one
        block = block_size_for(weight.shape, method["granularity"], method["group_size"])
        fakes[name] = FakeQuantLinear(weight, getattr(module, "bias", None), spec, block, learnable_scale)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, fakes[name])
    return fakes


def check_options(options: Mapping) -> None:
    if int(options["steps"]) <= 0:
        raise ValueError(f"QAT needs method.train.steps > 0, got {options['steps']}")
    if options["loss"] not in LOSSES:
        raise ValueError(f"method.train.loss must be one of {', '.join(LOSSES)}, got {options['loss']!r}")
    if float(options["lr"]) <= 0:
        raise ValueError(f"method.train.lr must be positive, got {options['lr']}")


def fit(
    model: nn.Module,
    fakes: Mapping[str, FakeQuantLinear],
    batches: torch.Tensor,
    options: Mapping,
    seed: int,
    log_step: Callable[[int, dict[str, float]], None] | None = None,
) -> list[float]:
    """Train the fake-quantized layers; returns the loss per step (``kd``: from ``float_teacher``)."""
    check_options(options)
    weights = [f.weight for f in fakes.values()]
    scales = [f.scale for f in fakes.values() if f.learnable_scale]
    groups = [{"params": weights, "lr": float(options["lr"])}]
    if scales:
        groups.append({"params": scales, "lr": float(options["lr"]) * float(options["scale_lr_multiplier"])})
    losses = optimize(
        model,
        groups,
        batches,
        options,
        seed,
        lambda ids: loss_on(model, ids, options["loss"], fakes),
        label="QAT: training steps",
        log_step=log_step,
    )
    log.info("QAT: %d steps, loss %.4f -> %.4f", len(losses), losses[0], losses[-1])
    return losses


def optimize(
    model: nn.Module,
    groups: list[dict],
    batches: torch.Tensor,
    options: Mapping,
    seed: int,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    label: str,
    log_step: Callable[[int, dict[str, float]], None] | None = None,
    prefix: str = "",
) -> list[float]:
    """The training loop QAT and e2e share: AdamW over ``groups`` (``options.weight_decay``, default
    0), warm-up + cosine schedule, gradient clipping at ``options.max_grad_norm``, ``options.steps``
    steps of ``options.batch_size`` sequences drawn (seeded) from ``batches``; ``loss_of(ids)`` is
    the loss. Per step, ``log_step`` gets ``<prefix>train_loss``-style metrics. Returns the losses."""
    steps, batch_size = int(options["steps"]), int(options["batch_size"])
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=float(options.get("weight_decay", 0.0)))
    warmup = round(steps * float(options["warmup_fraction"]))
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    generator = torch.Generator().manual_seed(seed)
    device = module_device(model)
    model.train()
    losses = []
    try:
        bar = progress(range(steps), label, "step")
        for step in bar:
            start = time.perf_counter()
            picked = torch.randint(0, batches.shape[0], (batch_size,), generator=generator, device="cpu")
            loss = loss_of(batches[picked].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, float(options["max_grad_norm"]))
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            if log_step is not None:
                log_step(
                    step,
                    {
                        f"{prefix}train_loss": losses[-1],
                        f"{prefix}lr": schedule.get_last_lr()[0],
                        f"{prefix}grad_norm": float(grad_norm),
                        f"{prefix}step_s": time.perf_counter() - start,
                    },
                )
    finally:
        model.eval()
    return losses


def loss_on(
    model: nn.Module, ids: torch.Tensor, kind: str, fakes: Mapping[str, FakeQuantLinear] | None = None
) -> torch.Tensor:
    """Next-token cross-entropy, or KL(float model || model) over the vocabulary at every position (the
    float model: ``model`` with its ``fakes`` computing in float, ``float_teacher``)."""
    if kind == "ce":
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    with float_teacher(model, fakes or {}) as teacher:
        target = teacher(input_ids=ids, use_cache=False).logits
    return distillation_loss(model(input_ids=ids, use_cache=False).logits, target)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the vocabulary, averaged over positions."""
    target = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, 1)
    logprobs = F.log_softmax(logits.float(), dim=-1).flatten(0, 1)
    return F.kl_div(logprobs, target, log_target=True, reduction="batchmean")


@torch.no_grad()
def trained_grid(fake: FakeQuantLinear) -> FixedGrid:
    """A trained layer's grid (its scales and zero points in the method's storage dtypes)."""
    scale, zero = fake.qparams()
    scale = scale.to(fake.spec.scale_dtype)
    if zero is not None:
        zero = zero.round().to(torch.uint8) if fake.spec.zero_point_domain == "int" else zero.to(fake.spec.scale_dtype)
    return FixedGrid(fake.spec, fake.block_size, scale, zero)


@torch.no_grad()
def converted(fake: FakeQuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes, scale, zero) of a trained layer, in the method's storage dtypes."""
    grid = trained_grid(fake)
    return quantize(fake.weight, grid.scale, grid.zero, fake.spec, fake.block_size), grid.scale, grid.zero
