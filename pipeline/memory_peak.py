"""Peak accelerator memory of a stage: ``torch.cuda.max_memory_allocated`` between a reset and a read.

The CUDA counterpart of the peak RSS that ``pipeline.profile`` reads for host memory (``reset_peak_rss``
/ ``peak_rss_mb``); call both around a stage. It counts what torch's caching allocator handed out
(tensors), not the allocator's reserve or the CUDA context. On a device that is not CUDA there is
nothing to read: ``peak_mb`` returns None, and host memory is the RSS.
"""

from __future__ import annotations

import torch


def reset_peak(device: torch.device | str) -> None:
    """Start a stage: the peak counter of ``device`` restarts from what is allocated now (no-op off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device | str) -> float | None:
    """MiB allocated at the peak on ``device`` since ``reset_peak``; None where the device is not CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (a timed region ends when the GPU is done, not when
    Python has queued it); nothing to wait for off CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
