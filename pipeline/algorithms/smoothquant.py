"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights before W8A8.

Per input channel j of a linear layer, s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha); the input is
divided by s and the weight's column j multiplied by s_j, so the float output is unchanged while
the activation's per-channel range flattens (per-tensor int8 then wastes fewer levels on outliers).
The division is folded into whatever produces X, exactly:

- an RMSNorm/LayerNorm (q/k/v after input_layernorm, gate/up after post_attention_layernorm):
  its weight (and bias) divided by s (``awq.fold_into_norm``, which checks the norm scales so);
- up_proj's output rows, for down_proj: down reads act(gate(x)) * up(x), linear in up's output;
- v_proj's output rows, for o_proj: attention mixes v linearly per head. With grouped-query
  attention the query heads that share one kv head share its scale (the max over them).

Layers that read one tensor (q, k, v; gate, up) share one s (the max of their column maxima); every
linear layer reading a smoothed tensor is rescaled, selected or not, so the float model is unchanged.
A norm that does not scale its output by its weight (e.g. Gemma's 1 + w) keeps an explicit input
multiplier 1/s on each of its readers (``QuantLinear.input_scale``, stored in fp16 and counted).
On Llama-architecture models (SmolLM2 included) every fold is exact and none remains explicit.
A layer whose producer is none of the above is refused with a ValueError, not skipped.

``method.smooth.alpha: search`` picks alpha from ``ALPHA_GRID`` by the summed relative output error
of every smoothed layer, with weights and activations quantized as the method will quantize them
(static ranges by the method's observer), on a seeded sample of calibration rows: one forward pass
in all, the candidates scored on the recorded rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.algorithms.awq import fold_into_norm
from pipeline.algorithms.sequential import decoder_blocks
from pipeline.calibrate import ActivationStats, activation_qparams
from pipeline.device import module_device
from pipeline.quant.activation import ActivationQuant, quantize_activation
from pipeline.quant.primitives import QuantSpec, block_size_for, dequantize, fake_quantize

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.5
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
SEARCH_ROWS_PER_BATCH = 64  # calibration rows kept per layer and batch to score alpha candidates
OBSERVER_SAMPLES = 16384  # values the static observer sees per candidate (calibrate draws 4096 per batch)
_EPS = 1e-5  # floor of both maxima, as the paper's code: a dead channel gets a finite scale
_UNSUPPORTED = ("awq", "train", "gptq")  # steps that calibrate or train on the model as they find it


# -- config ----------------------------------------------------------------------------------
def check_alpha(alpha: object) -> float | str:
    """A migration strength in [0, 1] or ``"search"``; anything else is a ValueError."""
    if alpha == "search":
        return "search"
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"method.smooth.alpha must be a number in [0, 1] or 'search', got {alpha!r}")
    return float(alpha)


def check_options(smooth: Mapping) -> float | str:
    """``method.smooth`` on its own: its alpha."""
    if set(smooth) - {"alpha"}:
        raise ValueError(f"method.smooth takes only 'alpha' (a number in [0, 1] or 'search'), got {smooth!r}")
    return check_alpha(smooth.get("alpha", DEFAULT_ALPHA))


def check_in_method(method: Mapping) -> None:
    """The smooth step within its method: it needs activation quantization and runs only before
    round-to-nearest-style steps (the others calibrate or train on the model as they find it)."""
    if not method.get("activations"):
        raise ValueError(
            "method.smooth migrates activation outliers into the weights: it needs method.activations "
            "(weight-only methods gain nothing from it)"
        )
    clashing = [name for name in method["steps"] if name in _UNSUPPORTED]
    if clashing:
        raise ValueError(
            f"method.smooth runs before round-to-nearest-style steps (rtn, hqq, lowrank); it is not "
            f"combined with {', '.join(clashing)}"
        )


# -- statistics ------------------------------------------------------------------------------
@dataclass
class InputStats:
    """What one linear layer read during the calibration pass (float32, per input channel)."""

    channel_min: torch.Tensor | None = None
    channel_max: torch.Tensor | None = None
    rows: list[torch.Tensor] = field(default_factory=list)  # sampled rows, for the alpha search
    producer: str | None = None  # the norm whose output it reads, if a norm produced it

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(-self.channel_min, self.channel_max)

    def update(self, x: torch.Tensor, keep_rows: int, generator: torch.Generator) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        low, high = rows.amin(0), rows.amax(0)
        self.channel_min = low if self.channel_min is None else torch.minimum(self.channel_min, low)
        self.channel_max = high if self.channel_max is None else torch.maximum(self.channel_max, high)
        if keep_rows:
            picked = torch.randint(0, rows.shape[0], (min(keep_rows, rows.shape[0]),), generator=generator)
            self.rows.append(rows[picked.to(rows.device)].cpu())


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(hasattr(module, key) for key in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _is_attention(module: nn.Module) -> bool:
    return all(hasattr(module, key) for key in ("v_proj", "o_proj", "head_dim", "num_key_value_groups"))


@torch.no_grad()
def collect_input_stats(
    model: nn.Module, batches: torch.Tensor, seed: int, keep_rows: int = 0, batch_size: int = 8
) -> tuple[dict[str, InputStats], set[str]]:
    """One pass of ``batches`` through the float model: per-channel extremes of every decoder-block
    linear layer's input, the norm that produced it, and (``keep_rows`` per batch) sampled rows.

    Also returns the gated MLPs whose down_proj input was seen to equal act(gate) * up (the
    structure the up_proj fold relies on), checked on the first batch.
    """
    prefix, _ = decoder_blocks(model)
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n.startswith(prefix + ".")]
    stats = {name: InputStats() for name in linears}
    generator = torch.Generator().manual_seed(seed)
    produced_by: dict[int, tuple[str, torch.Tensor]] = {}  # outputs held so that their ids stay unique
    mlp_outputs: dict[str, dict[str, torch.Tensor]] = {}
    verified_mlps: set[str] = set()
    first_batch = True

    def record(name: str, x: torch.Tensor) -> None:
        if id(x) in produced_by:
            stats[name].producer = produced_by[id(x)][0]
        stats[name].update(x, keep_rows, generator)

    def check_mlp(mlp_name: str, x: torch.Tensor) -> None:
        seen = mlp_outputs.pop(mlp_name, {})
        if first_batch and {"gate_proj", "up_proj"} <= set(seen):
            expected = modules[mlp_name].act_fn(seen["gate_proj"]) * seen["up_proj"]
            if torch.allclose(expected.float(), x.float(), rtol=1e-3, atol=1e-5):
                verified_mlps.add(mlp_name)

    hooks = [
        m.register_forward_hook(lambda _m, _a, out, n=n: produced_by.__setitem__(id(out), (n, out)))
        for n, m in modules.items()
        if _is_norm(m) and n.startswith(prefix + ".")
    ]
    hooks += [modules[n].register_forward_pre_hook(lambda _m, args, n=n: record(n, args[0])) for n in linears]
    for mlp_name, mlp in modules.items():
        if mlp_name.startswith(prefix + ".") and _is_gated_mlp(mlp):
            for part in ("gate_proj", "up_proj"):
                hooks.append(
                    getattr(mlp, part).register_forward_hook(
                        lambda _m, _a, out, n=mlp_name, p=part: mlp_outputs.setdefault(n, {}).__setitem__(p, out)
                    )
                )
            hooks.append(mlp.down_proj.register_forward_pre_hook(lambda _m, args, n=mlp_name: check_mlp(n, args[0])))
    try:
        for start in range(0, batches.shape[0], batch_size):
            model(input_ids=batches[start : start + batch_size].to(module_device(model)), use_cache=False)
            produced_by.clear()
            first_batch = False
    finally:
        for hook in hooks:
            hook.remove()
    return stats, verified_mlps


# -- groups and scales -------------------------------------------------------------------------
@dataclass(frozen=True)
class SmoothGroup:
    """Linear layers reading one tensor, and what divides that tensor by s."""

    consumers: tuple[str, ...]
    producer: str
    kind: str  # "norm" | "up_proj" | "v_proj"


def smoothing_groups(
    model: nn.Module, stats: Mapping[str, InputStats], verified_mlps: set[str], layer_names: list[str]
) -> list[SmoothGroup]:
    """The groups that contain a layer of ``layer_names``; a ValueError for a layer whose producer
    is none of a norm, a gated MLP's up_proj or an attention's v_proj."""
    modules = dict(model.named_modules())
    readers: dict[str, list[str]] = {}
    for name, rec in stats.items():
        if rec.producer is not None:
            readers.setdefault(rec.producer, []).append(name)
    groups: dict[str, SmoothGroup] = {}
    for name in layer_names:
        if name not in stats:
            raise ValueError(f"smoothquant: {name} is not a linear layer inside the decoder blocks")
        parent_name, _, leaf = name.rpartition(".")
        parent = modules.get(parent_name)
        producer = stats[name].producer
        if producer is not None:
            groups.setdefault(producer, SmoothGroup(tuple(readers[producer]), producer, "norm"))
        elif leaf == "down_proj" and parent_name in verified_mlps:
            groups[name] = SmoothGroup((name,), f"{parent_name}.up_proj", "up_proj")
        elif leaf == "o_proj" and parent is not None and _is_attention(parent):
            groups[name] = SmoothGroup((name,), f"{parent_name}.v_proj", "v_proj")
        else:
            raise ValueError(
                f"smoothquant cannot tell what produces the input of {name}: it folds 1/s into a norm, a gated "
                "MLP's up_proj (for down_proj) or an attention's v_proj (for o_proj); exclude the layer "
                "(layers.exclude) or drop method.smooth"
            )
    return list(groups.values())


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha), per input channel j."""
    alpha = check_alpha(alpha)
    if alpha == "search":
        raise ValueError("smoothing_scales needs a number alpha; 'search' is resolved by smooth_for_method")
    return act_absmax.float().clamp_min(_EPS).pow(alpha) / weight_absmax.float().clamp_min(_EPS).pow(1 - alpha)


def _shared_kv_scale(s: torch.Tensor, attention: nn.Module) -> torch.Tensor:
    """o_proj's per-channel scale made equal across the query heads that read one kv head (their
    max), as a per-kv-channel vector: v_proj's output rows take it."""
    return s.view(-1, attention.num_key_value_groups, attention.head_dim).amax(1).reshape(-1)


