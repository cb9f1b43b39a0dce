"""What a kernel is: a small unit that takes a layer's stored tensors and computes ``x @ W.T``.

A kernel says whether it computes a given weight layout exactly (``supports``), builds its own
layout once (``prepare``) and runs on 2-D inputs (``run``). It never sees the module: everything
it needs is in ``LayerTensors`` (the stored form) and the state it prepared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.quant.activation import ActivationQuant
from pipeline.quant.packing import unpack
from pipeline.quant.primitives import QuantSpec, dequantize


@dataclass(frozen=True)
class LayerTensors:
    """A quantized weight as stored: ``W ≈ (codes - zero_point) * scale`` per block.

    ``packed`` is the bit stream of unsigned codes (``pipeline.quant.packing``), row-major over
    (out_features, in_features); symmetric codes are stored shifted by ``offset`` = 2**(bits-1).
    ``zero_point`` is unpacked: uint8 (integer domain) or float, None when symmetric.
    """

    packed: torch.Tensor
    spec: QuantSpec
    out_features: int
    in_features: int
    block_size: tuple[int, int]
    scale: torch.Tensor  # (out // block_rows, in // block_cols)
    zero_point: torch.Tensor | None
    activation: ActivationQuant | None = None
    activation_scale: torch.Tensor | None = None  # static activations: (1, 1)
    activation_zero_point: torch.Tensor | None = None  # static asymmetric activations: (1, 1) uint8

    @property
    def offset(self) -> int:
        return 2 ** (self.spec.bits - 1) if self.spec.symmetric else 0

    @property
    def per_row(self) -> bool:
        """One scale per output row (or one for the whole tensor)."""
        return self.block_size[1] == self.in_features

    def codes(self) -> torch.Tensor:
        """Integer codes (int32, signed for symmetric specs) of shape (out, in)."""
        numel = self.out_features * self.in_features
        return (unpack(self.packed, self.spec.bits, numel) - self.offset).reshape(self.out_features, -1)

    def unsigned_zero_per_row_group(self, group: int) -> torch.Tensor:
        """The zero point of the unsigned stored codes, float, one per (row, group of ``group`` inputs):
        ``offset`` for symmetric layouts, the stored zero point otherwise."""
        scale = self.scale_per_row_group(group)
        if self.zero_point is None:
            return torch.full_like(scale, float(self.offset))
        return _per_row_group(self.zero_point.float(), self.block_size, group)

    def scale_per_row_group(self, group: int) -> torch.Tensor:
        """Scales as float32, one per (output row, group of ``group`` inputs); ``group`` must divide
        the block's width (a block wider than the group repeats its scale)."""
        return _per_row_group(self.scale.float(), self.block_size, group)


def _per_row_group(params: torch.Tensor, block_size: tuple[int, int], group: int) -> torch.Tensor:
    rows, cols = block_size
    if cols % group:
        raise ValueError(f"group {group} does not divide the block width {cols}")
    return params.repeat_interleave(rows, dim=0).repeat_interleave(cols // group, dim=1).contiguous()


# A ``supports`` reason that starts with this means the kernel fits the layout but could not be
# built on this machine: ``select`` reports it on whichever kernel runs instead.
NOT_BUILT = "not built"


class Kernel(Protocol):
    """One way to compute a quantized linear layer. Register it in ``pipeline.quant.kernels``."""

    name: str
    devices: tuple[str, ...]  # where it runs, e.g. ("cpu",)

    def supports(self, layer: LayerTensors) -> str | None:
        """None when this kernel computes the layer exactly, else why not (one short clause)."""

    def describe(self, layer: LayerTensors) -> str:
        """A note for the layer table: what the kernel does with this layer (dtypes, groups, batch range)."""

    def prepare(self, layer: LayerTensors) -> dict[str, torch.Tensor | int]:
        """The kernel's own layout, built once; its tensors are counted as ``kernel_cache_bytes``."""

    def run(self, x: torch.Tensor, state: dict[str, torch.Tensor | int]) -> torch.Tensor:
        """``x @ W.T`` for a 2-D float ``x`` (rows, in_features): (rows, out_features), any float dtype.

        ``state`` is what ``prepare`` returned; it may hold the stored tensors themselves (not
        copies), which are not counted twice."""


def dequantized(layer: LayerTensors, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (out, in) of the stored form, through the primitives."""
    return dequantize(layer.codes(), layer.scale, layer.zero_point, layer.block_size, dtype)
