"""Bit packing of integer codes into a dense uint8 stream, for any width from 2 to 8 bits.

Codes are laid out little-endian in a bit stream: code i occupies bits [i*b, (i+1)*b). One
routine serves every width (3-bit codes straddle byte boundaries like any other); the stream is
padded to whole bytes, and ``unpack`` needs the original count to drop the padding. Both run on
the codes' device (CPU, CUDA or meta): every helper tensor is made there.
"""

from __future__ import annotations

import torch


def packed_numel(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits."""
    return (numel * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (values in [0, 2**bits)) into a flat uint8 tensor."""
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] to pack into {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8)
    bit_planes = (flat.unsqueeze(-1) >> _arange(bits, flat.device)) & 1  # (n, bits)
    stream = bit_planes.reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    byte_weights = 2 ** _arange(8, flat.device)
    return (stream.reshape(-1, 8) * byte_weights).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: a flat int32 tensor of ``numel`` codes."""
    if bits == 8:
        return packed[:numel].to(torch.int32)
    if 8 % bits == 0:  # 2 and 4 bits: codes never straddle bytes, so shift whole bytes (fast path)
        shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)
        codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(-1)[:numel]
    stream = ((packed.to(torch.int32).unsqueeze(-1) >> _arange(8, packed.device)) & 1).reshape(-1)
    planes = stream[: numel * bits].reshape(numel, bits)
    return (planes << _arange(bits, packed.device)).sum(dim=-1, dtype=torch.int32)


def _arange(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int32, device=device)
