"""Real low-bit CPU kernels that exist in torch, and when each applies to a QuantLinear.

- ``aten_int8_weight_only``: ``aten._weight_int8pack_mm`` (int8 weights, per-row scales).
- ``aten_int4_groupwise``: ``aten._weight_int4pack_mm_for_cpu`` (4-bit, groups of 32..256,
  out_features a multiple of 16; per-channel/per-tensor scales are replicated to a group size).
- ``int8_int_mm``: ``torch._int_mm`` int8 x int8 -> int32 GEMM, for W8A8 (static or dynamic,
  symmetric or asymmetric activations; see ``run``).

The two aten weight-only kernels take bf16 activations: with fp32 inputs they run a slow path
(measured: 10-40x slower), so inputs are cast to bf16 and the layer's ``kernel`` name says so.
Everything else runs through ``dequant``: unpack, dequantize, fp32 matmul, on every call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pipeline.quant.linear import QuantLinear

INT4_GROUP_SIZES = (32, 64, 128, 256)


def _per_row(layer: QuantLinear) -> bool:
    """True when the layer has one scale per output row or one for the whole tensor."""
    return layer.block_size[1] == layer.in_features


def _int4_group(layer: QuantLinear) -> int | None:
    """The int4 kernel group size that represents this layer's blocks exactly, if any."""
    _block_rows, block_cols = layer.block_size
    if block_cols in INT4_GROUP_SIZES:
        return block_cols
    if block_cols == layer.in_features:  # per-channel / per-tensor: replicate the scale
        fitting = [g for g in INT4_GROUP_SIZES if layer.in_features % g == 0]
        return max(fitting) if fitting else None
    return None


def select(layer: QuantLinear) -> tuple[str, str]:
    """(kernel name, note) for the fastest real kernel that computes this layer exactly."""
    spec, act = layer.spec, layer.activation
    if act is not None:
        if spec.bits == 8 and spec.symmetric and _per_row(layer) and act.spec.bits == 8:
            zero = "symmetric" if act.spec.symmetric else "asymmetric (zero point folded in integers)"
            return "int8_int_mm", f"int8 x int8 GEMM, {act.mode} {zero} activations"
        return (
            "dequant",
            f"no W{spec.bits}A{act.spec.bits} kernel: dequantize + fp32 matmul, activations fake-quantized",
        )
    if spec.bits == 8 and spec.symmetric and _per_row(layer):
        return "aten_int8_weight_only", "bf16 activations"
    if spec.bits == 4 and layer.out_features % 16 == 0 and layer.in_features % 32 == 0:
        group = _int4_group(layer)
        if group is not None:
            note = f"bf16 activations, kernel groups of {group}"
            if group != layer.block_size[1]:
                note += " (scales replicated)"
            return "aten_int4_groupwise", note
    return "dequant", f"no {spec.bits}-bit CPU kernel for this layout: dequantize + fp32 matmul per call"


def prepare(name: str, layer: QuantLinear) -> dict[str, torch.Tensor]:
    """Build the kernel's own weight layout once, at construction."""
    if name == "dequant":
        return {}
    codes = layer.codes()
    scale = layer.scale.float()
    rows_per_block = layer.block_size[0]
    if name in ("aten_int8_weight_only", "int8_int_mm"):
        row_scale = scale.repeat_interleave(rows_per_block, dim=0).reshape(-1)
        dtype = torch.bfloat16 if name == "aten_int8_weight_only" else torch.float32
        weight = codes.to(torch.int8)
        # _int_mm wants the (in, out) operand; keep it contiguous so each call does no copy.
        if name == "aten_int8_weight_only":
            return {"weight": weight, "row_scale": row_scale.to(dtype)}
        state = {"weight": weight.t().contiguous(), "row_scale": row_scale.to(dtype)}
        if not layer.activation.spec.symmetric:
            # sum_k q_w[n, k]: the zero-point term of asymmetric activations, exact in int32.
            state["weight_code_sums"] = codes.sum(dim=1, dtype=torch.int32)
        return state
    if name == "aten_int4_groupwise":
        group = _int4_group(layer)
        n_groups = layer.in_features // group
        # Per-block params -> one per (row, kernel group); a kernel group never spans two blocks.
        per_group_scale = scale.repeat_interleave(rows_per_block, 0)
        per_group_scale = per_group_scale.repeat_interleave(n_groups // per_group_scale.shape[1], 1)
        zero = layer.zero_points()
        # The kernel computes (q_u - 8) * scale + zero_float with unsigned codes q_u in [0, 15].
        if layer.spec.symmetric:
            unsigned = codes + 8
            zero_float = torch.zeros_like(per_group_scale)
        else:
            unsigned = codes
            z = zero.float().repeat_interleave(rows_per_block, 0)
            z = z.repeat_interleave(n_groups // z.shape[1], 1)
            zero_float = (8 - z) * per_group_scale
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned.to(torch.int32), 1)
        scales_and_zeros = torch.stack([per_group_scale, zero_float], dim=-1).transpose(0, 1).contiguous()
        return {"packed": packed, "scales_and_zeros": scales_and_zeros.to(torch.bfloat16), "group": group}
    raise ValueError(f"unknown kernel {name!r}")


def run(name: str, layer: QuantLinear, x: torch.Tensor, state: dict) -> torch.Tensor:
    if name == "aten_int8_weight_only":
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), state["weight"], state["row_scale"])
    if name == "aten_int4_groupwise":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), state["packed"], state["group"], state["scales_and_zeros"]
        )
    if name == "int8_int_mm":
        q, x_scale, x_zero, _block = layer.quantize_input(x.float())
        if x_zero is None:
            acc = torch._int_mm(q, state["weight"])
        else:
            # y = s_x s_w (q_x - z_x) . q_w = s_x s_w ((q_x - 128) . q_w - (z_x - 128) * sum_k q_w): uint8
            # codes and zero points shifted into int8 for _int_mm; every term is an exact integer.
            shifted = (q.to(torch.int16) - 128).to(torch.int8)
            acc = torch._int_mm(shifted, state["weight"])
            acc = acc - (x_zero.to(torch.int32) - 128) * state["weight_code_sums"]
        return acc.float() * x_scale.float() * state["row_scale"]
    raise ValueError(f"unknown kernel {name!r}")
