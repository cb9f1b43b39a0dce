"""Export to compressed-tensors (the format vLLM and transformers load quantized checkpoints from).

What maps exactly, layer by layer:
- weight-only int4 / int8, groups along the input, per channel, or per tensor; symmetric, or
  asymmetric with an integer zero point -> ``pack-quantized`` (codes packed into int32,
  ``weight_scale``, ``weight_zero_point`` packed likewise, ``weight_shape``). compressed-tensors
  stores codes signed: ours (unsigned, zero point z) shift by 2**(bits-1) on both sides, so
  ``(q - z) * scale`` is unchanged.
- W8A8: int8 symmetric weights per channel with int8 symmetric activations, dynamic per token or
  static per tensor (full symmetric range) -> ``int-quantized`` (int8 ``weight``, ``weight_scale``,
  ``input_scale`` for static).
What does not map, and is refused: other widths (2, 3, 5-7 bits: vLLM's kernels serve 4 and 8),
float zero points, low-rank factors, explicit AWQ input scales, restricted-range activations.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.export.layers import Layer
from pipeline.kept import activation_dtype

FORMAT = "compressed-tensors"
MAPS = (
    "weight-only int4/int8 per group, per channel or per tensor, symmetric or asymmetric with an integer "
    "zero point; W8A8 int8 symmetric per-channel weights with int8 symmetric dynamic per-token or static "
    "per-tensor activations (full range)"
)
BITS = (4, 8)


def layer_refusal(layer: Layer) -> str | None:
    """Why this layer cannot be written exactly, or None."""
    entry = layer.entry
    if entry["type"] != "QuantLinear":
        return f"a {entry['type']} module"
    if layer.bits not in BITS:
        return f"{layer.bits}-bit weights"
    if not layer.symmetric and entry["spec"]["zero_point_domain"] != "int":
        return "a float zero point"
    if {"lowrank_a", "lowrank_b"} & layer.tensors:
        return "low-rank correction factors"
    if "input_scale" in layer.tensors:
        return "an explicit (unfolded) activation-aware input scale"
    act = entry["activation"]
    if act is not None:
        spec = act["spec"]
        if layer.bits != 8 or not layer.symmetric or tuple(entry["block_size"]) != (1, entry["in_features"]):
            return "quantized activations with weights other than int8 symmetric per channel"
        if spec["bits"] != 8 or not spec["symmetric"] or spec["symmetric_range"] != "full":
            return f"activations {spec['bits']}-bit {'sym' if spec['symmetric'] else 'asym'} {spec['symmetric_range']}"
    return None


def refusal(layers: list[Layer]) -> str | None:
    """None when every layer maps exactly, else a message naming what does not and what does."""
    if not layers:
        return "the model has no quantized layers"
    bad = [(layer, why) for layer in layers if (why := layer_refusal(layer)) is not None]
    if not bad:
        return None
    layer, why = bad[0]
    return f"{FORMAT} cannot hold {len(bad)} of {len(layers)} layers (e.g. {layer.name}: {why}); it holds: {MAPS}"


def _scheme(layer: Layer) -> dict:
    entry = layer.entry
    rows, cols = entry["block_size"]
    if cols != entry["in_features"]:
        strategy, group = "group", cols
    elif rows == 1:
        strategy, group = "channel", None
    else:
        strategy, group = "tensor", None
    weights = {
        "num_bits": layer.bits,
        "type": "int",
        "symmetric": layer.symmetric,
        "strategy": strategy,
        "group_size": group,
        "dynamic": False,
        "observer": "minmax",
    }
    act = entry["activation"]
    inputs = None
    if act is not None:
        static = act["mode"] == "static"
        inputs = {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "strategy": "tensor" if static else "token",
            "dynamic": not static,
            "observer": "minmax" if static else None,
        }
    if inputs is not None:
        fmt = "int-quantized"
    elif layer.symmetric:
        fmt = "pack-quantized"
    else:
        # transformers 5.24 + compressed-tensors 0.20.1 cannot load pack-quantized asymmetric weights:
        # the meta skeleton keeps the zero point unpacked (out, groups) while the file holds it packed,
        # and the load fails on the size mismatch. naive-quantized stores the same codes one per int8
        # and the zero point unpacked: exact, 2x the bytes of packed int4.
        fmt = "naive-quantized"
    return {"weights": weights, "input_activations": inputs, "output_activations": None, "format": fmt}


def quantization_config(layers: list[Layer], ignore: list[str]) -> dict:
    """config.json's ``quantization_config``: one config group per distinct scheme, targets by name."""
    groups: dict[str, dict] = {}
    for layer in layers:
        scheme = _scheme(layer)
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {**scheme, "targets": []})["targets"].append(layer.name)
    formats = {g["format"] for g in groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": group for i, group in enumerate(groups.values())},
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def layer_tensors(layer: Layer, module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one QuantLinear (module path prefix not included)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 2 ** (layer.bits - 1)
    signed = module.codes() + (0 if layer.symmetric else -offset)  # unsigned asym codes -> signed
    out = {"weight_scale": module.scale.to(dtype)}
    if _scheme(layer)["format"] == "pack-quantized":
        out["weight_packed"] = pack_to_int32(signed.to(torch.int8), layer.bits)
        out["weight_shape"] = torch.tensor([module.out_features, module.in_features])
    else:
        out["weight"] = signed.to(torch.int8)
    if not layer.symmetric:
        out["weight_zero_point"] = (module.zero_points().to(torch.int32) - offset).to(torch.int8)
    if module.activation_scale is not None:
        out["input_scale"] = module.activation_scale.reshape(1).to(dtype)
    if out["weight_scale"].shape == (1, 1):  # per tensor: compressed-tensors keeps one value
        out["weight_scale"] = out["weight_scale"].reshape(1)
    if module.bias is not None:
        out["bias"] = module.bias.to(dtype)
    return out


def write(model: torch.nn.Module, layers: list[Layer], folder: Path) -> None:
    """config.json (with quantization_config) and model.safetensors in ``folder`` (already created)."""
    from safetensors.torch import save_file

    from pipeline.checkpoint.store import model_tensors

    why = refusal(layers)
    if why is not None:
        raise ValueError(why)
    dtype = activation_dtype(model)
    quantized = {layer.name for layer in layers}
    tensors, _ = model_tensors(model)  # tied tensors once: transformers ties lm_head itself
    out = {n: t for n, t in tensors.items() if n.rpartition(".")[0] not in quantized}
    for layer in layers:
        module = model.get_submodule(layer.name)
        out.update({f"{layer.name}.{k}": v.contiguous() for k, v in layer_tensors(layer, module, dtype).items()})
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(layers, ignore=linear_names)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
