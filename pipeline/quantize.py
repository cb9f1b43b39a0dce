"""Quantize stage: choose the layers, turn the method config into specs, replace the layers.

A method is data: bits, symmetry, granularity, group size, zero-point domain, scale dtype,
optional activation quantization, and the algorithm that picks the integer codes (``rtn`` here;
algorithms that use calibration data plug into ``ALGORITHMS`` without touching this flow).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from pipeline.algorithms.awq import apply_awq
from pipeline.algorithms.gptq import gptq_quantize
from pipeline.algorithms.hqq import hqq_quantize
from pipeline.algorithms.lowrank import lowrank_quantize
from pipeline.algorithms.sequential import LayerInputs, run_blocks, text_decoder
from pipeline.calibrate import ActivationStats, activation_qparams
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
    spec = QuantSpec(
        bits=act["bits"],
        symmetric=bool(act["symmetric"]),
        scale_dtype=torch.float32,
        symmetric_range=method.get("symmetric_range"),
    )
    return ActivationQuant(spec=spec, mode=act["mode"])


def check_granularity(method: Mapping) -> None:
    granularity, group_size = method["granularity"], method["group_size"]
    if granularity not in GRANULARITIES:
        raise ValueError(f"method.granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if granularity != "group" and group_size is not None:
        raise ValueError(
            f"method.group_size={group_size} only applies to granularity=group "
            f"(this method is {granularity}); also set method.granularity=group"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(8, n + 1) if n % d == 0]


def check_group_size(method: Mapping, layers: Mapping[str, nn.Module]) -> None:
    """Fail before any work if the group size does not divide some selected layer's inputs."""
    if method["granularity"] != "group":
        return
    group_size = method["group_size"]
    in_features = {name: _in_out(m)[0] for name, m in layers.items()}
    bad = {name: k for name, k in in_features.items() if group_size is None or k % group_size}
    if bad:
        name, k = next(iter(bad.items()))
        raise ValueError(
            f"group_size {group_size} does not divide in_features {k} of layer {name} "
            f"({len(bad)} layers affected); group sizes that fit every selected layer: "
            f"{', '.join(map(str, valid_group_sizes(layers)))}"
        )


def valid_group_sizes(layers: Mapping[str, nn.Module]) -> list[int]:
    """Group sizes that divide the inputs of every layer in ``layers``."""
    return _divisors(math.gcd(*(_in_out(m)[0] for m in layers.values())))


# -- layer selection ---------------------------------------------------------------------------
def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):  # GPT-2 style: weight is (in, out)
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def float_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever layer type holds it."""
    w = module.weight.detach()
    return w.t().contiguous() if isinstance(module, Conv1D) else w


LINEAR_TYPES = (nn.Linear, Conv1D, FakeQuantLinear)  # what a QuantLinear can replace
SCOPES = ("text_decoder", "all")
KNOWING_EXCLUSION = "matched by layers.exclude"
FUSED_EXPERTS = "fused MoE experts (3-D parameter): no QuantLinear for it"


@dataclass
class WeightMatrix:
    """One weight matrix of a model: a linear layer, named by its module, with shape (out, in); or
    any other floating parameter of two or more dimensions, named by the parameter."""

    name: str
    module: nn.Module
    shape: tuple[int, ...]
    tensor: torch.Tensor | None  # the float tensor; None once the layer is a QuantLinear

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def weight_matrices(model: nn.Module) -> list[WeightMatrix]:
    """Every weight matrix of ``model`` (tied tensors appear once per module that holds them)."""
    matrices = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            matrices.append(WeightMatrix(name, module, (module.out_features, module.in_features), None))
        elif isinstance(module, LINEAR_TYPES):
            matrices.append(WeightMatrix(name, module, tuple(float_weight(module).shape), module.weight))
        else:
            for param_name, p in module.named_parameters(recurse=False):
                if p.dim() >= 2 and p.is_floating_point():
                    full = f"{name}.{param_name}" if name else param_name
                    matrices.append(WeightMatrix(full, module, tuple(p.shape), p))
    return matrices


def _inside(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _is_embedding(matrix: WeightMatrix, lm_head: nn.Module | None) -> bool:
    """Input or output embeddings: kept on purpose, so outside the coverage check."""
    return isinstance(matrix.module, nn.Embedding) or (lm_head is not None and matrix.module is lm_head)


def _not_linear_reason(matrix: WeightMatrix) -> str:
    if len(matrix.shape) == 3 and "expert" in f"{matrix.name} {type(matrix.module).__name__}".lower():
        return FUSED_EXPERTS
    return (
        f"{len(matrix.shape)}-D parameter of {type(matrix.module).__name__}, not a linear layer: no QuantLinear for it"
    )


def select_layers(
    model: nn.Module, cfg: Mapping, *, check_coverage: bool = True
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Linear layers to quantize, and why each other weight matrix stays float (name -> reason).

    Every weight matrix of the model is in one of the two (see ``weight_matrices``). With
    ``check_coverage``, a selection that would leave more than ``layers.max_unquantized_share`` of
    the text decoder's weights (embeddings and lm_head aside) float, other than by ``layers.exclude``,
    is refused before any work.
    """
    if cfg["scope"] not in SCOPES:
        raise ValueError(f"layers.scope must be one of {', '.join(SCOPES)}, got {cfg['scope']!r}")
    include = [re.compile(p) for p in cfg["include"]]
    exclude = [re.compile(p) for p in cfg["exclude"]]
    lm_head = _output_embeddings(model)
    decoder_name, _ = text_decoder(model)
    matrices = weight_matrices(model)
    selected, kept = {}, {}
    for matrix in matrices:
        name, module = matrix.name, matrix.module
        excluded = any(p.fullmatch(name) for p in exclude)
        if module is lm_head and not cfg["quantize_lm_head"]:
            kept[name] = "lm_head kept (layers.quantize_lm_head=false)"
        elif module is not lm_head and cfg["scope"] == "text_decoder" and not _inside(name, decoder_name):
            vision = re.search(r"vision|visual|image", name, re.IGNORECASE)
            kept[name] = "vision tower (outside the text decoder)" if vision else "outside the text decoder"
        elif isinstance(module, nn.Embedding):
            kept[name] = "embedding"
        elif not isinstance(module, LINEAR_TYPES):
            why = _not_linear_reason(matrix)
            kept[name] = f"{KNOWING_EXCLUSION} ({why})" if excluded else why
        elif excluded:  # before include: an explicit exclusion is the knowing reason
            kept[name] = KNOWING_EXCLUSION
        elif module is not lm_head and not any(p.fullmatch(name) for p in include):
            kept[name] = "not matched by layers.include"
        else:
            selected[name] = module
    if not selected:
        linear = [m.name for m in matrices if isinstance(m.module, LINEAR_TYPES)]
        raise ValueError(
            f"no layer matches layers.include={list(cfg['include'])}; linear layers of this model "
            f"are named like: {', '.join(linear[:5])}"
        )
    if check_coverage:
        _check_coverage(matrices, kept, decoder_name, lm_head, float(cfg["max_unquantized_share"]))
    return selected, kept


