"""The kernel registry: every way to compute a QuantLinear, in order of preference.

``select`` picks, per layer, the first registered kernel that computes the stored layout exactly;
``dequant`` (unpack, dequantize, float matmul on every call) takes what no real kernel does, and
the layer's note says why each real kernel declined. A new kernel is one file with a class that
follows ``base.Kernel``, plus a line in ``REGISTRY``.
"""

from __future__ import annotations

from pipeline.quant.kernels.aten_int4 import AtenInt4Groupwise
from pipeline.quant.kernels.aten_int8 import AtenInt8WeightOnly
from pipeline.quant.kernels.base import NOT_BUILT, Kernel, LayerTensors
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
    DEQUANT,
]
BY_NAME: dict[str, Kernel] = {k.name: k for k in REGISTRY}
PREFERENCES = ("auto", *BY_NAME)


def select(layer: LayerTensors, preference: str = "auto") -> tuple[Kernel, str]:
    """(kernel, note) for this layer: the first that fits (``auto``) or the one named.

    A named kernel that cannot compute the layer is an error, never a quiet fallback.
    """
    if preference not in PREFERENCES:
        raise ValueError(f"kernels must be one of {', '.join(PREFERENCES)}, got {preference!r}")
    if preference != "auto":
        kernel = BY_NAME[preference]
        reason = kernel.supports(layer)
        if reason is not None:
            raise ValueError(f"kernels={preference} cannot compute a {layer.spec.describe()} layer: {reason}")
        return kernel, kernel.describe(layer)
    declined, unbuilt = [], []
    for kernel in REGISTRY:
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


__all__ = ["BY_NAME", "DEQUANT", "NOT_BUILT", "PREFERENCES", "REGISTRY", "Kernel", "LayerTensors", "select"]
