"""``lowbit_cpu``: our fused C++ kernel (csrc/lowbit_cpu.cpp) on the stored packed codes, 2/3/4/8 bits.

It reads ``LayerTensors.packed`` itself (no repacking): the only extra bytes are the scales and
zero points expanded to float32 (out, in / group). Built by ``pipeline.quant.kernels.cpp`` (make
setup); where it is not built, the kernel declines every layer with "not built: <compiler error>"
and those layers run the next registered kernel (2/3-bit ones: ``dequant``).
"""

from __future__ import annotations

import torch

from pipeline.quant.kernels import cpp
from pipeline.quant.kernels.base import NOT_BUILT, LayerTensors

BITS = (2, 3, 4, 8)


class LowbitCpu:
    name = "lowbit_cpu"
    devices = ("cpu",)

    def supports(self, layer: LayerTensors) -> str | None:
        if layer.activation is not None:
            return "weight-only kernel; this layer quantizes activations"
        if layer.spec.bits not in BITS:
            return f"{layer.spec.bits}-bit weights; the kernel takes {', '.join(map(str, BITS))} bits"
        if layer.in_features % 8:
            return f"in_features {layer.in_features} is not a multiple of 8"
        if layer.block_size[1] % 8:
            return f"block width {layer.block_size[1]} is not a multiple of 8"
        built = cpp.build("lowbit_cpu")
        if not built.ok:
            return f"{NOT_BUILT}: {built.error}"
        return None

    def describe(self, layer: LayerTensors) -> str:
        group = "per-row scales" if layer.per_row else f"groups of {layer.block_size[1]}"
        isa = cpp.build("lowbit_cpu").isa
        return f"fused {layer.spec.bits}-bit GEMV/GEMM on packed codes, {isa}, fp32 accumulate, {group}"

    def prepare(self, layer: LayerTensors) -> dict:
        group = layer.block_size[1]
        return {
            # looked up here, once: the op itself is what torch.compile traces (through its fake)
            "op": cpp.ops("lowbit_cpu").linear.default,  # raises where the kernel is not built
            "packed": layer.packed,  # the stored tensor itself: the kernel decodes it in place
            "scale": layer.scale_per_row_group(group),
            "zero": layer.unsigned_zero_per_row_group(group),
            "bits": layer.spec.bits,
            "n": layer.out_features,
            "k": layer.in_features,
            "group": group,
        }

    def run(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        return state["op"](
            x.contiguous(),
            state["packed"],
            state["bits"],
            state["n"],
            state["k"],
            state["group"],
            state["scale"],
            state["zero"],
        )
