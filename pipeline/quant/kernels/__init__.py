"""The kernel registry: every way to compute a QuantLinear, in order of preference.

``select`` picks, per layer, the first registered kernel that computes the stored layout exactly;
``dequant`` (unpack, dequantize, float matmul on every call) takes what no real kernel does, and
the layer's note says why each real kernel declined. A kernel runs only on the device types it
names (``devices``): the layer's device is where its stored tensors are. A new kernel is one file with a class that
follows ``base.Kernel``, plus a line in ``REGISTRY``.
"""

from __future__ import annotations

import torch

from pipeline.quant.kernels.aten_int4 import AtenInt4Groupwise
from pipeline.quant.kernels.aten_int8 import AtenInt8WeightOnly
from pipeline.quant.kernels.base import NOT_BUILT, Kernel, LayerTensors
from pipeline.quant.kernels.cuda_int4_tinygemm import (
    DEFAULT_SMALL_BATCH_ROWS,
    CudaInt4Tinygemm,
    set_small_batch_rows,
)
from pipeline.quant.kernels.dequant import Dequant
from pipeline.quant.kernels.int8_cpu import Int8Cpu
from pipeline.quant.kernels.int8_int_mm import Int8IntMM
from pipeline.quant.kernels.lowbit_cpu import LowbitCpu

DEQUANT = Dequant()
# Ours first: exact fp32 activations, and faster than the aten kernels on every measured shape
# (benchmarks/kernels.py); aten's take what ours decline.
REGISTRY: list[Kernel] = [
    Int8Cpu(),
    Int8IntMM(),
    LowbitCpu(),
    AtenInt8WeightOnly(),
    AtenInt4Groupwise(),
    CudaInt4Tinygemm(),
    DEQUANT,
]
BY_NAME: dict[str, Kernel] = {k.name: k for k in REGISTRY}
PREFERENCES = ("auto", *BY_NAME)


def device_refusal(kernel: Kernel, device: torch.device) -> str | None:
    """Why ``kernel`` cannot run on ``device`` (its type not in ``kernel.devices``), or None."""
    if device.type in kernel.devices:
        return None
    return f"runs on {'/'.join(kernel.devices)}, the layer is on {device.type}"


def _refusal(kernel: Kernel, layer: LayerTensors, device: torch.device) -> str | None:
    return device_refusal(kernel, device) or kernel.supports(layer)


def select(layer: LayerTensors, preference: str = "auto", device: torch.device | None = None) -> tuple[Kernel, str]:
    """(kernel, note) for this layer on ``device`` (default: where its stored tensors are): the first
    that fits (``auto``) or the one named.

    A named kernel that cannot compute the layer there is an error, never a quiet fallback.
    """
    if preference not in PREFERENCES:
        raise ValueError(f"kernels must be one of {', '.join(PREFERENCES)}, got {preference!r}")
    device = layer.packed.device if device is None else torch.device(device)
    if preference != "auto":
        kernel = BY_NAME[preference]
        reason = _refusal(kernel, layer, device)
        if reason is not None:
            raise ValueError(f"kernels={preference} cannot compute a {layer.spec.describe()} layer: {reason}")
        return kernel, kernel.describe(layer)
    declined, unbuilt = [], []
    for kernel in REGISTRY:
        if device_refusal(kernel, device) is not None:
            continue  # another device's kernel: not a reason worth a note
        reason = kernel.supports(layer)
        if reason is None:
            note = kernel.describe(layer)
            # The fallback says why every kernel declined; a real kernel, why a better one is missing.
            said = declined if kernel is DEQUANT else unbuilt
            if said:
                note += " (" + "; ".join(said) + ")"
            return kernel, note
        declined.append(f"{kernel.name}: {reason}")
        if reason.startswith(NOT_BUILT):
            unbuilt.append(declined[-1])
    raise AssertionError("dequant supports every layer")


__all__ = [
    "BY_NAME",
    "DEFAULT_SMALL_BATCH_ROWS",
    "DEQUANT",
    "NOT_BUILT",
    "PREFERENCES",
    "REGISTRY",
    "Kernel",
    "LayerTensors",
    "device_refusal",
    "select",
    "set_small_batch_rows",
]
