"""Quantize stage: turn the method config into specs, replace the selected layers (``pipeline.layers``).

A method is data: bits, symmetry, granularity, group size, zero-point domain, scale dtype,
optional activation quantization, and the algorithm that picks the integer codes (``rtn`` here;
algorithms that use calibration data plug into ``ALGORITHMS`` without touching this flow).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.algorithms.awq import apply_awq
from pipeline.algorithms.gptq import gptq_quantize
from pipeline.algorithms.hqq import hqq_quantize
from pipeline.algorithms.lowrank import lowrank_quantize
from pipeline.algorithms.sequential import LayerInputs, run_blocks
from pipeline.calibrate import ActivationStats, activation_qparams
from pipeline.layers import check_group_size, float_weight, select_layers, weight_matrices
from pipeline.profile import torch_threads
from pipeline.quant.linear import ActivationQuant, QuantLinear
from pipeline.quant.primitives import QuantSpec, block_size_for, choose_qparams, quantize
from pipeline.train import FakeQuantLinear, converted

log = logging.getLogger(__name__)

GRANULARITIES = ("per_tensor", "per_channel", "group")
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class LayerRecord:
    """One row of the per-layer table logged with every run."""

    layer: str
    shape: str
    quantized: bool
    reason: str
    bits: int | None = None
    granularity: str | None = None
    block_size: str | None = None
    grid: str | None = None  # the integer range that ran, e.g. "int4 sym [-8,7]" (QuantLinear.grid)
    rel_error: float | None = None
    kernel: str | None = None
    kernel_note: str = ""
    weight_bytes: int = 0
    kernel_cache_bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


# -- config -> specs -------------------------------------------------------------------------
def weight_spec(method: Mapping) -> QuantSpec:
    if method["scale_dtype"] not in SCALE_DTYPES:
        raise ValueError(f"method.scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {method['scale_dtype']!r}")
    if method["symmetric"] is None:
        raise ValueError("method.symmetric must be true or false")
    with _config_key("method"):
        return QuantSpec(
            bits=method["bits"],
            symmetric=bool(method["symmetric"]),
            zero_point_domain=method["zero_point_domain"],
            scale_dtype=SCALE_DTYPES[method["scale_dtype"]],
            symmetric_range=method.get("symmetric_range"),
        )


def activation_quant(method: Mapping) -> ActivationQuant | None:
    act = method.get("activations")
    if not act:
        return None
    with _config_key("method.activations"):
        spec = QuantSpec(
            bits=act["bits"],
            symmetric=bool(act["symmetric"]),
            scale_dtype=torch.float32,
            symmetric_range=method.get("symmetric_range"),
        )
        return ActivationQuant(spec=spec, mode=act["mode"])


@contextmanager
def _config_key(prefix: str) -> Iterator[None]:
    """Name the config section a spec's error comes from (QuantSpec knows its fields, not their keys)."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{prefix}: {e}") from e


