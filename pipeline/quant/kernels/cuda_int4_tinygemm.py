"""``aten._weight_int4pack_mm`` on CUDA (tinygemm): 4-bit weights in groups of 32..256, bf16 activations.

What it computes: per group, ``w = (q_u - 8) * scale + zero`` with unsigned codes ``q_u`` in
[0, 15] and ``scale``/``zero`` stored in bf16, dequantized to bf16 on the tensor cores' way in.
It equals our layer's weight rounded to bf16 (what the ``dequant`` path computes for a bf16 model)
only where ``scale`` and ``zero = (8 - z) * scale`` are bf16 numbers themselves: symmetric layers
(``zero`` = 0) with bf16-representable scales, and asymmetric ones whose zero terms happen to be.
Every other layer is declined with the reason (fp16 scales, the method default, usually are not:
use ``method.scale_dtype=bfloat16``).

Per shape: tinygemm is a GEMV-shaped kernel (stock int4 on an H200 measured 1.5-1.85x faster than
bf16 at batch 1 and 7-14x slower at batch 128), so inputs with more than ``small_batch_rows`` rows
(``kernel_small_batch_rows`` in the config) run dequantize + bf16 GEMM instead; the layer's note
says which ran at which row count. Untested on a GPU in this repository's history: the CPU tests
cover selection and layout, tests/test_cuda_kernels.py the numerics where CUDA exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.quant.kernels.aten_int4 import GROUP_SIZES, _group
from pipeline.quant.kernels.base import LayerTensors, dequantized

INNER_K_TILES = (8, 4, 2)  # the packing's k tiles of 16: the widest that divides in_features
DEFAULT_SMALL_BATCH_ROWS = 16
_settings = {"small_batch_rows": DEFAULT_SMALL_BATCH_ROWS}


def set_small_batch_rows(rows: int) -> None:
    """Inputs with at most ``rows`` rows (batch x tokens) run tinygemm; larger ones dequant + bf16 GEMM."""
    if int(rows) < 0:
        raise ValueError(f"kernel_small_batch_rows must be >= 0, got {rows}")
    _settings["small_batch_rows"] = int(rows)


def _bf16_exact(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.to(torch.bfloat16).float(), t.float()))


def _scales_and_zeros(layer: LayerTensors, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (out, in // group) scale and tinygemm's float zero ``(8 - z) * scale``."""
    scale = layer.scale_per_row_group(group)
    return scale, (8 - layer.unsigned_zero_per_row_group(group)) * scale


class CudaInt4Tinygemm:
    name = "cuda_int4_tinygemm"
    devices = ("cuda",)

    def supports(self, layer: LayerTensors) -> str | None:
        if layer.activation is not None:
            return "weight-only kernel; this layer quantizes activations"
        if layer.spec.bits != 4:
            return "4-bit only"
        if layer.out_features % 8 or layer.in_features % 32:
            return "needs out_features % 8 == 0 and in_features % 32 == 0"
        group = _group(layer)
        if group is None:
            return f"block width {layer.block_size[1]} is not one of the kernel's groups {GROUP_SIZES}"
        scale, zero = _scales_and_zeros(layer, group)
        if not _bf16_exact(scale):
            return f"scales ({layer.spec.scale_dtype}) are not bf16 numbers; the kernel stores bf16 scales"
        if not _bf16_exact(zero):
            return "zero terms (8 - z) * scale are not bf16 numbers; the kernel stores them in bf16"
        return None

    def describe(self, layer: LayerTensors) -> str:
        rows = _settings["small_batch_rows"]
        return (
            f"tinygemm int4, bf16 activations, kernel groups of {_group(layer)} (rows <= {rows}); "
            f"dequant + bf16 GEMM (rows > {rows})"
        )

    def prepare(self, layer: LayerTensors) -> dict:
        group = _group(layer)
        scale, zero = _scales_and_zeros(layer, group)
        unsigned = (layer.codes() + layer.offset).to(torch.uint8)
        nibbles = (unsigned[:, ::2] << 4) | unsigned[:, 1::2]  # [n][k / 2], even k in the high nibble
        tiles = next(t for t in INNER_K_TILES if layer.in_features % (t * 16) == 0)
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), tiles)
        # (k / group, n, 2): scale and zero of each (group, output row).
        scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return {
            "packed": packed,
            "scales_and_zeros": scales_and_zeros,
            "group": group,
            "stored_form": layer,  # for the large-batch path; its tensors are the buffers (not counted twice)
            "small_batch_rows": _settings["small_batch_rows"],
        }

    def run(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        if x.shape[0] <= state["small_batch_rows"]:
            return torch.ops.aten._weight_int4pack_mm(
                x.to(torch.bfloat16), state["packed"], state["group"], state["scales_and_zeros"]
            )
        return F.linear(x.to(torch.bfloat16), dequantized(state["stored_form"], torch.bfloat16))
