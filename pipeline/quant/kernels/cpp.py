"""Our C++ kernels (csrc/*.cpp): built once per machine with torch's extension tools, loaded lazily.

Each source registers a torch library (``TORCH_LIBRARY(<name>, m)``) with an ``isa()`` op that says
what it was compiled for. It is compiled with -O3 -march=native into
``build/kernels/<name>-<hash>``, the hash over this CPU's feature flags and the source, so a checkout
shared with another CPU rebuilds rather than dying of an illegal instruction. A failed build is
remembered for the process: the kernels that need it decline every layer with "not built: <the
compiler's first error lines>", and those layers fall to the next kernel in the registry.

    python -m pipeline.quant.kernels.cpp --build   # what `make setup` runs: builds every source
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
SOURCES = REPO / "csrc"
_ERROR_LINES = 3  # of the compiler's output, in the "not built" reason


@dataclass(frozen=True)
class Build:
    """The outcome of building one extension: the ISA it was compiled for, or why it failed."""

    name: str
    isa: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        return f"built ({self.isa})" if self.ok else f"NOT built: {self.error}"


def _cpu_flags() -> str:
    """The ``flags`` line of /proc/cpuinfo (what -march=native compiles for), '' where there is none."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return line
    return ""  # not Linux: the hash then covers the source alone


def build_directory(name: str, source: Path) -> Path:
    digest = hashlib.sha256(_cpu_flags().encode() + source.read_bytes()).hexdigest()[:12]
    return REPO / "build" / "kernels" / f"{name}-{digest}"


def _first_error_lines(message: str) -> str:
    """The compiler's first error lines out of cpp_extension's long failure message."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and not line.startswith("FAILED")]
    return " | ".join((errors or lines)[:_ERROR_LINES])


def _put_ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; the pip package's binary sits in the venv, which a
    ``.venv/bin/python`` started without activating the venv does not have on PATH."""
    try:
        import ninja
    except ImportError:
        return  # a system ninja may still be on PATH; if not, the build reports it
    paths = os.environ.get("PATH", "").split(os.pathsep)
    if ninja.BIN_DIR not in paths:
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, *paths])


@functools.cache
def build(name: str) -> Build:
    """Compile (or load the already compiled) ``csrc/<name>.cpp`` once per process; its ops are then
    ``torch.ops.quantbench_<name>``."""
    from torch.utils import cpp_extension  # imported here: it is slow and only needed to build

    source = SOURCES / f"{name}.cpp"
    library = f"quantbench_{name}"
    _put_ninja_on_path()
    directory = build_directory(name, source)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name=library,
            sources=[str(source)],
            extra_cflags=["-O3", "-march=native"],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, subprocess.CalledProcessError, ImportError) as error:
        return Build(name=name, isa=None, error=_first_error_lines(str(error)) or type(error).__name__)
    return Build(name=name, isa=getattr(torch.ops, library).isa(), error=None)


def ops(name: str):
    """The loaded library's ops namespace (``torch.ops.quantbench_<name>``); build(name) must be ok."""
    outcome = build(name)
    if not outcome.ok:
        raise RuntimeError(f"the {name} kernel is not built: {outcome.error}")
    return getattr(torch.ops, f"quantbench_{name}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Build our C++ kernels (never fails setup).")
    parser.add_argument("--build", action="store_true", help="compile every csrc/*.cpp now (else on first use)")
    args = parser.parse_args()
    if not args.build:
        parser.error("nothing to do: pass --build")
    for source in sorted(SOURCES.glob("*.cpp")):
        outcome = build(source.stem)
        print(f"kernel {source.stem}: {outcome.describe()}")
        if not outcome.ok:
            print("  the layers it would compute run the next kernel in the registry (see the layer table's notes)")


if __name__ == "__main__":
    main()
