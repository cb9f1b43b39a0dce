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

from pipeline.calibrate import ActivationStats, observe_range
from pipeline.quant.linear import ActivationQuant, QuantLinear
from pipeline.quant.primitives import QuantSpec, block_size_for, choose_qparams, quantize

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
    )


def activation_quant(method: Mapping) -> ActivationQuant | None:
    act = method.get("activations")
    if not act:
        return None
    spec = QuantSpec(bits=act["bits"], symmetric=bool(act["symmetric"]), scale_dtype=torch.float32)
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
        common = math.gcd(*in_features.values())
        raise ValueError(
            f"group_size {group_size} does not divide in_features {k} of layer {name} "
            f"({len(bad)} layers affected); group sizes that fit every selected layer: "
            f"{', '.join(map(str, _divisors(common)))}"
        )


# -- layer selection ---------------------------------------------------------------------------
def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):  # GPT-2 style: weight is (in, out)
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def _float_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever layer type holds it."""
    w = module.weight.detach()
    return w.t().contiguous() if isinstance(module, Conv1D) else w


def select_layers(model: nn.Module, cfg: Mapping) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Linear layers to quantize, and the reason each other linear layer is kept."""
    include = [re.compile(p) for p in cfg["include"]]
    exclude = [re.compile(p) for p in cfg["exclude"]]
    lm_head = model.get_output_embeddings()
    selected, kept = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        if module is lm_head and not cfg["quantize_lm_head"]:
            kept[name] = "lm_head kept (layers.quantize_lm_head=false)"
        elif module is not lm_head and not any(p.fullmatch(name) for p in include):
            kept[name] = "not matched by layers.include"
        elif any(p.fullmatch(name) for p in exclude):
            kept[name] = "matched by layers.exclude"
        else:
            selected[name] = module
    if not selected:
        raise ValueError(
            f"no layer matches layers.include={list(cfg['include'])}; linear layers of this model "
            f"are named like: {', '.join(list(kept)[:5])}"
        )
    return selected, kept


# -- algorithms --------------------------------------------------------------------------------
# An algorithm maps (float weight (out, in), spec, block_size, calibration stats or None) to
# (codes, scale, zero_point). RTN is the baseline; calibration-driven algorithms register here.
Algorithm = Callable[[torch.Tensor, QuantSpec, tuple, ActivationStats | None], tuple]


def rtn(weight: torch.Tensor, spec: QuantSpec, block_size: tuple, _stats: ActivationStats | None) -> tuple:
    scale, zero = choose_qparams(weight, spec, block_size)
    return quantize(weight, scale, zero, spec, block_size), scale, zero


ALGORITHMS: dict[str, Algorithm] = {"rtn": rtn}


def needs_calibration(method: Mapping) -> bool:
    act = method.get("activations")
    return bool(act and act["mode"] == "static")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    method: Mapping,
    layers_cfg: Mapping,
    stats: Mapping[str, ActivationStats] | None = None,
    kernels: str = "auto",
) -> list[LayerRecord]:
    """Replace the selected layers of ``model`` in place; return the per-layer table."""
    selected, kept = select_layers(model, layers_cfg)
    records = [
        LayerRecord(layer=n, shape=str(tuple(_float_weight(m).shape)), quantized=False, reason=r)
        for n, m in model.named_modules()
        if (r := kept.get(n))
    ]
    if method["algorithm"] == "none":
        records += [
            LayerRecord(layer=n, shape=str(tuple(_float_weight(m).shape)), quantized=False, reason="method fp")
            for n, m in selected.items()
        ]
        return records
    if method["algorithm"] not in ALGORITHMS:
        raise ValueError(f"unknown method.algorithm {method['algorithm']!r}; available: {', '.join(ALGORITHMS)}")
    spec, act = weight_spec(method), activation_quant(method)
    check_granularity(method)
    check_group_size(method, selected)
    if needs_calibration(method) and stats is None:
        raise ValueError("static activation quantization needs calibration statistics")
    algorithm = ALGORITHMS[method["algorithm"]]
    for name, module in selected.items():
        weight = _float_weight(module).float()
        block = block_size_for(weight.shape, method["granularity"], method["group_size"])
        codes, scale, zero = algorithm(weight, spec, block, None if stats is None else stats.get(name))
        act_scale = None
        if act is not None and act.mode == "static":
            clip = observe_range(
                stats[name], act.spec, method["activations"]["observer"], method["activations"].get("percentile", 99.99)
            )
            act_scale = torch.tensor(max(clip, 1e-8) / act.spec.qmax)
        bias = getattr(module, "bias", None)
        qlayer = QuantLinear(codes, scale, zero, spec, block, bias, act, act_scale, kernels)
        error = (qlayer.dequantized_weight() - weight).norm() / weight.norm().clamp_min(1e-12)
        _set_module(model, name, qlayer)
        records.append(
            LayerRecord(
                layer=name,
                shape=str(tuple(weight.shape)),
                quantized=True,
                reason="selected",
                bits=spec.bits,
                granularity=method["granularity"],
                block_size=str(block),
                rel_error=float(error),
                kernel=qlayer.kernel,
                kernel_note=qlayer.kernel_note,
                weight_bytes=qlayer.weight_bytes,
                kernel_cache_bytes=qlayer.kernel_cache_bytes,
            )
        )
    log.info("quantized %d layers (%s)", len(selected), ", ".join(sorted({r.kernel for r in records if r.kernel})))
    return records
