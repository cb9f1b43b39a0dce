"""``aten._weight_int4pack_mm_for_cpu``: 4-bit weights in groups of 32..256, bf16 activations.

Needs out_features a multiple of 16 and in_features a multiple of 32. Per-channel and per-tensor
scales are replicated to the widest kernel group that tiles the row.
"""

from __future__ import annotations

import torch

from pipeline.quant.kernels.base import LayerTensors

GROUP_SIZES = (32, 64, 128, 256)


def _group(layer: LayerTensors) -> int | None:
    """The kernel group size that represents this layer's blocks exactly, if any."""
    cols = layer.block_size[1]
    if cols in GROUP_SIZES:
        return cols
    if cols == layer.in_features:
        fitting = [g for g in GROUP_SIZES if layer.in_features % g == 0]
        return max(fitting) if fitting else None
    return None


class AtenInt4Groupwise:
    name = "aten_int4_groupwise"
    devices = ("cpu",)

    def supports(self, layer: LayerTensors) -> str | None:
        if layer.activation is not None:
            return "weight-only kernel; this layer quantizes activations"
        if layer.spec.bits != 4:
            return "4-bit only"
        if layer.out_features % 16 or layer.in_features % 32:
            return "needs out_features % 16 == 0 and in_features % 32 == 0"
        if _group(layer) is None:
            return f"block width {layer.block_size[1]} is not one of the kernel's groups {GROUP_SIZES}"
        return None

    def describe(self, layer: LayerTensors) -> str:
        group = _group(layer)
        note = f"bf16 activations, kernel groups of {group}"
        return note + (" (scales replicated)" if group != layer.block_size[1] else "")

    def prepare(self, layer: LayerTensors) -> dict:
        group = _group(layer)
        scale = layer.scale_per_row_group(group)
        unsigned = layer.codes() + layer.offset
        # The kernel computes (q_u - 8) * scale + zero_float with unsigned codes q_u in [0, 15].
        zero_float = (8 - layer.unsigned_zero_per_row_group(group)) * scale
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned.to(torch.int32), 1)
        scales_and_zeros = torch.stack([scale, zero_float], dim=-1).transpose(0, 1).contiguous()
        return {"packed": packed, "scales_and_zeros": scales_and_zeros.to(torch.bfloat16), "group": group}

    def run(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), state["packed"], state["group"], state["scales_and_zeros"]
        )
