"""Export to GGUF (llama.cpp) through the ``gguf`` package, for the grids that map onto GGML types.

Block 32 along the input, fp16 scales; our codes copied, never re-quantized:
- int8 symmetric -> Q8_0: ``d * q``, the same product as ours: exact.
- int4 symmetric -> Q4_0: ``d * (q - 8)`` with q = our code + 8: exact.
- int4 asymmetric (integer or float zero point z) -> Q4_1: ``d * q + m`` with d = scale, m = -z * scale
  rounded to fp16: codes and scales exact; the offset carries fp16 rounding (at most half an fp16 ulp
  of |m|, measured and checked on read-back).
A block wider than 32 (group 64, per channel, per tensor) repeats its scale over its 32-blocks.
Anything else is refused with the closest GGML type and the note that it would re-quantize.
llama.cpp orders the rows of q_proj/k_proj per head differently from transformers (rotary halves
interleaved); those rows are permuted as llama.cpp's own converter does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.export.layers import Layer

FORMAT = "gguf"
BLOCK = 32
MAPS = (
    "int8 symmetric -> Q8_0, int4 symmetric -> Q4_0, int4 asymmetric -> Q4_1; block width a multiple of 32, fp16 scales"
)
CLOSEST = {2: "Q2_K", 3: "Q3_K", 4: "Q4_1", 5: "Q5_1", 6: "Q6_K", 7: "Q8_0", 8: "Q8_0"}


def ggml_type(layer: Layer) -> tuple[str | None, str]:
    """(GGML type name, "") when the layer maps, else (None, why, with the closest type)."""
    entry = layer.entry
    bits, closest = layer.bits, CLOSEST.get(layer.bits, "Q8_0")
    would = f"closest GGML type {closest}, which would re-quantize"
    if entry["type"] != "QuantLinear":
        return None, f"a {entry['type']} module ({would})"
    if {"lowrank_a", "lowrank_b"} & layer.tensors:
        return None, f"low-rank factors (merging them changes the weights off the grid: {would})"
    if "input_scale" in layer.tensors:
        return None, f"an unfolded activation-aware input scale ({would})"
    if entry["activation"] is not None:
        return None, f"quantized activations (GGUF holds weights only; {would})"
    if entry["spec"]["scale_dtype"] != "float16":
        return None, f"{entry['spec']['scale_dtype']} scales (GGML stores fp16: {would})"
    if entry["block_size"][1] % BLOCK:
        return None, f"blocks {tuple(entry['block_size'])} not a multiple of {BLOCK} wide ({would})"
    if bits == 8 and layer.symmetric:
        return "Q8_0", ""
    if bits == 4:
        return ("Q4_0" if layer.symmetric else "Q4_1"), ""
    return None, f"int{bits} {'sym' if layer.symmetric else 'asym'} ({would})"


def refusal(layers: list[Layer]) -> str | None:
    if not layers:
        return "the model has no quantized layers"
    bad = [(layer, why) for layer in layers for kind, why in [ggml_type(layer)] if kind is None]
    if not bad:
        return None
    layer, why = bad[0]
    return (
        f"{FORMAT} cannot hold {len(bad)} of {len(layers)} layers exactly (e.g. {layer.name}: {why}); it holds: {MAPS}"
    )


def types(layers: list[Layer]) -> list[str]:
    """The GGML types a mappable model is written with, e.g. ["Q4_0"]."""
    return sorted({ggml_type(layer)[0] for layer in layers})


def _blocks(module, kind: str) -> np.ndarray:
    """The layer's GGML blocks, (rows, n_blocks * bytes per block) uint8, from our codes and scales."""
    from pipeline.quant.kernels.base import LayerTensors

    tensors: LayerTensors = module.tensors()
    rows, cols = module.out_features, module.in_features
    codes = module.codes().numpy().reshape(rows, cols // BLOCK, BLOCK)
    scale = tensors.scale_per_row_group(BLOCK).to(torch.float16).numpy()[..., None]  # (rows, nb, 1)
    d = scale.view(np.uint8)
    if kind == "Q8_0":
        body = codes.astype(np.int8).view(np.uint8)
        return np.concatenate([d, body], axis=-1).reshape(rows, -1)
    q = (codes + 8 if kind == "Q4_0" else codes).astype(np.uint8)  # unsigned nibbles
    nibbles = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << np.uint8(4))
    if kind == "Q4_0":
        return np.concatenate([d, nibbles], axis=-1).reshape(rows, -1)
    zero = tensors.unsigned_zero_per_row_group(BLOCK).numpy()[..., None]
    m = (-(zero * scale.astype(np.float32))).astype(np.float16).view(np.uint8)
    return np.concatenate([d, m, nibbles], axis=-1).reshape(rows, -1)


def _row_order(name: str, rows: int, config) -> np.ndarray | None:
    """llama.cpp's row order for q_proj / k_proj (its converter's ``permute``), None for other layers."""
    heads = {"q_proj": config.num_attention_heads, "k_proj": getattr(config, "num_key_value_heads", None)}
    kind = name.rsplit(".", 1)[-1]
    if kind not in heads:
        return None
    n_head = heads[kind] or config.num_attention_heads
    index = np.arange(rows)
    return index.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _arch(config):
    import gguf

    names = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    if config.model_type != "llama" or "llama" not in names:
        raise ValueError(
            f"GGUF export writes llama-architecture metadata; this model is {config.model_type!r} (supported: llama)"
        )
    return names["llama"]


