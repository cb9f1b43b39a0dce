"""QuantEmbedding: an input embedding stored as packed integer codes with a scale (and zero) per row or group.

The stored form is the one QuantLinear keeps (``pipeline.quant.packing`` codes, scales in the spec's
dtype, integer zero points packed at the weight's width), so a tied embedding and lm_head share one
set of tensors: ``QuantEmbedding.sharing(lm_head)`` holds the lm_head QuantLinear's own buffers. A
lookup gathers only the looked-up rows' codes and dequantizes those rows.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.quant.linear import QuantLinear, spec_entry, spec_from_entry
from pipeline.quant.packing import pack, unpack
from pipeline.quant.primitives import QuantSpec, choose_qparams, dequantize, quantize


class QuantEmbedding(nn.Module):
    def __init__(
        self,
        packed: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        spec: QuantSpec,
        block_size: tuple[int, int],
        num_embeddings: int,
        embedding_dim: int,
        *,
        output_dtype: torch.dtype = torch.float32,
        embed_scale: float | None = None,
    ) -> None:
        """``packed``/``scale``/``zero_point`` in the stored form (zero points packed when integer).

        ``embed_scale``: a constant the looked-up rows are multiplied by (Gemma's scaled embeddings).
        """
        super().__init__()
        if block_size[0] != 1:
            raise ValueError(f"an embedding is quantized per row or per group of a row, got block_size {block_size}")
        if (embedding_dim * spec.bits) % 8:
            # Each row must start on a byte of the packed stream, so that a lookup slices whole rows.
            raise ValueError(
                f"embedding_dim {embedding_dim} x {spec.bits} bits is not a whole number of bytes: rows of the "
                f"packed codes cannot be gathered; use a bit width that makes embedding_dim * bits a multiple of 8"
            )
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.spec, self.block_size = spec, tuple(block_size)
        self.output_dtype, self.embed_scale = output_dtype, embed_scale
        self._offset = 2 ** (spec.bits - 1) if spec.symmetric else 0
        self._row_bytes = embedding_dim * spec.bits // 8
        self._groups = embedding_dim // block_size[1]
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)

    @classmethod
    def from_float(cls, weight: torch.Tensor, spec: QuantSpec, block_size: tuple[int, int], **kwargs) -> QuantEmbedding:
        """Round-to-nearest quantization of a float (num_embeddings, embedding_dim) table."""
        scale, zero = choose_qparams(weight, spec, block_size)
        codes = quantize(weight, scale, zero, spec, block_size).to(torch.int32)
        offset = 2 ** (spec.bits - 1) if spec.symmetric else 0
        if zero is not None and zero.dtype == torch.uint8:
            zero = pack(zero, spec.bits)
        return cls(pack(codes + offset, spec.bits), scale, zero, spec, block_size, *weight.shape, **kwargs)

    @classmethod
    def sharing(cls, lm_head: QuantLinear, **kwargs) -> QuantEmbedding:
        """The input embedding of a tied model: the lm_head's stored tensors themselves, not copies."""
        return cls(
            lm_head.packed,
            lm_head.scale,
            lm_head.zero_point,
            lm_head.spec,
            lm_head.block_size,
            lm_head.out_features,
            lm_head.in_features,
            **kwargs,
        )

    @property
    def weight_bytes(self) -> int:
        """Bytes of the stored table: packed codes + scales + zero points (shared tensors too)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero_point) if t is not None)

    @property
    def bytes_read_per_call(self) -> int:
        """What one token's lookup reads: its row's codes, scales and zero points (the decode floor)."""
        per_row = self._row_bytes + self._groups * self.scale.element_size()
        if self.zero_point is not None:
            per_row += self._groups * (self.zero_point.element_size() if self.zero_point.dtype != torch.uint8 else 1)
        return per_row

    @property
    def grid(self) -> str:
        return self.spec.describe()

    def manifest_entry(self) -> dict:
        """What the buffers do not say (checkpoint): the grid, the block, the table's shape and output."""
        return {
            "spec": spec_entry(self.spec),
            "block_size": list(self.block_size),
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "output_dtype": str(self.output_dtype).removeprefix("torch."),
            "embed_scale": self.embed_scale,
        }

    @classmethod
    def from_entry(cls, entry: dict, tensors: dict[str, torch.Tensor]) -> QuantEmbedding:
        """The table that ``manifest_entry`` and ``state_dict`` describe (tied: the lm_head's own tensors)."""
        return cls(
            tensors["packed"],
            tensors["scale"],
            tensors.get("zero_point"),
            spec_from_entry(entry["spec"]),
            tuple(entry["block_size"]),
            entry["num_embeddings"],
            entry["embedding_dim"],
            output_dtype=getattr(torch, entry["output_dtype"]),
            embed_scale=entry["embed_scale"],
        )

    def _zero_rows(self, ids: torch.Tensor) -> torch.Tensor | None:
        if self.zero_point is None:
            return None
        if self.zero_point.dtype != torch.uint8:  # a float zero point is stored as is
            return self.zero_point[ids]
        # Integer zero points are packed over the whole (rows, groups) table; rows of a few bits
        # need not start on a byte, so unpack the table (groups per row: far smaller than the codes).
        zeros = unpack(self.zero_point, self.spec.bits, self.num_embeddings * self._groups)
        return zeros.reshape(self.num_embeddings, self._groups)[ids]

    def _rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows ``ids`` (a 1-D tensor) of the table: only those rows' codes are unpacked."""
        rows = self.packed.view(self.num_embeddings, self._row_bytes)[ids]
        codes = unpack(rows.reshape(-1), self.spec.bits, ids.numel() * self.embedding_dim) - self._offset
        codes = codes.reshape(ids.numel(), self.embedding_dim)
        return dequantize(codes, self.scale[ids], self._zero_rows(ids), self.block_size, dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole table as floats, without ``embed_scale`` (error figures and tests; a lookup never builds it)."""
        return self._rows(torch.arange(self.num_embeddings, device=self.packed.device), dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self._rows(input_ids.reshape(-1), self.output_dtype)
        if self.embed_scale is not None:
            out = out * self.embed_scale
        return out.reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, grid={self.grid}, block={self.block_size}"
