"""Energy and CPU time over a timed window: hardware energy counters where the machine has them.

Sources (``profile.energy.source``; ``auto`` takes NVML for a model on CUDA, RAPL for one on the CPU,
else the estimate):

- ``rapl``: Linux powercap (``/sys/class/powercap/intel-rapl:N/energy_uj``, AMD included), the
  package domains summed; a counter that passed ``max_energy_range_uj`` wrapped and is unwrapped.
- ``nvml``: the NVIDIA driver's total-energy counter of the model's GPU (``nvidia-ml-py``), only
  when the model is on CUDA.
- ``estimate``: no counter (a VM: no powercap): CPU seconds of this process times
  ``watts_per_core``. It is a labelled estimate and is logged under other names (``*_est``).

Our own reader, not zeus or codecarbon: zeus (``ZeusMonitor.begin_window/end_window``) reads the
same counters but pulls in its own dependency tree and unwraps RAPL with a polling process of its
own; codecarbon samples power on a background scheduler (15 s by default), far coarser than a
prefill window, and looks up its location online unless put in offline mode. A window here is two
file reads (or one driver call) on each side.

CPU seconds (``time.process_time``: all threads of this process, user + system) are read over
every window whatever the source: with one thread and a CPU-bound loop they track wall time, and
they are what the estimate multiplies.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

log = logging.getLogger(__name__)

POWERCAP = Path("/sys/class/powercap")
SOURCES = ("auto", "rapl", "nvml", "estimate")
_PACKAGE_ZONE = re.compile(r"^intel-rapl:\d+$")  # top-level zones; intel-rapl:0:0 (core, dram) are inside them


class EnergySourceError(RuntimeError):
    """A forced energy source that this machine or this model does not have."""


class Counter(Protocol):
    """A cumulative energy counter: ``sample()`` raw readings, ``joules(a, b)`` the energy between two."""

    label: str

    def sample(self) -> tuple[int, ...]: ...

    def joules(self, start: tuple[int, ...], end: tuple[int, ...]) -> float: ...


@dataclass(frozen=True)
class _Zone:
    energy: Path
    max_range_uj: int


class RaplCounter:
    """The package domains of Linux powercap RAPL, summed (microjoule counters that wrap)."""

    label = "rapl"

    def __init__(self, root: Path = POWERCAP) -> None:
        self.zones = rapl_package_zones(root)
        if not self.zones:
            raise EnergySourceError(
                f"no readable RAPL package domain under {root} (needs intel-rapl:N/energy_uj with a 'package' name; "
                "a VM usually has none, and energy_uj may be root-only)"
            )

    def sample(self) -> tuple[int, ...]:
        return tuple(int(zone.energy.read_text()) for zone in self.zones)

    def joules(self, start: tuple[int, ...], end: tuple[int, ...]) -> float:
        total_uj = 0
        for zone, a, b in zip(self.zones, start, end, strict=True):
            # The counter restarts from 0 after max_energy_range_uj; a window is far shorter than one wrap
            # (about an hour at package power), so at most one wrap lies inside it.
            total_uj += b - a if b >= a else b + zone.max_range_uj - a
        return total_uj / 1e6


def rapl_package_zones(root: Path = POWERCAP) -> list[_Zone]:
    """The package zones under ``root`` whose counter can be read (psys and subzones left out)."""
    zones = []
    for path in sorted(root.glob("intel-rapl:*")):
        if not _PACKAGE_ZONE.match(path.name) or not (path / "name").is_file():
            continue
        # psys (the whole platform, on some laptops) would count the packages twice.
        if not (path / "name").read_text().strip().startswith("package"):
            continue
        try:
            int((path / "energy_uj").read_text())
            max_range = int((path / "max_energy_range_uj").read_text())
        except (OSError, ValueError):  # root-only on recent kernels, or absent: not a usable zone
            continue
        zones.append(_Zone(path / "energy_uj", max_range))
    return zones


class NvmlCounter:
    """NVML's total energy since the driver loaded, of one GPU (millijoules)."""

    label = "nvml"

    def __init__(self, device_index: int) -> None:
        pynvml = _import_nvml()
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except pynvml.NVMLError as error:
            raise EnergySourceError(f"NVML cannot read GPU {device_index}'s energy counter: {error}") from error
        self._read = pynvml.nvmlDeviceGetTotalEnergyConsumption

    def sample(self) -> tuple[int, ...]:
        return (int(self._read(self._handle)),)

    def joules(self, start: tuple[int, ...], end: tuple[int, ...]) -> float:
        return (end[0] - start[0]) / 1e3


