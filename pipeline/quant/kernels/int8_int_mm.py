"""``torch._int_mm``: int8 x int8 -> int32 GEMM for W8A8, static or dynamic activations.

On CUDA ``_int_mm`` rejects inputs of 16 rows or fewer and wants k and n multiples of 8: small
inputs are padded with zero rows to ``CUDA_MIN_ROWS`` after quantization, and the padding's output
rows dropped (rows are independent, so this is exact).

Asymmetric activations are exact in integers: y = s_x s_w (q_x - z_x) . q_w
= s_x s_w ((q_x - 128) . q_w - (z_x - 128) * sum_k q_w), with uint8 codes shifted into int8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.quant.activation import quantize_activation
from pipeline.quant.kernels.base import LayerTensors

CUDA_MIN_ROWS = 24  # > 16 and a multiple of 8


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
        refusal = w8a8_layout_refusal(layer)
        if refusal is None and layer.packed.device.type == "cuda" and (layer.in_features % 8 or layer.out_features % 8):
            return "on CUDA needs in_features and out_features multiples of 8"
        return refusal

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
        if x_zero is not None:
            q = (q.to(torch.int16) - 128).to(torch.int8)
        acc = _int_mm(q, state["weight"])
        if x_zero is not None:
            acc = acc - (x_zero.to(torch.int32) - 128) * state["weight_code_sums"]
        return acc.float() * x_scale.float() * state["row_scale"]


def _int_mm(q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm``, with the rows CUDA needs padded with zero codes and dropped after."""
    rows = q.shape[0]
    if q.is_cuda and (rows <= 16 or rows % 8):
        padded = max(CUDA_MIN_ROWS, -(-rows // 8) * 8)
        return torch._int_mm(F.pad(q, (0, 0, 0, padded - rows)), weight)[:rows]
    return torch._int_mm(q, weight)
