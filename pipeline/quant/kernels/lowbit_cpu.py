"""``lowbit_cpu``: our fused C++ kernel (csrc/lowbit_cpu.cpp) on the stored packed codes, 2/3/4/8 bits.

It reads ``LayerTensors.packed`` itself (no repacking): the only extra bytes are the scales and
zero points expanded to float32 (out, in / group). Built on first use with
``torch.utils.cpp_extension`` (-O3 -march=native) into ``build/kernels/<hash>``, the hash over
this CPU's feature flags and the source, so a checkout shared with another CPU rebuilds rather
than dying of an illegal instruction. A failed build is remembered: the kernel then declines every
layer with "not built: <compiler error>" and those layers run ``dequant``.

    python -c "from pipeline.quant.kernels import lowbit_cpu; lowbit_cpu.main()" --build  # `make setup`
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

from pipeline.quant.kernels.base import LayerTensors

REPO = Path(__file__).resolve().parents[3]
SOURCE = REPO / "csrc" / "lowbit_cpu.cpp"
BITS = (2, 3, 4, 8)
EXTENSION_NAME = "quantbench_lowbit"
_ERROR_LINES = 3  # of the compiler's output, in the "not built" reason


@dataclass(frozen=True)
class Build:
    """The outcome of building the extension: the ISA it was compiled for, or why it failed."""

    isa: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


def _cpu_flags() -> str:
    """The ``flags`` line of /proc/cpuinfo (what -march=native compiles for), '' where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass  # not Linux: the hash then covers the source alone
    return ""


def build_directory() -> Path:
    digest = hashlib.sha256(_cpu_flags().encode() + SOURCE.read_bytes()).hexdigest()[:12]
    return REPO / "build" / "kernels" / digest


def _first_error_lines(message: str) -> str:
    """The compiler's first error lines out of cpp_extension's long failure message."""
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


@functools.cache
def build() -> Build:
    """Compile (or load the already compiled) extension once per process."""
    from torch.utils import cpp_extension  # imported here: it is slow and only needed to build

    _put_ninja_on_path()
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native"],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, subprocess.CalledProcessError, ImportError) as error:
        return Build(isa=None, error=_first_error_lines(str(error)) or type(error).__name__)
    return Build(isa=torch.ops.quantbench_lowbit.isa(), error=None)


@functools.cache
def _linear_op() -> torch._ops.OpOverload:
    """The loaded op, looked up once (``torch.ops`` attribute lookups cost ~2 µs a call)."""
    return torch.ops.quantbench_lowbit.linear.default


class LowbitCpu:
    name = "lowbit_cpu"
    devices = ("cpu",)

    def supports(self, layer: LayerTensors) -> str | None:
        if layer.activation is not None:
            return "weight-only kernel; this layer quantizes activations"
        if layer.spec.bits not in BITS:
            return f"{layer.spec.bits}-bit weights; the kernel takes {', '.join(map(str, BITS))} bits"
        if layer.in_features % 8:
            return f"in_features {layer.in_features} is not a multiple of 8"
        if layer.block_size[1] % 8:
            return f"block width {layer.block_size[1]} is not a multiple of 8"
        outcome = build()
        if not outcome.ok:
            return f"not built: {outcome.error}"
        return None

    def describe(self, layer: LayerTensors) -> str:
        group = "per-row scales" if layer.per_row else f"groups of {layer.block_size[1]}"
        return f"fused {layer.spec.bits}-bit GEMV/GEMM on packed codes, {build().isa}, fp32 accumulate, {group}"

    def prepare(self, layer: LayerTensors) -> dict:
        outcome = build()  # loads the op into this process (``select`` has already asked ``supports``)
        if not outcome.ok:
            raise RuntimeError(f"the fused low-bit kernel is not built: {outcome.error}")
        group = layer.block_size[1]
        return {
            "packed": layer.packed,  # the stored tensor itself: the kernel decodes it in place
            "scale": layer.scale_per_row_group(group),
            "zero": layer.unsigned_zero_per_row_group(group),
            "bits": layer.spec.bits,
            "n": layer.out_features,
            "k": layer.in_features,
            "group": group,
        }

    def run(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        return _linear_op()(
            x.contiguous(),
            state["packed"],
            state["bits"],
            state["n"],
            state["k"],
            state["group"],
            state["scale"],
            state["zero"],
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the fused low-bit CPU kernel (never fails setup).")
    parser.add_argument("--build", action="store_true", help="compile it now (otherwise on first use)")
    args = parser.parse_args()
    if not args.build:
        parser.error("nothing to do: pass --build")
    outcome = build()
    if outcome.ok:
        print(f"fused low-bit kernel: built ({outcome.isa}) in {build_directory().relative_to(REPO)}")
    else:
        print(f"fused low-bit kernel: NOT built: {outcome.error} — 2/3-bit layers will dequantize")


if __name__ == "__main__":
    main()