def write(model: nn.Module, layers: list[Layer], path: Path, tokenizer_gguf: Path | None = None) -> dict[str, str]:
    """Write ``model`` to the GGUF file ``path``; return {tensor name in the file: GGML type}.

    ``tokenizer_gguf``: a GGUF whose ``tokenizer.*`` keys are copied (llama.cpp needs a tokenizer;
    the embedded model's own GGUF has one). Without it the file holds weights and architecture only.
    """
    import gguf

    why = refusal(layers)
    if why is not None:
        raise ValueError(why)
    config = model.config
    arch = _arch(config)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(getattr(config, "_name_or_path", "") or "quantbench export")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", config.num_attention_heads))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_vocab_size(config.vocab_size)
    if tokenizer_gguf is not None:
        _copy_tokenizer(writer, tokenizer_gguf)

    from pipeline.checkpoint.store import model_tensors

    quantized = {layer.name: layer for layer in layers}
    tensors, _aliases = model_tensors(model)  # a tied lm_head is left out: llama.cpp reuses token_embd
    written: dict[str, str] = {}
    float_types = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    for name, tensor in tensors.items():
        module_name = name.rpartition(".")[0]
        if module_name in quantized and not name.endswith(".bias"):
            if not name.endswith(".packed"):
                continue  # scales, zero points: inside the GGML blocks
            module = model.get_submodule(module_name)
            kind = ggml_type(quantized[module_name])[0]
            blocks = _blocks(module, kind)
            order = _row_order(module_name, module.out_features, config)
            if order is not None:
                blocks = blocks[order]
            out_name = _gguf_name(name_map, module_name + ".weight")
            writer.add_tensor(
                out_name,
                np.ascontiguousarray(blocks),  # (rows, bytes): gguf derives (rows, in_features) from the type
                raw_dtype=gguf.GGMLQuantizationType[kind],
            )
        else:
            kind = float_types[tensor.dtype]
            data = tensor.float().numpy() if kind == "BF16" else tensor.numpy()
            if kind == "BF16":
                data = tensor.view(torch.int16).numpy().view(np.uint16)
            out_name = _gguf_name(name_map, name)
            writer.add_tensor(out_name, np.ascontiguousarray(data), raw_dtype=gguf.GGMLQuantizationType[kind])
        written[out_name] = kind
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def _gguf_name(name_map, name: str) -> str:
    base, _, suffix = name.rpartition(".")
    mapped = name_map.get_name(base)
    if mapped is None:
        raise ValueError(f"no GGUF tensor name for {name}")
    return f"{mapped}.{suffix}"


def _copy_tokenizer(writer, source: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(source))
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            item = field.types[-1]
            if item == gguf.GGUFValueType.STRING:
                values = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                values = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_array(field.name, values)
        elif kind == gguf.GGUFValueType.STRING:
            writer.add_string(field.name, bytes(field.parts[field.data[0]]).decode("utf-8"))
        else:
            writer.add_key_value(field.name, field.parts[field.data[0]].tolist()[0], kind)


def read_back(path: Path, model: nn.Module, layers: list[Layer]) -> dict[str, float]:
    """Read the file with gguf's reader, dequantize every tensor, compare to ``model``'s weights.

    Returns the largest absolute difference per GGML type (0.0 where exact); raises if a tensor is
    missing or off by more than the fp16 rounding of Q4_1's offset.
    """
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(_arch(config), config.num_hidden_layers)
    quantized = {layer.name for layer in layers}
    from pipeline.checkpoint.store import model_tensors

    tensors, _ = model_tensors(model)
    expected: dict[str, tuple[torch.Tensor, float]] = {}
    for name, tensor in tensors.items():
        module_name = name.rpartition(".")[0]
        if module_name in quantized and not name.endswith(".bias"):
            if name.endswith(".packed"):
                module = model.get_submodule(module_name)
                weight = module.dequantized_weight()
                order = _row_order(module_name, module.out_features, config)
                weight = weight[torch.as_tensor(order)] if order is not None else weight
                zero = module.tensors().unsigned_zero_per_row_group(BLOCK)
                offset = (zero * module.tensors().scale_per_row_group(BLOCK)).abs().max().item()
                # Q4_1: m = -z*s rounded to fp16 (half an ulp: 2**-11 relative) plus the fp32 sum's rounding
                bound = 0.0 if module.spec.symmetric else offset * 2**-11 + weight.abs().max().item() * 2**-23 * 2
                expected[_gguf_name(name_map, module_name + ".weight")] = (weight, bound)
        else:
            expected[_gguf_name(name_map, name)] = (tensor.float(), 0.0)
    reader = gguf.GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ValueError(f"{path} lacks tensors {missing[:5]}")
    worst: dict[str, float] = {}
    for name, (weight, bound) in expected.items():
        t = found[name]
        kind = t.tensor_type.name
        if kind == "BF16":
            values = torch.from_numpy(np.array(t.data).view(np.int16).copy()).view(torch.bfloat16).float()
        else:
            values = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        values = values.reshape(weight.shape)
        diff = (values - weight).abs().max().item() if weight.numel() else 0.0
        if diff > bound:
            raise ValueError(f"{path}: {name} ({kind}) reads back off by {diff:.3g} (allowed {bound:.3g})")
        worst[kind] = max(worst.get(kind, 0.0), diff)
    return worst
