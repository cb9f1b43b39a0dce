"""The memory-bandwidth floor of decode: the bytes one decode step must read, over the bandwidth measured.

Decode at batch 1 is memory-bound: each step reads every weight it uses once. ``bytes_read_per_token``
counts those bytes (the KV cache and activations are left out, so the floor is a lower bound), and
``read_bandwidth_gb_s`` measures what one process reads per second with the profile's thread count.
``decode_vs_floor`` = measured ms per step / floor ms; 1 would be a decode that only streams weights.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from pipeline.memory_peak import synchronize


def _tensor_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def _module_bytes_read(module: nn.Module) -> int | None:
    """A module's own count (``bytes_read_per_call``: QuantLinear, HalfLinear, QuantEmbedding); None otherwise."""
    own = getattr(module, "bytes_read_per_call", None)
    return None if own is None else int(own)


def bytes_read_per_token(model: nn.Module) -> int:
    """Bytes of stored weights one decode step at batch 1 reads.

    A module that counts itself (any module with a ``bytes_read_per_call`` property: QuantLinear reads
    its kernel's layout, not necessarily its stored form) adds its own figure and its tensors are not
    counted again. Every other parameter counts once by
    storage (tied tensors once), in full, except one that only ``nn.Embedding`` modules hold: a lookup
    reads one row per token. An embedding tied to the lm_head is read in full (the head reads all of it).
    """
    total = 0
    counted: set[int] = set()  # data_ptr of tensors inside modules that counted themselves
    for module in model.modules():
        own = _module_bytes_read(module)
        if own is None:
            continue
        total += own
        counted.update(t.data_ptr() for t in (*module.parameters(), *module.buffers()))
    # data_ptr -> (tensor, read in full by some module that is not an embedding)
    params: dict[int, tuple[torch.Tensor, bool]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.data_ptr() in counted:
                continue
            _, full = params.get(p.data_ptr(), (p, False))
            params[p.data_ptr()] = (p, full or not isinstance(module, nn.Embedding))
    for p, full in params.values():
        total += _tensor_bytes(p) if full else p[0].numel() * p.element_size()
    return total


def read_bandwidth_gb_s(buffer_mb: int, repeats: int, device: torch.device | str = "cpu") -> float:
    """Median GB/s (1e9 bytes) of summing a float32 buffer of ``buffer_mb`` MiB on ``device`` (the model's:
    a GPU's floor is its own memory's), with torch's current thread count; the buffer must be several
    times the last-level cache so that it streams from memory."""
    if buffer_mb < 1 or repeats < 1:
        raise ValueError(f"profile.bandwidth needs buffer_mb >= 1 and repeats >= 1, got {buffer_mb} and {repeats}")
    buffer = torch.ones(buffer_mb * 2**20 // 4, dtype=torch.float32, device=device)
    buffer.sum()  # touch every page once, so no repeat pays for first-touch faults
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        buffer.sum()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return _tensor_bytes(buffer) / statistics.median(seconds) / 1e9


def floor_ms(bytes_read: float, bandwidth_gb_s: float) -> float:
    """Milliseconds to read ``bytes_read`` bytes at ``bandwidth_gb_s``."""
    if bandwidth_gb_s <= 0:
        raise ValueError(f"memory bandwidth must be positive, got {bandwidth_gb_s} GB/s")
    return 1000 * bytes_read / (bandwidth_gb_s * 1e9)
