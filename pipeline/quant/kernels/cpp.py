"""Our C++ kernels (csrc/*.cpp): built once per machine with torch's extension tools, loaded lazily.

Each source registers its ops as ``TORCH_LIBRARY(TORCH_EXTENSION_NAME, m)`` (``torch.ops.quantbench_<stem>``)
with an ``isa()`` op that says what it was compiled for. It is compiled with ``CFLAGS`` into
``build/kernels/<stem>-<hash>``, the hash over this CPU's feature flags, the torch version, the flags
and the source, so a checkout shared with another CPU rebuilds rather than dying of an illegal
instruction. A failed build is
remembered for the process: the kernels that need it decline every layer with "not built: <the
compiler's first error lines>", and those layers fall to the next kernel in the registry.

    python -m pipeline.quant.kernels --build   # what `make setup` runs: builds every source
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
SOURCES = REPO / "csrc"
# -fopenmp: at::parallel_for splits work over torch's threads only when compiled with OpenMP.
# -ffp-contract=off: the compiler fuses no multiply-add by itself, so float ops written to match a
# torch reference (int8_cpu's scaling) stay bit-identical; the kernels' explicit FMA intrinsics stay.
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off")
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


def build_directory(library: str, source: Path, cflags: tuple[str, ...]) -> Path:
    key = "\n".join([_cpu_flags(), torch.__version__, *cflags]).encode() + source.read_bytes()
    return REPO / "build" / "kernels" / f"{library}-{hashlib.sha256(key).hexdigest()[:12]}"


def _first_error_lines(message: str) -> str:
    """The compiler's first distinct error lines out of cpp_extension's long failure message."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    compiler = [line for line in lines if "error:" in line]  # gcc/clang: file:line:col: error: ...
    unique = list(dict.fromkeys(compiler or lines))  # one error per template instantiation repeats
    return " | ".join(unique[:_ERROR_LINES])


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


def compile_library(stem: str, library: str, cflags: tuple[str, ...] = CFLAGS) -> None:
    """Compile ``csrc/<stem>.cpp`` as the torch library ``library`` (or load its cached build) into
    this process; raises what ``torch.utils.cpp_extension.load`` raises when the build fails."""
    from torch.utils import cpp_extension  # imported here: it is slow and only needed to build

    source = SOURCES / f"{stem}.cpp"
    directory = build_directory(library, source, cflags)
    built = directory / f"{library}.so"
    if built.is_file():
        # The directory's name hashes the source, flags, torch and CPU, so this build is the one we
        # want: load it without cpp_extension.load, whose lock file (taken even when nothing is
        # rebuilt) stays behind when a process is killed holding it and then blocks every later load.
        torch.ops.load_library(str(built))
        return
    _put_ninja_on_path()
    directory.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=library,
        sources=[str(source)],
        extra_cflags=list(cflags),
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )


# -- fake (meta) implementations: what torch.compile traces our ops with -------------------------
# Each ``linear`` returns float32 (rows of x, out features); the out features are an argument
# (lowbit_cpu) or the weight's rows (int8_cpu, half_linear).
def _fake_lowbit_linear(x, packed, bits, n, k, group, scale, zero):
    return x.new_empty((x.shape[0], n), dtype=torch.float32)


def _fake_rows_linear(x, weight, *params):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


FAKE_LINEAR = {"lowbit_cpu": _fake_lowbit_linear, "int8_cpu": _fake_rows_linear, "half_linear": _fake_rows_linear}


@functools.cache
def build(stem: str) -> Build:
    """Build ``csrc/<stem>.cpp`` once per process; its ops are then ``torch.ops.quantbench_<stem>``,
    with a fake implementation of ``linear`` registered for torch.compile."""
    library = f"quantbench_{stem}"
    try:
        compile_library(stem, library)
    except (RuntimeError, OSError, subprocess.CalledProcessError, ImportError) as error:
        return Build(name=stem, isa=None, error=_first_error_lines(str(error)) or type(error).__name__)
    if stem in FAKE_LINEAR:
        torch.library.register_fake(f"{library}::linear")(FAKE_LINEAR[stem])
    return Build(name=stem, isa=getattr(torch.ops, library).isa(), error=None)


def ops(name: str):
    """The loaded library's ops namespace (``torch.ops.quantbench_<name>``); build(name) must be ok."""
    outcome = build(name)
    if not outcome.ok:
        raise RuntimeError(f"the {name} kernel is not built: {outcome.error}")
    return getattr(torch.ops, f"quantbench_{name}")


@functools.cache
def op(name: str, function: str) -> torch._ops.OpOverload:
    """One op, looked up once: a kernel's hot path calls this (``torch.ops`` lookups cost ~2 µs a call)."""
    return getattr(ops(name), function).default