def group_scale(model: nn.Module, group: SmoothGroup, stats: Mapping[str, InputStats], alpha: float) -> torch.Tensor:
    """The scale of the group's shared input (for v_proj groups: o_proj's, already shared per kv head)."""
    modules = dict(model.named_modules())
    weight_absmax = torch.stack([modules[c].weight.detach().float().abs().amax(0) for c in group.consumers]).amax(0)
    s = smoothing_scales(stats[group.consumers[0]].absmax, weight_absmax.to(stats[group.consumers[0]].absmax), alpha)
    if group.kind == "v_proj":
        attention = modules[group.consumers[0].rpartition(".")[0]]
        s = _shared_kv_scale(s, attention).view(-1, attention.head_dim)
        s = s.repeat_interleave(attention.num_key_value_groups, 0).reshape(-1)
    return s


# -- application -----------------------------------------------------------------------------
@dataclass
class SmoothRecord:
    """One row of the smoothing table: a smoothed layer, where 1/s went, the range of s."""

    layer: str
    folded_into: str  # the producer's name, or "input_scale" (explicit, counted)
    max_s: float
    min_s: float


@dataclass
class SmoothResult:
    alpha: float
    records: list[SmoothRecord]
    input_scales: dict[str, torch.Tensor]  # explicit multipliers (fp16) for layers whose producer took no fold
    search_errors: dict[float, float] = field(default_factory=dict)  # alpha -> summed relative output error