def check_granularity(method: Mapping) -> None:
    granularity, group_size = method["granularity"], method["group_size"]
    if granularity not in GRANULARITIES:
        raise ValueError(f"method.granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if granularity != "group" and group_size is not None:
        raise ValueError(
            f"method.group_size={group_size} only applies to granularity=group "
            f"(this method is {granularity}); also set method.granularity=group"
        )


# -- algorithms --------------------------------------------------------------------------------
@dataclass
class QuantizedWeight:
    """What an algorithm decides for one layer; QuantLinear stores it."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None


def _rtn(weight, spec, block, _inputs, _options) -> QuantizedWeight:
    scale, zero = choose_qparams(weight, spec, block)
    return QuantizedWeight(quantize(weight, scale, zero, spec, block), scale, zero)


def _gptq(weight, spec, block, inputs: LayerInputs, options) -> QuantizedWeight:
    hessian = inputs.hessian.hessian
    if inputs.input_multiplier is not None:  # inputs were recorded before a rescaling x -> x * m
        m = inputs.input_multiplier.double()
        hessian = hessian * m[:, None] * m[None, :]
    # The column sweep is thousands of small ops, where threads only add overhead (measured on a
    # 1536x576 layer with another process on the cores: 0.5 s on one thread, 14 s on two).
    with torch_threads(1):
        codes, scale, zero = gptq_quantize(
            weight,
            hessian,
            spec,
            block,
            damp=float(options["damp"]),
            block=int(options["block"]),
            act_order=bool(options["act_order"]),
        )
    return QuantizedWeight(codes, scale, zero)


def _hqq(weight, spec, block, _inputs, options) -> QuantizedWeight:
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


def _lowrank(weight, spec, block, _inputs, options) -> QuantizedWeight:
    codes, scale, zero, a, b = lowrank_quantize(
        weight, spec, block, rank=int(options["rank"]), iters=int(options["iters"])
    )
    return QuantizedWeight(codes, scale, zero, (a, b))


# name -> (function, needs calibration inputs with a Hessian). Each reads its options from
# method.<name> (e.g. method.gptq.damp).
ALGORITHMS: dict[str, tuple[Callable, bool]] = {
    "rtn": (_rtn, False),
    "gptq": (_gptq, True),
    "hqq": (_hqq, False),
    "lowrank": (_lowrank, False),
}


def check_algorithm(method: Mapping) -> None:
    name = method["algorithm"]
    if name not in ALGORITHMS:
        raise ValueError(f"unknown method.algorithm {name!r}; available: none, {', '.join(ALGORITHMS)}")
    if name != "rtn" and not method.get(name):
        raise ValueError(f"method.algorithm={name} needs its options under method.{name}")


def describe_algorithm(method: Mapping) -> str:
    """What really picks the weights, step by step, e.g. ``awq_scales+clip+gptq(act_order)``.

    ``method.algorithm`` names only the code-choosing step; AWQ's scales and QAT's training run
    before it whenever their options are set, and a QAT-trained layer is rounded on its learned grid.
    """
    name = method["algorithm"]
    if name == "none":
        return "none"
    steps = []
    if method.get("train"):
        train = method["train"]
        steps.append(f"qat({'lsq' if train['learnable_scale'] else 'minmax'},{train['loss']})")
        name = "rtn"  # FakeQuantLinear layers are packed by rounding on their trained grid
    if method.get("awq"):
        steps.append("awq_scales+clip" if method["awq"]["clip"] else "awq_scales")
    if name == "gptq":
        steps.append("gptq(act_order)" if method["gptq"]["act_order"] else "gptq")
    elif name == "lowrank":
        steps.append(f"lowrank(rank={method['lowrank']['rank']})+rtn")  # RTN of the residual W - A·B
    else:
        steps.append(name)
    return "+".join(steps)


def is_sequential(method: Mapping) -> bool:
    """GPTQ and AWQ calibrate block by block on the partly quantized model."""
    return ALGORITHMS[method["algorithm"]][1] or bool(method.get("awq"))


def needs_calibration(method: Mapping) -> bool:
    act = method.get("activations")
    if method["algorithm"] == "none":
        return False
    return bool(act and act["mode"] == "static") or is_sequential(method) or bool(method.get("train"))


def layer_method(method: Mapping, name: str) -> Mapping:
    """The method as it applies to one layer: the first matching ``layer_overrides`` entry wins."""
    for entry in method.get("layer_overrides") or []:
        if "pattern" not in entry:
            raise ValueError(f"each method.layer_overrides entry needs a 'pattern' (a regex), got {entry}")
        if re.fullmatch(entry["pattern"], name):
            return {**method, **{k: v for k, v in entry.items() if k != "pattern"}}
    return method


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _quantize_layer(
    model: nn.Module,
    name: str,
    module: nn.Module,
    method: Mapping,
    kernels: str,
    inputs: LayerInputs | None = None,
    act_stats: ActivationStats | None = None,
    input_scale: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
) -> LayerRecord:
    """Replace one layer by its QuantLinear; ``reference`` is the original float weight (out, in)."""
    method = layer_method(method, name)
    spec, act = weight_spec(method), activation_quant(method)
    weight = float_weight(module).float()
    if isinstance(module, FakeQuantLinear):  # trained by QAT: it carries its own grid
        block, result = module.block_size, QuantizedWeight(*converted(module))
    else:
        block = block_size_for(weight.shape, method["granularity"], method["group_size"])
        function, _ = ALGORITHMS[method["algorithm"]]
        result = function(weight, spec, block, inputs, method.get(method["algorithm"]) or {})
    act_scale = act_zero = None
    if act is not None and act.mode == "static":
        options = method["activations"]
        act_scale, act_zero = activation_qparams(
            act_stats, act.spec, options["observer"], options.get("percentile", 99.99)
        )
    qlayer = QuantLinear(
        result.codes,
        result.scale,
        result.zero,
        spec,
        block,
        getattr(module, "bias", None),
        act,
        act_scale,
        kernels,
        lowrank=result.lowrank,
        input_scale=input_scale,
        activation_zero_point=act_zero,
    )
    reference = weight if reference is None else reference
    error = (qlayer.effective_weight() - reference).norm() / reference.norm().clamp_min(1e-12)
    _set_module(model, name, qlayer)
    return LayerRecord(
        layer=name,
        shape=str(tuple(weight.shape)),
        quantized=True,
        reason="selected",
        bits=spec.bits,
        granularity=method["granularity"],
        block_size=str(block),
        grid=qlayer.grid,
        rel_error=float(error),
        kernel=qlayer.kernel,
        kernel_note=qlayer.kernel_note,
        weight_bytes=qlayer.weight_bytes,
        kernel_cache_bytes=qlayer.kernel_cache_bytes,
    )


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    method: Mapping,
    layers_cfg: Mapping,
    stats: Mapping[str, ActivationStats] | None = None,
    kernels: str = "auto",
    calibration: torch.Tensor | None = None,
) -> list[LayerRecord]:
    """Replace the selected layers of ``model`` in place; return the per-layer table.

    ``stats`` (activation statistics of the float model) serve static activation quantization;
    ``calibration`` (token batches) serves the block-by-block algorithms (GPTQ, AWQ).
    """
    selected, kept = select_layers(model, layers_cfg, check_coverage=method["algorithm"] != "none")
    records = [
        LayerRecord(layer=m.name, shape=str(m.shape), quantized=False, reason=kept[m.name])
        for m in weight_matrices(model)
        if m.name in kept
    ]
    if method["algorithm"] == "none":
        records += [
            LayerRecord(layer=n, shape=str(tuple(float_weight(m).shape)), quantized=False, reason="method fp")
            for n, m in selected.items()
        ]
        return records
    check_algorithm(method)
    for name in selected:
        weight_spec(layer_method(method, name))
        check_granularity(layer_method(method, name))
    check_group_size(method, selected)
    act = method.get("activations")
    if act and act["mode"] == "static" and stats is None:
        raise ValueError("static activation quantization needs calibration statistics")
    if is_sequential(method) and calibration is None:
        raise ValueError(f"method {method['name']} calibrates block by block and needs calibration batches")

    if not is_sequential(method):
        for name, module in selected.items():
            records.append(_quantize_layer(model, name, module, method, kernels, act_stats=(stats or {}).get(name)))
    else:
        awq_options = method.get("awq")

        def quantize_block(block_name: str, inputs: Mapping[str, LayerInputs], _state) -> None:
            block = model.get_submodule(block_name)
            originals = {n: float_weight(selected[n]).float().clone() for n in inputs}
            scales = {}
            if awq_options:
                spec = weight_spec(method)
                scales = apply_awq(
                    block, block_name, inputs, spec, method["granularity"], method["group_size"], awq_options
                )
            for name, layer_inputs in inputs.items():
                s, folded = scales.get(name, (None, True))
                reference = originals[name]
                if s is not None:
                    layer_inputs.input_multiplier = 1 / s  # the scaled weight now reads x / s
                    reference = reference * s if folded else reference
                records.append(
                    _quantize_layer(
                        model,
                        name,
                        selected[name],
                        method,
                        kernels,
                        inputs=layer_inputs,
                        act_stats=(stats or {}).get(name),
                        input_scale=None if folded else (1 / s).to(torch.float16),
                        reference=reference,
                    )
                )

        run_blocks(
            model,
            list(selected),
            calibration,
            quantize_block,
            hessian=True,  # GPTQ's Hessian; AWQ scores candidates through the same X^T X
        )
    kernels_used = sorted({r.kernel for r in records if r.kernel})
    log.info("quantized %d layers (%s)", len(selected), ", ".join(kernels_used))
    return records
