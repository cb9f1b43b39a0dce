"""A quantization method is an ordered list of steps (``method.steps``); each step reads its options
from ``method.<step>`` (e.g. ``method.gptq.damp``). This module is the registry of steps, the one
check of a method's steps, the tag that describes them, and the translation of legacy configs.

Each step has a kind that says when it runs; the kinds run in this order:

``model`` (``ModelStep``): on the whole float model before any layer is quantized, e.g. QAT's
    ``train``. ``run(ModelContext) -> ModelResult``: it may change the model in place; its result
    carries metrics to record (e.g. ``train_s``) and the layers whose module now carries its own
    grid (``fixed_grid()``, see ``train.FixedGrid``), which the codes step must round onto.
``block`` (``BlockStep``): inside each decoder block's calibration pass (``run_blocks``), after the
    block's inputs are recorded and before its codes are chosen, e.g. ``awq``, ``reconstruct``.
    ``run(BlockContext) -> BlockResult``: it may change the block's float weights in place; its result
    carries, per layer it rescaled, ``(s, folded)`` (the layer's input is now divided by ``s``, by the
    preceding norm (folded) or by an explicit input scale that the layer stores), the grids it fixed
    (``train.FixedGrid``, rounded onto by the codes step) and metrics (averaged over blocks).
``codes`` (``CodesStep``): picks one layer's integer codes, e.g. ``rtn``, ``gptq``, ``hqq``,
    ``lowrank``. ``run(weight, spec, block_size, inputs, options, timings) -> QuantizedWeight``;
    exactly one per method.
``finish`` (``FinishStep``): on the packed model, after every layer has its codes, e.g. ``e2e``
    (trains the stored scales end to end). ``run(FinishContext) -> ModelResult``: it may change the
    QuantLinears' stored values in place (not their layout or bytes); the float model is there as
    ``teacher`` when the step asks for it.

A method runs block by block (``is_sequential``) when it has a block step or its codes step needs
calibration inputs with a Hessian; otherwise layer by layer. ``method.steps: []`` quantizes nothing
(``fp``). Adding a step: its module (in ``pipeline/algorithms/``), one entry in ``STEPS``, a YAML.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline import train
from pipeline.algorithms import allocate, awq, e2e, reconstruct, smoothquant
from pipeline.algorithms.gptq import gptq_quantize
from pipeline.algorithms.hqq import hqq_quantize
from pipeline.algorithms.lowrank import lowrank_quantize
from pipeline.algorithms.sequential import LayerInputs
from pipeline.layers import float_weight, store_float_weight
from pipeline.quant.primitives import QuantSpec, choose_qparams, quantize

log = logging.getLogger(__name__)

KINDS = ("model", "block", "codes", "finish")  # the order steps run in


# -- the interface of each kind ------------------------------------------------------------------
@dataclass
class ModelContext:
    """What a model step gets: the float model, its selected layers (name -> module), the method and
    its weight spec, the calibration batches (None unless some step needs them), and the stage's
    services (a per-step metrics logger)."""

    model: nn.Module
    selected: Mapping[str, nn.Module]
    method: Mapping
    spec: QuantSpec
    batches: torch.Tensor | None
    seed: int
    log_step: Callable[[int, dict], None]


@dataclass
class ModelResult:
    """What the model steps leave: metrics to record, and the layers whose module carries a fixed grid."""

    metrics: dict[str, float] = field(default_factory=dict)
    fixed_grid_layers: frozenset[str] = frozenset()
    # explicit per-input-channel multipliers of layers whose float weight now reads x * multiplier
    # (a rescaling no preceding module could absorb); the layer stores and counts it
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    # method.layer_overrides entries a step chose (mixed precision), applied after the method's own
    layer_overrides: list[dict] = field(default_factory=list)
    # JSON/YAML artifacts to log with the run, by file name
    artifacts: dict[str, object] = field(default_factory=dict)


@dataclass
class BlockContext:
    """What a block step gets: one decoder block (by its path), its selected layers' recorded inputs
    (full layer name -> LayerInputs), the method and its weight spec; each layer's own spec and block
    size (``method.layer_overrides`` applied); the calibration pass's (hidden, kwargs) batches at the
    block's input; the float block's outputs (``targets``, for a step whose ``targets`` asks: on those
    inputs, or on the float model's own, computed before any block step ran); the explicit input multipliers that
    earlier block steps gave layers (their float module does not apply them: a step that runs the
    block must)."""

    block: nn.Module
    block_name: str
    inputs: Mapping[str, LayerInputs]
    method: Mapping
    spec: QuantSpec
    layer_specs: Mapping[str, tuple[QuantSpec, tuple[int, int]]] = field(default_factory=dict)
    state: list = field(default_factory=list)
    targets: list[torch.Tensor] | None = None
    input_multipliers: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class BlockResult:
    """What a block step leaves: input rescalings ``(s, folded)`` and fixed grids, by full layer name,
    and metrics of this block (the stage logs their mean over blocks)."""

    rescaled: dict[str, tuple[torch.Tensor, bool]] = field(default_factory=dict)
    grids: dict[str, train.FixedGrid] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class FinishContext:
    """What a finish step gets: the quantized model (its layers now QuantLinears), the float model
    as loaded (``teacher``: a copy kept for steps whose ``needs_teacher`` says so, else None), the
    method, the calibration batches and the stage's services."""

    model: nn.Module
    teacher: nn.Module | None
    method: Mapping
    batches: torch.Tensor | None
    seed: int
    log_step: Callable[[int, dict], None]


@dataclass
class QuantizedWeight:
    """What a codes step decides for one layer; QuantLinear stores it."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class Step:
    """Shared by every kind: ``options`` says whether ``method.<name>`` holds its options (checked by
    ``check``); ``describe(options)`` is its part of the ``algorithm`` tag; ``needs_calibration``:
    it reads calibration batches; ``timing``: the key its seconds are added under."""

    name: str
    describe: Callable[[Mapping], str]
    check: Callable[[Mapping], None] = lambda _options: None
    # checks that need the whole method (its other steps, its activations, its bits), given the method
    check_method: Callable[[Mapping], None] = lambda _method: None
    options: bool = True
    needs_calibration: bool = False
    timing: str = ""
    # leaves each selected layer's grid fixed: the codes steps (named) that can round onto it, one of
    # which must come right after it; empty: fixes no grid
    grid_codes: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class ModelStep(Step):
    run: Callable[[ModelContext], ModelResult] = None  # type: ignore[assignment]

    @property
    def kind(self) -> str:
        return "model"


@dataclass(frozen=True)
class BlockStep(Step):
    run: Callable[[BlockContext], BlockResult] = None  # type: ignore[assignment]
    needs_calibration: bool = True  # a block step runs inside the calibration pass
    # which float outputs it reads as BlockContext.targets, given its options: None (none), "block" (the
    # float block on the partly quantized model's inputs) or "float" (on the float model's own inputs)
    targets: Callable[[Mapping], str | None] = lambda _options: None

    @property
    def kind(self) -> str:
        return "block"


@dataclass(frozen=True)
class FinishStep(Step):
    """Runs after the codes step, on the packed model (e.g. ``e2e``: trains the stored scales)."""

    run: Callable[[FinishContext], ModelResult] = None  # type: ignore[assignment]
    # whether it needs the float model beside the quantized one, given its options
    needs_teacher: Callable[[Mapping], bool] = lambda _options: False

    @property
    def kind(self) -> str:
        return "finish"


@dataclass(frozen=True)
class CodesStep(Step):
    run: Callable[..., QuantizedWeight] = None  # type: ignore[assignment]
    needs_hessian: bool = False  # needs the block-by-block pass's Hessian of the layer's inputs

    @property
    def kind(self) -> str:
        return "codes"


# -- the steps ------------------------------------------------------------------------------------
def _rtn(weight, spec, block, _inputs, _options, _timings, grid: train.FixedGrid | None = None) -> QuantizedWeight:
    if grid is not None:  # a grid fixed by an earlier step (QAT): round onto it
        codes = quantize(weight, grid.scale, grid.zero, grid.spec, grid.block_size)
        return QuantizedWeight(codes, grid.scale, grid.zero)
    scale, zero = choose_qparams(weight, spec, block)
    return QuantizedWeight(quantize(weight, scale, zero, spec, block), scale, zero)


def _gptq(
    weight, spec, block, inputs: LayerInputs, options, timings: dict[str, float], grid: train.FixedGrid | None = None
) -> QuantizedWeight:
    hessian = inputs.hessian.hessian
    inputs.hessian = None  # the accumulated sum (layers sharing an input release it with the last of them)
    if inputs.input_multiplier is not None:  # inputs were recorded before a rescaling x -> x * m
        m = inputs.input_multiplier.double()
        hessian = hessian * m[:, None] * m[None, :]
    codes, scale, zero = gptq_quantize(
        weight,
        hessian,
        spec,
        block,
        damp=float(options["damp"]),
        block=int(options["block"]),
        act_order=bool(options["act_order"]),
        threads=options.get("threads"),
        timings=timings,
        grid=None if grid is None else (grid.scale, grid.zero),  # a grid fixed by an earlier step: round onto it
    )
    return QuantizedWeight(codes, scale, zero)


def _hqq(weight, spec, block, _inputs, options, _timings) -> QuantizedWeight:
    codes, scale, zero = hqq_quantize(
        weight,
        spec,
        block,
        iters=int(options["iters"]),
        lp_norm=float(options["lp_norm"]),
        beta=float(options["beta"]),
        kappa=float(options["kappa"]),
    )
    return QuantizedWeight(codes, scale, zero)


def _lowrank(weight, spec, block, _inputs, options, _timings) -> QuantizedWeight:
    codes, scale, zero, a, b = lowrank_quantize(
        weight, spec, block, rank=int(options["rank"]), iters=int(options["iters"])
    )
    return QuantizedWeight(codes, scale, zero, (a, b))


def _awq(ctx: BlockContext) -> BlockResult:
    method = ctx.method
    rescaled = awq.apply_awq(
        ctx.block, ctx.block_name, ctx.inputs, ctx.spec, method["granularity"], method["group_size"], method["awq"]
    )
    return BlockResult(rescaled=rescaled)


def _reconstruct(ctx: BlockContext) -> BlockResult:
    """Block-wise reconstruction: learned clipping (and weights) per layer; each layer's grid is fixed."""
    prefix = ctx.block_name + "."
    modules = dict(ctx.block.named_modules())
    layers = {
        full.removeprefix(prefix): (float_weight(modules[full.removeprefix(prefix)]).float(), spec, size)
        for full, (spec, size) in ctx.layer_specs.items()
    }
    multipliers = {full.removeprefix(prefix): m for full, m in ctx.input_multipliers.items()}
    results, errors = reconstruct.reconstruct_block(
        ctx.block, layers, ctx.state, ctx.targets, ctx.method["reconstruct"], multipliers
    )
    grids = {}
    for local, r in results.items():
        spec, size = layers[local][1], layers[local][2]
        store_float_weight(modules[local], r.weight)
        grids[prefix + local] = train.FixedGrid(spec, size, r.scale, r.zero)
    log.info("reconstruct %s: block output mse %.3g -> %.3g", ctx.block_name, errors["mse_before"], errors["mse_after"])
    return BlockResult(
        grids=grids,
        metrics={
            "reconstruct_mse_before": errors["mse_before"],
            "reconstruct_mse_after": errors["mse_after"],
            "reconstruct_mse_ratio": errors["mse_after"] / max(errors["mse_before"], 1e-30),
        },
    )


def _train(ctx: ModelContext) -> ModelResult:
    """QAT: fake-quantize the selected layers, train them; each keeps its trained grid for packing."""
    start = time.perf_counter()
    options = ctx.method["train"]
    fakes = train.prepare(ctx.model, ctx.selected, ctx.method, bool(options["learnable_scale"]), float_weight, ctx.spec)
    train.fit(ctx.model, fakes, ctx.batches, options, ctx.seed, log_step=ctx.log_step)  # kd: train.float_teacher
    return ModelResult({"train_s": time.perf_counter() - start}, frozenset(fakes))


def _smooth(ctx: ModelContext) -> ModelResult:
    """SmoothQuant: migrate activation outliers into the weights of the float model (same function)."""
    start = time.perf_counter()
    result = smoothquant.smooth_for_method(ctx.model, ctx.method, list(ctx.selected), ctx.batches, ctx.seed)
    metrics = {
        "smooth_alpha": result.alpha,
        "smooth_explicit_layers": float(len(result.input_scales)),
        "smooth_s": time.perf_counter() - start,
    }
    return ModelResult(metrics, input_scales=dict(result.input_scales))


def _allocate(ctx: ModelContext) -> ModelResult:
    """Mixed precision: a width per layer under method.allocate.budget_bits, from Fisher sensitivities."""
    start = time.perf_counter()
    options, method = ctx.method["allocate"], ctx.method
    batches = ctx.batches[: int(options["samples"])]
    input_scale_bytes = {}
    if any(step.name == "awq" for step in method_steps(method)):  # AWQ will store explicit input scales
        explicit = awq.explicit_scale_layers(ctx.model, list(ctx.selected), batches[0])
        width = torch.finfo(awq.INPUT_SCALE_DTYPE).bits // 8
        input_scale_bytes = {name: width * float_weight(ctx.selected[name]).shape[1] for name in explicit}
    choices = allocate.measure(
        ctx.model,
        ctx.selected,
        batches,
        ctx.spec,
        method["granularity"],
        method["group_size"],
        list(options["candidates"]),
        input_scale_bytes,
    )
    choice = allocate.allocate(choices, float(options["budget_bits"]))
    overrides = allocate.as_overrides(choice, int(method["bits"]))
    table = [
        {
            "layer": c.name,
            "bits": choice[c.name],
            "bytes": c.bytes_by_bits[choice[c.name]],
            **{f"sensitivity_{b}bit": c.sensitivity_by_bits[b] for b in sorted(c.sensitivity_by_bits)},
        }
        for c in choices
    ]
    widths = [choice[c.name] for c in choices]
    metrics = {
        "allocate_s": time.perf_counter() - start,
        "allocate_bits_per_weight": allocate.average_bits(choices, choice),
        **{f"allocate_layers_{b}bit": float(widths.count(b)) for b in sorted(set(options["candidates"]))},
    }
    log.info("allocate: %s", {b: widths.count(b) for b in sorted(set(widths))})
    artifacts = {"allocation.json": table, "allocation_overrides.yaml": {"layer_overrides": overrides}}
    return ModelResult(metrics, layer_overrides=overrides, artifacts=artifacts)


def _e2e(ctx: FinishContext) -> ModelResult:
    """EfficientQAT's E2E-QP: the stored scales of every quantized layer trained end to end."""
    options = ctx.method["e2e"]
    return ModelResult(e2e.train_step_sizes(ctx.model, ctx.teacher, ctx.batches, options, ctx.seed, ctx.log_step))


def _keys(step: str, *keys: str) -> Callable[[Mapping], None]:
    """A checker that ``method.<step>`` has every one of ``keys``."""

    def check(options: Mapping) -> None:
        missing = [k for k in keys if k not in options]
        if missing:
            raise ValueError(f"method.{step} lacks {', '.join(missing)} (it takes {', '.join(keys)})")

    return check


STEPS: dict[str, Step] = {
    step.name: step
    for step in (
        ModelStep(
            "allocate",
            describe=lambda o: f"allocate({o['budget_bits']}b:{'/'.join(map(str, o['candidates']))})",
            check=allocate.check_option_keys,
            check_method=lambda m: allocate.check_options(m["allocate"], m["bits"]),
            needs_calibration=True,
            run=_allocate,
        ),
        ModelStep(
            "smooth",
            describe=lambda o: f"smooth(alpha={o.get('alpha', smoothquant.DEFAULT_ALPHA)})",
            check=smoothquant.check_options,
            check_method=smoothquant.check_in_method,
            needs_calibration=True,
            run=_smooth,
        ),
        ModelStep(
            "train",
            describe=lambda o: f"qat({'lsq' if o['learnable_scale'] else 'minmax'},{o['loss']})",
            check=train.check_options,
            needs_calibration=True,
            run=_train,
            grid_codes=("rtn",),  # a trained layer is a FakeQuantLinear: its grid and weight are final
        ),
        BlockStep(
            "awq",
            describe=lambda o: "awq_scales+clip" if o["clip"] else "awq_scales",
            check=_keys("awq", "grid", "clip", "max_shrink"),
            run=_awq,
            timing="awq_search",
        ),
        BlockStep(
            "reconstruct",
            describe=lambda o: f"reconstruct(lwc{'+weights' if o['weight_lr'] is not None else ''},{o['epochs']}ep)",
            check=reconstruct.check_options,
            run=_reconstruct,
            timing="reconstruct",
            grid_codes=("rtn", "gptq"),  # gptq: error feedback on the learned grid
            targets=lambda o: o["target"],
        ),
        CodesStep("rtn", describe=lambda _o: "rtn", options=False, run=_rtn),
        FinishStep(
            "e2e",
            describe=lambda o: f"e2e_scales({o['loss']},{o['steps']}st)",
            check=e2e.check_options,
            check_method=e2e.check_in_method,
            needs_calibration=True,
            run=_e2e,
            needs_teacher=lambda o: o["loss"] == "kd",
        ),
        CodesStep(
            "gptq",
            describe=lambda o: "gptq(act_order)" if o["act_order"] else "gptq",
            check=_keys("gptq", "damp", "block", "act_order"),
            needs_calibration=True,
            run=_gptq,
            needs_hessian=True,
        ),
        CodesStep("hqq", describe=lambda _o: "hqq", check=_keys("hqq", "iters", "lp_norm", "beta", "kappa"), run=_hqq),
        CodesStep(
            "lowrank",
            describe=lambda o: f"lowrank(rank={o['rank']})+rtn",  # RTN of the residual W - A·B
            check=_keys("lowrank", "rank", "iters"),
            run=_lowrank,
        ),
    )
}


# -- reading and checking method.steps -------------------------------------------------------------
def method_steps(method: Mapping) -> list[Step]:
    """The method's steps, in order (``check_steps`` has said they are valid)."""
    if method.get("steps") is None:
        raise ValueError(
            f"method {method.get('name')!r} has no method.steps (a config from before them, with "
            "method.algorithm, is translated by pipeline.steps.with_steps)"
        )
    return [STEPS[name] for name in method["steps"]]


def codes_step(method: Mapping) -> CodesStep:
    """The step that picks each layer's codes: the one codes step (``check_steps``)."""
    (step,) = [s for s in method_steps(method) if isinstance(s, CodesStep)]  # check_steps: exactly one
    return step


def options_of(method: Mapping, step: Step) -> Mapping:
    return (method.get(step.name) or {}) if step.options else {}


def check_steps(method: Mapping) -> None:
    """``method.steps``, checked once before any model loads: known names, kinds in the order
    model* -> block* -> codes -> finish* with exactly one codes step, each step's options present and valid,
    and no options block for a step that is not listed (it would be silently ignored)."""
    names = method.get("steps")
    if "algorithm" in method:
        raise ValueError(
            "method.algorithm is gone: a method is method.steps, e.g. method.steps=[awq,gptq] "
            "(pipeline.steps.with_steps translates an old config)"
        )
    if not isinstance(names, Sequence) or isinstance(names, str):
        raise ValueError(f"method.steps must be a list of step names ({', '.join(STEPS)}), got {names!r}")
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise ValueError(f"unknown step(s) {unknown} in method.steps; allowed: {', '.join(STEPS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"method.steps lists a step twice: {list(names)}")
    stray = [key for key in STEPS if method.get(key) is not None and key not in names]
    if stray:
        raise ValueError(
            f"method.{stray[0]} is set but {stray[0]!r} is not in method.steps {list(names)}: add it to the "
            f"steps or set method.{stray[0]}=null"
        )
    if not names:
        return  # nothing is quantized (fp)
    steps = [STEPS[n] for n in names]
    kinds = [s.kind for s in steps]
    unfinished = [k for k in kinds if k != "finish"]
    if kinds.count("codes") != 1 or unfinished[-1:] != ["codes"]:
        codes = [n for n, s in STEPS.items() if s.kind == "codes"]
        finish = [n for n, s in STEPS.items() if s.kind == "finish"]
        raise ValueError(
            f"method.steps {list(names)} must end with exactly one codes step ({', '.join(codes)}), "
            f"the one that picks each layer's integer codes (only finish steps, {', '.join(finish)}, come after it)"
        )
    order = [KINDS.index(k) for k in kinds]
    if order != sorted(order):
        described = ", ".join(f"{n} ({k})" for n, k in zip(names, kinds, strict=True))
        raise ValueError(
            f"method.steps runs model steps, then block steps, then the codes step, then finish steps; got {described}"
        )
    for index, step in enumerate(steps):
        if step.grid_codes and steps[index + 1].name not in step.grid_codes:
            raise ValueError(
                f"{step.name} fixes each layer's grid, so it must come right before a codes step that rounds "
                f"onto that grid ({', '.join(step.grid_codes)}), got {steps[index + 1].name!r} after it"
            )
        options = method.get(step.name)
        if not step.options:
            if options is not None:
                raise ValueError(f"step {step.name!r} takes no options, but method.{step.name} is set to {options!r}")
            continue
        if not isinstance(options, Mapping):
            raise ValueError(f"step {step.name!r} needs its options under method.{step.name}, got {options!r}")
        step.check(options)
        step.check_method(method)
    target_kind(method)  # one kind of float target for all block steps


# -- what the steps imply -----------------------------------------------------------------------------
def quantizes(method: Mapping) -> bool:
    """False for ``method.steps: []`` (fp: the model stays as loaded); a legacy config by its algorithm."""
    if method.get("steps") is None and "algorithm" in method:
        return method["algorithm"] != "none"
    return bool(method_steps(method))


def is_sequential(method: Mapping) -> bool:
    """Calibrated block by block on the partly quantized model: a block step, or a codes step that
    needs a Hessian of the layer's inputs (GPTQ)."""
    return any(isinstance(s, BlockStep) or (isinstance(s, CodesStep) and s.needs_hessian) for s in method_steps(method))


def needs_calibration(method: Mapping) -> bool:
    steps = method_steps(method)
    if not steps:
        return False
    act = method.get("activations")
    return bool(act and act["mode"] == "static") or any(s.needs_calibration for s in steps)


def needs_teacher(method: Mapping) -> bool:
    """Whether a finish step reads the float model beside the packed one (``FinishStep.needs_teacher``)."""
    return any(isinstance(s, FinishStep) and s.needs_teacher(options_of(method, s)) for s in method_steps(method))


def target_kind(method: Mapping) -> str | None:
    """The float outputs the block steps read (``BlockStep.targets``): None, "block" or "float"."""
    kinds = {s.targets(options_of(method, s)) for s in method_steps(method) if isinstance(s, BlockStep)} - {None}
    if len(kinds) > 1:
        raise ValueError(f"the block steps of method.steps ask for different float targets: {sorted(kinds)}")
    return kinds.pop() if kinds else None


def describe_steps(method: Mapping) -> str:
    """The ``algorithm`` tag: what picks the weights, step by step, e.g. ``awq_scales+clip+gptq(act_order)``."""
    steps = method_steps(method)
    return "+".join(s.describe(options_of(method, s)) for s in steps) if steps else "none"


# -- configs from before method.steps ------------------------------------------------------------------
def steps_from_legacy(method: Mapping) -> list[str]:
    """The steps a config with ``method.algorithm`` ran (logged warnings say what the new form is).

    Before ``method.steps``, ``algorithm`` named the codes step (``none``: nothing quantized); AWQ ran
    whenever ``method.awq`` was set and QAT whenever ``method.train`` was, and a QAT-trained layer was
    always rounded on its trained grid (``rtn``), whatever ``algorithm`` said. With ``steps`` also set
    (an override ``+method.algorithm=X`` on a preset), ``algorithm`` replaces its codes step.
    """
    algorithm = method["algorithm"]
    codes = [n for n, s in STEPS.items() if isinstance(s, CodesStep)]
    if algorithm != "none" and algorithm not in codes:
        raise ValueError(f"unknown method.algorithm {algorithm!r}; it named one of: none, {', '.join(codes)}")
    if algorithm == "none":
        steps: list[str] = []
    elif method.get("steps") is not None:  # algorithm takes the codes step's place
        steps = [algorithm if n in codes else n for n in method["steps"]]
    else:
        steps = [n for n in ("allocate", "smooth", "train", "awq", "reconstruct") if method.get(n)]
        if "train" in steps and algorithm != "rtn":
            log.warning(
                "method.algorithm=%s with method.train: QAT runs packed each trained layer by rounding on "
                "its trained grid, never by %s; translated as it ran, to rtn",
                algorithm,
                algorithm,
            )
            algorithm = "rtn"
        steps.append(algorithm)
    log.warning("method.algorithm is gone: translated to method.steps=[%s]; write that instead", ",".join(steps))
    return steps


def with_steps(method: Mapping) -> dict:
    """``method`` as a ``method.steps`` config: unchanged if it has no ``algorithm``; else translated by
    ``steps_from_legacy``, without ``algorithm`` and without the options of steps that did not run
    (a legacy config carried them unread: each dropped one is logged)."""
    if "algorithm" not in method:
        return dict(method)
    steps = steps_from_legacy(method)
    out = {k: v for k, v in method.items() if k != "algorithm"}
    out["steps"] = steps
    for name in STEPS:
        if out.get(name) is not None and name not in steps:
            log.warning("method.%s is dropped: %r is not among the steps that ran (%s)", name, name, steps)
            out[name] = None
    return out