def _scale_rows(layer: nn.Linear, divisor: torch.Tensor) -> None:
    """Divide the layer's output channels (weight rows and bias) by ``divisor``."""
    layer.weight.copy_((layer.weight.float() / divisor[:, None].to(layer.weight.device)).to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.copy_((layer.bias.float() / divisor.to(layer.bias.device)).to(layer.bias.dtype))


def _scale_columns(layer: nn.Linear, s: torch.Tensor) -> None:
    layer.weight.copy_((layer.weight.float() * s[None, :].to(layer.weight.device)).to(layer.weight.dtype))


@torch.no_grad()
def apply_smoothing(
    model: nn.Module, groups: list[SmoothGroup], stats: Mapping[str, InputStats], alpha: float
) -> tuple[list[SmoothRecord], dict[str, torch.Tensor]]:
    """Rescale the float model in place (scales from the unsmoothed weights); the table and the
    explicit input multipliers. An explicit multiplier is also installed as a forward pre-hook on the
    float layer, so that the model computes the same function until the layer is replaced."""
    modules = dict(model.named_modules())
    scales = [group_scale(model, g, stats, alpha) for g in groups]  # all before any weight moves
    records, explicit = [], {}
    for group, s in zip(groups, scales, strict=True):
        producer = modules[group.producer]
        if group.kind == "norm":
            folded = fold_into_norm(producer, s.to(producer.weight.device))
        else:
            attention = modules[group.consumers[0].rpartition(".")[0]] if group.kind == "v_proj" else None
            _scale_rows(producer, s if attention is None else _shared_kv_scale(s, attention))
            folded = True
        if not folded:
            multiplier = (1 / s).to(torch.float16)
            s = 1 / multiplier.float()  # the weights take the value the multiplier is stored at
        for consumer in group.consumers:
            _scale_columns(modules[consumer], s)
            if not folded:
                explicit[consumer] = multiplier
                modules[consumer].register_forward_pre_hook(
                    lambda _m, args, m=multiplier: (args[0] * m.to(args[0]), *args[1:])
                )
            records.append(
                SmoothRecord(consumer, group.producer if folded else "input_scale", float(s.max()), float(s.min()))
            )
    return records, explicit


def smooth_model(
    model: nn.Module, layer_names: list[str], batches: torch.Tensor, alpha: float, seed: int = 0
) -> SmoothResult:
    """Smooth ``layer_names`` (and their input-sharing siblings) with a fixed ``alpha``, in place."""
    alpha = check_alpha(alpha)
    if alpha == "search":
        raise ValueError("smooth_model takes a number alpha; use smooth_for_method for alpha=search")
    stats, verified = collect_input_stats(model, batches, seed)
    groups = smoothing_groups(model, stats, verified, layer_names)
    records, explicit = apply_smoothing(model, groups, stats, alpha)
    return SmoothResult(alpha, records, explicit)


# -- alpha search ----------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantSim:
    """How the method will quantize: the weight grid and block, and the activation scheme."""

    weight: QuantSpec
    granularity: str
    group_size: int | None
    activation: ActivationQuant
    observer: str = "minmax"
    percentile: float = 99.99


def _fake_quantize_input(rows: torch.Tensor, rec: InputStats, s: torch.Tensor, sim: QuantSim) -> torch.Tensor:
    """``rows / s`` through the activation quantizer: static ranges from the whole pass's extremes
    with the observer's samples drawn from the rows (as many as calibration draws), dynamic per row."""
    x = rows / s
    scale = zero = None
    if sim.activation.mode == "static":
        low, high = rec.channel_min.cpu() / s, rec.channel_max.cpu() / s
        flat = x.reshape(-1)
        picked = torch.randint(0, flat.numel(), (min(OBSERVER_SAMPLES, flat.numel()),), generator=_generator())
        stats = ActivationStats(float(low.min().clamp_max(0)), float(high.max().clamp_min(0)), [flat[picked]])
        scale, zero = activation_qparams(stats, sim.activation.spec, sim.observer, sim.percentile)
    q, scale, zero, block = quantize_activation(x, sim.activation, scale, zero)
    return dequantize(q, scale, zero, block)


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)  # the same observer samples for every alpha


