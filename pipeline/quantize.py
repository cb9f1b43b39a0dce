"""Quantize stage: turn the method config into specs, replace the selected layers (``pipeline.layers``).

A method is data: bits, symmetry, granularity, group size, zero-point domain, scale dtype,
optional activation quantization, and an ordered list of steps (``method.steps``, ``pipeline.steps``):
the block steps run inside the block-by-block calibration pass, then the codes step picks each
layer's integer codes (the model steps, e.g. QAT's training, have run before: ``run.quantize_stage``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline import steps as step_registry
from pipeline.algorithms.awq import INPUT_SCALE_DTYPE
from pipeline.algorithms.sequential import LayerInputs, block_output, run_blocks
from pipeline.calibrate import ActivationStats, activation_qparams
from pipeline.kept import describe_kept, keep_dtype, store_kept
from pipeline.layers import (
    WeightMatrix,
    check_group_size,
    embedding_modules,
    float_weight,
    select_layers,
    set_module,
    weight_matrices,
)
from pipeline.quant.embedding import QuantEmbedding
from pipeline.quant.linear import ActivationQuant, QuantLinear
from pipeline.quant.primitives import QuantSpec, block_size_for
from pipeline.steps import BlockContext, BlockStep, ModelResult
from pipeline.train import FixedGrid

log = logging.getLogger(__name__)

GRANULARITIES = ("per_tensor", "per_channel", "group")
EMBEDDING_GRANULARITIES = ("per_channel", "group")  # one scale per row, or per group of a row
EMBEDDING_KEYS = {"bits", "symmetric", "granularity", "group_size"}
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
    dtype: str | None = None  # how a kept (unquantized) matrix is stored, e.g. "bfloat16"

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


@dataclass(frozen=True)
class EmbeddingQuant:
    """``layers.embeddings``: how the input embedding and the lm_head are quantized (round to nearest)."""

    spec: QuantSpec
    granularity: str
    group_size: int | None

    def block_size(self, shape: tuple[int, int]) -> tuple[int, int]:
        return block_size_for(shape, self.granularity, self.group_size)


def embedding_quant(layers_cfg: Mapping) -> EmbeddingQuant | None:
    """``layers.embeddings`` as a spec, checked without a model; None keeps them in ``layers.keep_dtype``."""
    cfg = layers_cfg.get("embeddings")
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        raise ValueError(
            "layers.embeddings must be null or a mapping like {bits: 8, symmetric: true, granularity: per_channel}, "
            f"got {cfg!r}"
        )
    unknown, missing = set(cfg) - EMBEDDING_KEYS, {"bits", "symmetric", "granularity"} - set(cfg)
    if unknown or missing:
        raise ValueError(
            f"layers.embeddings takes {', '.join(sorted(EMBEDDING_KEYS))} (group_size only with granularity=group); "
            f"unknown: {sorted(unknown) or 'none'}, missing: {sorted(missing) or 'none'}"
        )
    granularity, group_size = cfg["granularity"], cfg.get("group_size")
    if granularity not in EMBEDDING_GRANULARITIES:
        raise ValueError(
            f"layers.embeddings.granularity must be one of {', '.join(EMBEDDING_GRANULARITIES)}, got {granularity!r}"
        )
    if (granularity == "group") != (group_size is not None):
        raise ValueError(
            f"layers.embeddings.group_size goes with granularity=group and only with it "
            f"(granularity={granularity}, group_size={group_size})"
        )
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"layers.embeddings.group_size must be a positive integer, got {group_size!r}")
    if not isinstance(cfg["symmetric"], bool):
        raise ValueError(f"layers.embeddings.symmetric must be true or false, got {cfg['symmetric']!r}")
    with _config_key("layers.embeddings"):
        spec = QuantSpec(bits=cfg["bits"], symmetric=cfg["symmetric"])
    return EmbeddingQuant(spec, granularity, group_size)


def check_storage(layers_cfg: Mapping) -> None:
    """``layers.keep_dtype`` and ``layers.embeddings``, checked before any work."""
    if "quantize_lm_head" in layers_cfg:  # removed: a +layers.quantize_lm_head=... must not pass unread
        raise ValueError(
            "layers.quantize_lm_head is gone: the lm_head (with the input embedding, a tied table once) is "
            "quantized by layers.embeddings, e.g. layers.embeddings={bits:8,symmetric:true,granularity:per_channel}"
        )
    keep_dtype(layers_cfg["keep_dtype"])
    embedding_quant(layers_cfg)


def check_embeddings(model: nn.Module, layers_cfg: Mapping) -> None:
    """That ``layers.embeddings`` fits this model's embedding table (group size, whole-byte rows)."""
    options = embedding_quant(layers_cfg)
    if options is None:
        return
    embed = embedding_modules(model).input
    if embed is None:
        raise ValueError("layers.embeddings is set but this model has no input embedding (get_input_embeddings)")
    dim = embed.weight.shape[1]
    if options.group_size is not None and dim % options.group_size:
        raise ValueError(
            f"layers.embeddings.group_size {options.group_size} does not divide the embedding dimension {dim}"
        )
    if dim * options.spec.bits % 8:
        raise ValueError(
            f"layers.embeddings.bits={options.spec.bits}: a row of {dim} codes is not a whole number of bytes, "
            "so rows could not be looked up in the packed table; pick bits with embedding_dim * bits % 8 == 0"
        )
    if getattr(embed, "max_norm", None) is not None:
        raise ValueError("the input embedding renormalizes rows (max_norm): a quantized table cannot do that")
    scaled = isinstance(embed, nn.Embedding) and isinstance(getattr(embed, "embed_scale", None), torch.Tensor)
    if type(embed) is not nn.Embedding and not scaled:
        raise ValueError(
            f"the input embedding is a {type(embed).__name__}, whose lookup QuantEmbedding does not reproduce "
            "(it knows nn.Embedding and HF's scaled embeddings with an embed_scale); set layers.embeddings=null"
        )


