"""The fallback: unpack and dequantize the stored weight, then a float matmul, on every call."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.quant.activation import quantize_activation
from pipeline.quant.kernels.base import LayerTensors, dequantized
from pipeline.quant.primitives import dequantize


class Dequant:
    name = "dequant"
    devices = ("cpu", "cuda")

    def supports(self, layer: LayerTensors) -> str | None:
        return None

    def describe(self, layer: LayerTensors) -> str:
        if layer.activation is not None:
            return "dequantize + float matmul per call, activations fake-quantized"
        return "dequantize + float matmul per call"

    def prepare(self, layer: LayerTensors) -> dict:
        return {"layer": layer}  # the stored tensors themselves: nothing extra is kept

    def run(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        layer: LayerTensors = state["layer"]
        if layer.activation is not None:
            q, scale, zero, block = quantize_activation(
                x, layer.activation, layer.activation_scale, layer.activation_zero_point
            )
            x = dequantize(q, scale, zero, block, x.dtype)
        return F.linear(x, dequantized(layer, x.dtype))
