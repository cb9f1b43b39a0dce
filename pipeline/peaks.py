"""Peak memory per stage: where a run's memory goes.

``stage(name, record, device)`` wraps one stage of a run: it hands freed memory back to the OS, resets
the process's high-water mark, runs the stage, then records ``peak_rss_mb/<name>`` (the resident peak
during the stage, everything the process holds counted) and ``rss_start_mb/<name>`` (what was live
when it began); on CUDA also ``peak_cuda_mb/<name>`` (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch

from pipeline.profile import peak_rss_mb, reset_peak_rss

STAGES = ("load", "reference", "profile_reference", "calibrate", "quantize", "evaluate", "profile", "ship")


@contextmanager
def stage(name: str, record: Callable[[Mapping[str, float]], None], device: torch.device | str) -> Iterator[None]:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    device = torch.device(device)
    start = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    peaks = {f"peak_rss_mb/{name}": peak_rss_mb(), f"rss_start_mb/{name}": start}
    if device.type == "cuda":
        peaks[f"peak_cuda_mb/{name}"] = torch.cuda.max_memory_allocated(device) / 2**20
    record(peaks)