def _exclude_pattern(name: str) -> str:
    """A regex for ``name`` in every block: dots escaped, layer indices generalized to ``\\d+``."""
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))


def _check_coverage(
    matrices: list[WeightMatrix], kept: Mapping[str, str], decoder_name: str, lm_head: nn.Module | None, limit: float
) -> None:
    body = [m for m in matrices if _inside(m.name, decoder_name) and not _is_embedding(m, lm_head)]
    left_out = [m for m in body if m.name in kept and not kept[m.name].startswith(KNOWING_EXCLUSION)]
    total, unquantized = sum(m.numel for m in body), sum(m.numel for m in left_out)
    if not total or unquantized / total <= limit:
        return
    examples = "; ".join(f"{m.name} {m.shape}: {kept[m.name]}" for m in left_out[:3])
    patterns = ", ".join(f"'{p}'" for p in dict.fromkeys(_exclude_pattern(m.name) for m in left_out))
    raise ValueError(
        f"{unquantized / total:.0%} of the text decoder's weights (embeddings and lm_head aside; {unquantized:,} of "
        f"{total:,}) would stay unquantized, more than layers.max_unquantized_share={limit}: {len(left_out)} "
        f"matrices, e.g. {examples}. Linear layers can be added with layers.include; parameters without a "
        f"QuantLinear (e.g. fused MoE experts) cannot be quantized here. To run anyway, exclude them knowingly "
        f"(they are then listed as excluded and the figures say what share they cover): "
        f"layers.exclude=[{patterns}]"
    )


def coverage_metrics(model: nn.Module) -> dict[str, float]:
    """What share of the text decoder's weights the quantized layers (and so bits_per_weight) cover.

    ``quantized_weight_share`` counts every weight matrix of the text decoder, embeddings and
    lm_head included (tied tensors once); ``..._excl_embeddings`` leaves those out, as the check does.
    """
    decoder_name, _ = text_decoder(model)
    lm_head = _output_embeddings(model)
    seen: set[int] = set()
    total = quantized = body_total = body_quantized = 0
    for m in weight_matrices(model):
        if not (_inside(m.name, decoder_name) or (lm_head is not None and m.module is lm_head)):
            continue
        if m.tensor is not None:
            if m.tensor.data_ptr() in seen:
                continue
            seen.add(m.tensor.data_ptr())
        is_quantized = isinstance(m.module, QuantLinear)
        total += m.numel
        quantized += m.numel * is_quantized
        if not _is_embedding(m, lm_head):
            body_total += m.numel
            body_quantized += m.numel * is_quantized
    return {
        "quantized_weight_share": quantized / total if total else 0.0,
        "quantized_weight_share_excl_embeddings": body_quantized / body_total if body_total else 0.0,
        "unquantized_decoder_params": float(total - quantized),
    }


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
