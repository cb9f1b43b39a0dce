"""``aten._weight_int8pack_mm``: int8 weights with one scale per output row, bf16 activations.

With fp32 inputs the op takes a slow path (measured 10-40x slower), so inputs are cast to bf16.
"""

from __future__ import annotations

import torch

from pipeline.quant.kernels.base import LayerTensors


class AtenInt8WeightOnly:
    name = "aten_int8_weight_only"
    devices = ("cpu",)

    def supports(self, layer: LayerTensors) -> str | None:
        if layer.activation is not None:
            return "weight-only kernel; this layer quantizes activations"
        if layer.spec.bits != 8 or not layer.spec.symmetric:
            return "needs symmetric 8-bit weights"
        if not layer.per_row:
            return "needs one scale per output row"
        return None

    def describe(self, layer: LayerTensors) -> str:
        return "bf16 activations"

    def prepare(self, layer: LayerTensors) -> dict:
        row_scale = layer.scale_per_row_group(layer.in_features).reshape(-1)
        return {"weight": layer.codes().to(torch.int8), "row_scale": row_scale.to(torch.bfloat16)}

    def run(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), state["weight"], state["row_scale"])