def layer_method(method: Mapping, name: str) -> Mapping:
    """The method as it applies to one layer: the first matching ``layer_overrides`` entry wins."""
    for entry in method.get("layer_overrides") or []:
        if "pattern" not in entry:
            raise ValueError(f"each method.layer_overrides entry needs a 'pattern' (a regex), got {entry}")
        if re.fullmatch(entry["pattern"], name):
            return {**method, **{k: v for k, v in entry.items() if k != "pattern"}}
    return method


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
    timings: dict[str, float] | None = None,
    grid: FixedGrid | None = None,
) -> LayerRecord:
    """Replace one layer by its QuantLinear; ``reference`` is the original float weight (out, in).

    ``grid``: the layer's grid fixed by an earlier step (QAT's trained one, reconstruction's learned
    one), which the codes step rounds onto. ``timings`` gets the seconds of the codes step (or of its
    own parts) and of packing (``pack``) added."""
    timings = {} if timings is None else timings
    method = layer_method(method, name)
    spec, act = weight_spec(method), activation_quant(method)
    weight = float_weight(module).float()
    codes_step = step_registry.codes_step(method)
    options, own, start = step_registry.options_of(method, codes_step), {}, time.perf_counter()
    if grid is not None:
        block = grid.block_size
        result = codes_step.run(weight, spec, block, inputs, options, own, grid=grid)
    else:
        block = block_size_for(weight.shape, method["granularity"], method["group_size"])
        result = codes_step.run(weight, spec, block, inputs, options, own)
    _add(timings, own or {codes_step.timing or codes_step.name: time.perf_counter() - start})
    start = time.perf_counter()
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
    _add(timings, {"pack": time.perf_counter() - start})
    reference = weight if reference is None else reference
    error = (qlayer.effective_weight() - reference).norm() / reference.norm().clamp_min(1e-12)
    set_module(model, name, qlayer)
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


def _add(timings: dict[str, float], new: Mapping[str, float]) -> None:
    for key, seconds in new.items():
        timings[key] = timings.get(key, 0.0) + seconds


