"""Activation quantization of a linear layer's input, through the same primitives as weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.quant.primitives import QuantSpec, choose_qparams, quantize


@dataclass(frozen=True)
class ActivationQuant:
    """Static per tensor (calibrated scale and zero point) or dynamic per token (block (1, features),
    chosen at run time)."""

    spec: QuantSpec
    mode: str  # "static" | "dynamic"

    def __post_init__(self) -> None:
        if self.mode not in ("static", "dynamic"):
            raise ValueError(f"activation mode must be 'static' or 'dynamic', got {self.mode!r}")
        if self.spec.zero_point_domain != "int":
            # The integer GEMM needs integer codes and zero points.
            raise ValueError(f"activation zero points must be integers, got {self.spec.zero_point_domain!r}")

    def describe(self) -> str:
        return f"{self.spec.describe()} {'per-tensor static' if self.mode == 'static' else 'per-token dynamic'}"


def quantize_activation(
    x: torch.Tensor,
    act: ActivationQuant,
    static_scale: torch.Tensor | None = None,
    static_zero: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, int]]:
    """(codes, scale, zero point, block size) of a 2-D input: int8 codes when symmetric, uint8 when
    asymmetric; the calibrated (scale, zero) per tensor (static) or one per row (dynamic)."""
    x = x.float()
    if act.mode == "static":
        block = tuple(x.shape)
        scale, zero = static_scale, static_zero
    else:
        block = (1, x.shape[1])
        scale, zero = choose_qparams(x, act.spec, block)
    return quantize(x, scale, zero, act.spec, block), scale, zero, block
