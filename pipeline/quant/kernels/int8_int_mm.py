"""``torch._int_mm``: int8 x int8 -> int32 GEMM for W8A8, static or dynamic activations.

Asymmetric activations are exact in integers: y = s_x s_w (q_x - z_x) . q_w
= s_x s_w ((q_x - 128) . q_w - (z_x - 128) * sum_k q_w), with uint8 codes shifted into int8.
"""

from __future__ import annotations

import torch

from pipeline.quant.activation import quantize_activation
from pipeline.quant.kernels.base import LayerTensors


def w8a8_layout_refusal(layer: LayerTensors) -> str | None:
    """Why a layer is not W8A8 as the integer kernels take it (8-bit activations, symmetric 8-bit
    weights with one scale per output row), or None."""
    act = layer.activation
    if act is None or act.spec.bits != 8:
        return "needs 8-bit activations"
    if layer.spec.bits != 8 or not layer.spec.symmetric or not layer.per_row:
        return "needs symmetric 8-bit weights with one scale per output row"
    return None


class Int8IntMM:
    name = "int8_int_mm"
    devices = ("cpu", "cuda")

    def supports(self, layer: LayerTensors) -> str | None:
        return w8a8_layout_refusal(layer)

    def describe(self, layer: LayerTensors) -> str:
        act = layer.activation
        zero = "symmetric" if act.spec.symmetric else "asymmetric (zero point folded in integers)"
        return f"int8 x int8 GEMM, {act.mode} {zero} activations"

    def prepare(self, layer: LayerTensors) -> dict:
        codes = layer.codes()
        state = {
            # _int_mm wants the (in, out) operand; contiguous so that each call copies nothing.
            "weight": codes.to(torch.int8).t().contiguous(),
            "row_scale": layer.scale_per_row_group(layer.in_features).reshape(-1),
            "activation": layer.activation,
            "activation_scale": layer.activation_scale,
            "activation_zero_point": layer.activation_zero_point,
        }
        if not layer.activation.spec.symmetric:
            state["weight_code_sums"] = codes.sum(dim=1, dtype=torch.int32)  # sum_k q_w[n, k]
        return state

    def run(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        q, x_scale, x_zero, _block = quantize_activation(
            x, state["activation"], state["activation_scale"], state["activation_zero_point"]
        )
        if x_zero is None:
            acc = torch._int_mm(q, state["weight"])
        else:
            shifted = (q.to(torch.int16) - 128).to(torch.int8)
            acc = torch._int_mm(shifted, state["weight"]) - (x_zero.to(torch.int32) - 128) * state["weight_code_sums"]
        return acc.float() * x_scale.float() * state["row_scale"]