@torch.no_grad()
def smoothing_error(
    model: nn.Module, groups: list[SmoothGroup], stats: Mapping[str, InputStats], alpha: float, sim: QuantSim
) -> float:
    """Sum over the smoothed layers of ||Q(X/s) Q(W s)^T - X W^T||^2 / ||X W^T||^2 on sampled rows
    (a group's layers read one tensor: they are scored on the rows sampled at its first reader)."""
    modules = dict(model.named_modules())
    total = 0.0
    for group in groups:
        s = group_scale(model, group, stats, alpha).cpu()
        rec = stats[group.consumers[0]]
        rows = torch.cat(rec.rows)
        rows_q = _fake_quantize_input(rows, rec, s, sim)
        for consumer in group.consumers:
            w = modules[consumer].weight.detach().float().cpu()
            reference = rows @ w.T
            block = block_size_for(w.shape, sim.granularity, sim.group_size)
            approx = rows_q @ fake_quantize(w * s, sim.weight, block).T
            total += float((approx - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-12))
    return total


def quant_sim(method: Mapping) -> QuantSim:
    """How ``method`` will quantize the smoothed layers (what the alpha search scores)."""
    from pipeline import quantize  # here: pipeline.quantize imports this package's algorithms

    act = method["activations"]
    return QuantSim(
        quantize.weight_spec(method),
        method["granularity"],
        method["group_size"],
        quantize.activation_quant(method),
        act.get("observer", "minmax"),
        float(act.get("percentile", 99.99)),
    )


def smooth_for_method(
    model: nn.Module, method: Mapping, layer_names: list[str], batches: torch.Tensor, seed: int
) -> SmoothResult:
    """The one entry point: smooth the float model in place for ``method`` (its alpha given or searched)."""
    alpha = check_options(method["smooth"])
    sim = quant_sim(method)
    searching = alpha == "search"
    stats, verified = collect_input_stats(model, batches, seed, keep_rows=SEARCH_ROWS_PER_BATCH if searching else 0)
    groups = smoothing_groups(model, stats, verified, layer_names)
    errors = {}
    if searching:
        errors = {a: smoothing_error(model, groups, stats, a, sim) for a in ALPHA_GRID}
        alpha = min(errors, key=errors.__getitem__)
        log.info(
            "smoothquant alpha search (summed relative output error of %d layers): %s -> alpha=%s",
            sum(len(g.consumers) for g in groups),
            ", ".join(f"{a}: {e:.4f}" for a, e in errors.items()),
            alpha,
        )
    records, explicit = apply_smoothing(model, groups, stats, alpha)
    for r in records:
        log.info("smoothquant %s: 1/s folded into %s, s in [%.3g, %.3g]", r.layer, r.folded_into, r.min_s, r.max_s)
    log.info(
        "smoothquant: %d layers smoothed at alpha=%s, %d with an explicit input scale",
        len(records),
        alpha,
        len(explicit),
    )
    return SmoothResult(alpha, records, explicit, errors)