def _activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations flow in: the one the model was loaded in (its first floating parameter's)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _kept_records(matrices: list[WeightMatrix], kept: Mapping[str, str]) -> list[LayerRecord]:
    """Rows for the matrices left float, read once they are stored (dtype and bytes as stored; tied once)."""
    records, first = [], {}
    for m in matrices:
        ptr = m.tensor.data_ptr()
        tied_to = first.setdefault(ptr, m.name)
        stored_once = tied_to != m.name
        records.append(
            LayerRecord(
                layer=m.name,
                shape=str(m.shape),
                quantized=False,
                reason=kept[m.name] + (f" (tied to {tied_to}: stored once, counted there)" if stored_once else ""),
                weight_bytes=0 if stored_once else m.tensor.numel() * m.tensor.element_size(),
                dtype=str(m.tensor.dtype).removeprefix("torch."),
                kernel=getattr(m.module, "kernel", None),  # a kept linear layer's decode path (pipeline.kept)
            )
        )
    return records


def _embedding_record(
    name: str,
    module: QuantLinear | QuantEmbedding,
    options: EmbeddingQuant,
    error: torch.Tensor,
    reason: str,
    stored: bool,
) -> LayerRecord:
    is_linear = isinstance(module, QuantLinear)
    shape = (module.out_features, module.in_features) if is_linear else (module.num_embeddings, module.embedding_dim)
    return LayerRecord(
        layer=name,
        shape=str(shape),
        quantized=True,
        reason=reason,
        bits=options.spec.bits,
        granularity=options.granularity,
        block_size=str(module.block_size),
        grid=module.grid,
        rel_error=float(error),
        kernel=module.kernel if is_linear else None,
        kernel_note=module.kernel_note if is_linear else "gathers the looked-up rows' codes and dequantizes those rows",
        weight_bytes=module.weight_bytes if stored else 0,
        kernel_cache_bytes=module.kernel_cache_bytes if is_linear else 0,
    )


def _relative_error(approx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (approx - weight).norm() / weight.norm().clamp_min(1e-12)


def quantize_embeddings(
    model: nn.Module, options: EmbeddingQuant, kernels: str, activation_dtype: torch.dtype
) -> list[LayerRecord]:
    """Quantize the input embedding (a QuantEmbedding) and the lm_head (a QuantLinear, so a real kernel
    where one fits) by round to nearest on ``options``' grid; a tied table once, both sharing it."""
    found = embedding_modules(model)
    tied = found.tied
    records, head = [], None
    if found.output is not None:
        if not isinstance(found.output, nn.Linear):
            raise ValueError(f"layers.embeddings: the lm_head is a {type(found.output).__name__}, not an nn.Linear")
        weight = found.output.weight.detach().float()
        block = options.block_size(tuple(weight.shape))
        head = QuantLinear.from_float(weight, options.spec, block, found.output.bias, kernel_preference=kernels)
        set_module(model, found.output_name, head)
        tie_note = f" (tied with {found.input_name}: quantized once, stored once, counted here)" if tied else ""
        error = _relative_error(head.effective_weight(), weight)
        records.append(_embedding_record(found.output_name, head, options, error, "layers.embeddings" + tie_note, True))
    if found.input is not None:
        weight = found.input.weight.detach().float()
        block = options.block_size(tuple(weight.shape))
        embed_scale = getattr(found.input, "embed_scale", None)
        kwargs = {"output_dtype": activation_dtype, "embed_scale": None if embed_scale is None else float(embed_scale)}
        if tied:
            embed = QuantEmbedding.sharing(head, **kwargs)
        else:
            embed = QuantEmbedding.from_float(weight, options.spec, block, **kwargs)
        set_module(model, found.input_name, embed)
        reason = f"layers.embeddings (tied: {found.output_name}'s stored tensors)" if tied else "layers.embeddings"
        error = _relative_error(embed.dequantized_weight(), weight)
        records.append(_embedding_record(f"{found.input_name}.weight", embed, options, error, reason, not tied))
    return records


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    method: Mapping,
    layers_cfg: Mapping,
    stats: Mapping[str, ActivationStats] | None = None,
    kernels: str = "auto",
    calibration: torch.Tensor | None = None,
    timings: dict[str, float] | None = None,
    offload: Mapping | None = None,
    prepared: ModelResult | None = None,
    metrics: dict[str, float] | None = None,
) -> list[LayerRecord]:
    """Replace the selected layers of ``model`` in place; return the per-layer table.

    Runs the method's block steps and codes step (``method.steps``); its model steps must have run
    before, their result passed as ``prepared`` (``run.quantize_stage`` does both).
    Then, unless the method is ``fp`` (the model stays as loaded): the embeddings are quantized by
    ``layers.embeddings`` if set, and every other parameter is stored in ``layers.keep_dtype``.
    ``stats`` (activation statistics of the float model) serve static activation quantization;
    ``calibration`` (token batches) serves the block-by-block steps (GPTQ, AWQ), which keep
    the blocks not being calibrated where ``offload`` says (``{weights: none|cpu|disk, folder}``).
    ``timings`` gets the seconds of each step added (e.g. ``hessian``, ``sweep``, ``awq_search``,
    ``lowrank``, ``pack``, ``block_forward``: the block-by-block passes that record the inputs);
    ``metrics`` the block steps' metrics, each averaged over the blocks (e.g. ``reconstruct_mse_ratio``).
    ``prepared.input_scales``: explicit per-input-channel multipliers (SmoothQuant's unfoldable scales) of
    layers whose float weight already reads x * multiplier; round-to-nearest-style algorithms only.
    """
    timings = {} if timings is None else timings
    check_storage(layers_cfg)
    step_registry.check_steps(method)
    steps = step_registry.method_steps(method)
    selected, kept = select_layers(model, layers_cfg, check_coverage=bool(steps))
    kept_matrices = [m for m in weight_matrices(model) if m.name in kept]
    if not steps:
        return _kept_records(kept_matrices, kept) + [
            LayerRecord(layer=n, shape=str(tuple(float_weight(m).shape)), quantized=False, reason="method fp")
            for n, m in selected.items()
        ]
    check_embeddings(model, layers_cfg)
    store_dtype, embeddings = keep_dtype(layers_cfg["keep_dtype"]), embedding_quant(layers_cfg)
    activation_dtype = _activation_dtype(model)
    model_steps = [s.name for s in steps if s.kind == "model"]
    if model_steps and prepared is None:
        raise ValueError(
            f"method {method['name']} starts with model steps {model_steps} that quantize_model does not run: "
            "run them first (run.quantize_stage does) and pass their result as prepared"
        )
    fixed = prepared.fixed_grid_layers if prepared is not None else frozenset()
    if prepared is not None and prepared.layer_overrides:  # a step's choice (allocate); the method's own win
        method = {**method, "layer_overrides": [*(method.get("layer_overrides") or []), *prepared.layer_overrides]}
    for name in selected:
        weight_spec(layer_method(method, name))
        check_granularity(layer_method(method, name))
    check_group_size(method, selected)
    act = method.get("activations")
    if act and act["mode"] == "static" and stats is None:
        raise ValueError("static activation quantization needs calibration statistics")
    input_scales = prepared.input_scales if prepared is not None else {}
    if input_scales and step_registry.is_sequential(method):
        raise ValueError("explicit input_scales are for round-to-nearest-style algorithms, not block-by-block ones")
    if step_registry.is_sequential(method) and calibration is None:
        raise ValueError(f"method {method['name']} calibrates block by block and needs calibration batches")

    records: list[LayerRecord] = []
    # Each layer leaves ``selected`` as it is replaced, so its float weights are freed right then, not
    # when the whole model is done (the model no longer holds them once its QuantLinear is in place).
    if not step_registry.is_sequential(method):
        for name in list(selected):
            module = selected.pop(name)
            multiplier = (input_scales or {}).get(name)
            records.append(
                _quantize_layer(
                    model,
                    name,
                    module,
                    method,
                    kernels,
                    act_stats=(stats or {}).get(name),
                    input_scale=multiplier,
                    # the function the layer computed: its weight reads x * multiplier
                    reference=None if multiplier is None else float_weight(module).float() * multiplier.float(),
                    timings=timings,
                    grid=module.fixed_grid() if name in fixed else None,
                )
            )
            del module
    else:
        block_steps = [s for s in steps if isinstance(s, BlockStep)]
        block_metrics: dict[str, list[float]] = {}

        in_blocks = 0.0  # seconds inside quantize_block: the rest of run_blocks is its forward passes

        target_kind = step_registry.target_kind(method)

        def quantize_block(
            block_name: str, inputs: Mapping[str, LayerInputs], state: list, float_outputs: list | None
        ) -> None:
            nonlocal in_blocks
            start = time.perf_counter()
            block = model.get_submodule(block_name)
            # the float weights before the block steps change them, for the layer table's error
            # (without block steps the layer's own weight serves, and no copy is held)
            originals = {n: float_weight(selected[n]).float().clone() for n in inputs} if block_steps else {}
            targets = float_outputs  # target_kind "float": the float model's own path (run_blocks)
            if target_kind == "block":  # the float block's outputs on these inputs, before any step changes it
                targets = [block_output(block, hidden, kwargs) for hidden, kwargs in state]
            specs = {}
            for name in inputs:
                own = layer_method(method, name)
                shape = tuple(float_weight(selected[name]).shape)
                specs[name] = (weight_spec(own), block_size_for(shape, own["granularity"], own["group_size"]))
            scales: dict[str, tuple[torch.Tensor, bool]] = {}
            grids: dict[str, FixedGrid] = {}
            for step in block_steps:
                step_start = time.perf_counter()
                multipliers = {n: (1 / s).to(torch.float16) for n, (s, folded) in scales.items() if not folded}
                context = BlockContext(
                    block, block_name, inputs, method, weight_spec(method), specs, state, targets, multipliers
                )
                result = step.run(context)
                _add(timings, {step.timing or step.name: time.perf_counter() - step_start})
                twice = sorted(set(result.rescaled) & set(scales))
                if twice:  # two input rescalings of one layer would need composing, which no step does yet
                    raise ValueError(f"block step {step.name} rescales {twice[0]}'s input a second time")
                scales.update(result.rescaled)
                grids.update(result.grids)
                for key, value in result.metrics.items():
                    block_metrics.setdefault(key, []).append(value)
            del targets
            for name, layer_inputs in inputs.items():
                grid = grids.get(name) or (selected[name].fixed_grid() if name in fixed else None)
                s, folded = scales.get(name, (None, True))
                reference = originals.pop(name, None)
                if s is not None:
                    layer_inputs.input_multiplier = 1 / s  # the scaled weight now reads x / s
                    reference = reference * s if folded else reference
                records.append(
                    _quantize_layer(
                        model,
                        name,
                        selected.pop(name),
                        method,
                        kernels,
                        inputs=layer_inputs,
                        act_stats=(stats or {}).get(name),
                        input_scale=None if folded else (1 / s).to(INPUT_SCALE_DTYPE),
                        reference=reference,
                        timings=timings,
                        grid=grid,
                    )
                )
            in_blocks += time.perf_counter() - start

        start = time.perf_counter()
        run_blocks(
            model,
            list(selected),  # names only: the modules leave ``selected`` block by block
            calibration,
            quantize_block,
            hessian=True,  # GPTQ's Hessian; AWQ scores candidates through the same X^T X
            float_path=target_kind == "float",
            offload=(offload or {}).get("weights", "none"),
            folder=(offload or {}).get("folder"),
        )
        _add(timings, {"block_forward": time.perf_counter() - start - in_blocks})
        if metrics is not None:
            metrics.update({key: sum(values) / len(values) for key, values in block_metrics.items()})
    if embeddings is not None:
        records += quantize_embeddings(model, embeddings, kernels, activation_dtype)
        quantized_names = {r.layer for r in records}
        kept_matrices = [m for m in kept_matrices if m.name not in quantized_names]
    store_kept(model, store_dtype, activation_dtype)
    kernels_used = sorted({r.kernel for r in records if r.kernel})
    log.info("quantized %d layers (%s); kept: %s", len(records), ", ".join(kernels_used), describe_kept(model))
    return _kept_records(kept_matrices, kept) + records