def _import_nvml():
    try:
        import pynvml  # provided by the nvidia-ml-py package
    except ImportError as error:
        raise EnergySourceError("profile.energy.source=nvml needs the nvidia-ml-py package (import pynvml)") from error
    return pynvml


@dataclass(frozen=True)
class Usage:
    """What one window used: CPU seconds always, joules when a counter measured them."""

    cpu_s: float
    energy_j: float | None


class Meter:
    """Reads CPU time and the counter (if any) around a window; ``start`` then ``stop``."""

    def __init__(self, counter: Counter | None, watts_per_core: float) -> None:
        self.counter, self.watts_per_core = counter, watts_per_core

    @property
    def measured(self) -> bool:
        return self.counter is not None

    @property
    def source(self) -> str:
        """The ``energy_source`` tag: the counter, or how the estimate is made."""
        if self.counter is not None:
            return self.counter.label
        return f"estimate:cpu_seconds*{self.watts_per_core:g} W/core (profile.energy.watts_per_core)"

    def start(self) -> tuple[float, tuple[int, ...] | None]:
        return time.process_time(), None if self.counter is None else self.counter.sample()

    def stop(self, started: tuple[float, tuple[int, ...] | None]) -> Usage:
        energy = None if self.counter is None else self.counter.joules(started[1], self.counter.sample())
        return Usage(time.process_time() - started[0], energy)


def check_config(cfg: Mapping) -> None:
    """``profile.energy`` without a model: a known source, a positive watts_per_core, and a forced
    rapl/nvml source present on this machine (before any expensive stage)."""
    source, watts = cfg["source"], cfg["watts_per_core"]
    if source not in SOURCES:
        raise ValueError(f"profile.energy.source={source!r}; allowed: {', '.join(SOURCES)}")
    if not isinstance(watts, int | float) or watts <= 0:
        raise ValueError(f"profile.energy.watts_per_core must be a positive number of watts, got {watts!r}")
    if source == "rapl":
        RaplCounter()
    elif source == "nvml":
        _import_nvml()
        if not torch.cuda.is_available():
            raise EnergySourceError("profile.energy.source=nvml needs a CUDA GPU; torch sees none")


def meter_for(model: nn.Module, cfg: Mapping, root: Path = POWERCAP) -> Meter:
    """The meter ``profile.energy.source`` asks for; a forced source that is not there raises EnergySourceError.

    ``auto``: a model on CUDA is read by NVML (the GPU draws the power; RAPL would see only the host's
    CPU), a model on the CPU by RAPL; without that counter, the estimate, with a warning.
    """
    source, watts = cfg["source"], float(cfg["watts_per_core"])
    if source not in SOURCES:
        raise ValueError(f"profile.energy.source={source!r}; allowed: {', '.join(SOURCES)}")
    device = next(model.parameters()).device
    if source == "estimate":
        return Meter(None, watts)
    if source == "rapl":
        return Meter(RaplCounter(root), watts)
    if source == "nvml":
        if device.type != "cuda":
            raise EnergySourceError(f"profile.energy.source=nvml reads a GPU's counter; the model is on {device}")
        return Meter(NvmlCounter(device.index or 0), watts)
    try:
        counter = NvmlCounter(device.index or 0) if device.type == "cuda" else RaplCounter(root)
    except EnergySourceError as error:
        log.warning("no energy counter for a model on %s (%s): energy is estimated from CPU seconds", device, error)
        return Meter(None, watts)
    return Meter(counter, watts)
