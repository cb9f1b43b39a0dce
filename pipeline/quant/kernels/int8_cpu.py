"""Our W8A8 CPU kernel (csrc/int8_cpu.cpp): activations quantized in C++, exact int8 x int8 GEMM.

``torch._int_mm`` measured 0.02x fp32 at one token on this AVX2 EPYC (no VNNI); this kernel
sign-extends to int16 and uses ``_mm256_madd_epi16``, blocked over activation rows. It computes
the same integers as ``int8_int_mm`` and the same float ops after (``float(acc) * s_x * s_w``),
so its outputs are bit-identical; the activation codes are those of ``quantize_activation``.

    python -m pipeline.quant.kernels.int8_cpu --build   # build now (make setup does); exits 0 either way
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import torch

from pipeline.quant.kernels.base import NOT_BUILT, LayerTensors

REPO = Path(__file__).resolve().parents[3]
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]  # no fused multiply-adds: exact float ops


# -- building (kept apart so that it can become the one loader every C++ kernel shares) --------
def _cpu_flags() -> str:
    """The CPU's feature flags (the build is -march=native: a different CPU needs its own build)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    return os.uname().machine


def build_cpu_extension(name: str, source: Path, cflags: list[str] = CFLAGS) -> ModuleType:
    """Compile one C++ source into a torch extension, or load its cached build.

    Builds go to ``<repo>/build/kernels/<hash>``, the hash over the CPU flags, the torch version
    (the extension links against it), the flags and the source: any change gets a fresh build.
    Raises what ``torch.utils.cpp_extension.load`` raises when the build fails.
    """
    from torch.utils import cpp_extension

    key = "\n".join([_cpu_flags(), torch.__version__, *cflags]).encode() + source.read_bytes()
    digest = hashlib.sha256(key).hexdigest()[:12]
    build_dir = REPO / "build" / "kernels" / digest
    build_dir.mkdir(parents=True, exist_ok=True)
    if shutil.which("ninja") is None:
        # cpp_extension runs `ninja` from PATH; the pip package installs it beside the venv's python.
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return cpp_extension.load(
        name=f"{name}_{digest}",
        sources=[str(source)],
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        verbose=False,
    )


def _build_failure(error: Exception) -> str:
    """One line: the exception's first line and the compiler's first error, if it printed one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first_error = next((line for line in lines if "error" in line.lower() and line != lines[0]), None)
    return f"{type(error).__name__}: {lines[0] if lines else ''}" + (f" ({first_error})" if first_error else "")


@functools.cache
def extension() -> tuple[ModuleType | None, str | None]:
    """(the built module, None) or (None, why it could not be built); built once per process."""
    try:
        return build_cpu_extension("quantbench_int8_cpu", REPO / "csrc" / "int8_cpu.cpp"), None
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as error:
        return None, _build_failure(error)


# -- the kernel ---------------------------------------------------------------------------------
# |acc| <= K * 255 * 128 must fit int32 (asymmetric codes enter as q - z in [-255, 255]).
MAX_IN_FEATURES = 65536
SCALE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the codes the C++ side takes


class Int8Cpu:
    name = "int8_cpu"
    devices = ("cpu",)

    def supports(self, layer: LayerTensors) -> str | None:
        act = layer.activation
        if act is None or act.spec.bits != 8:
            return "needs 8-bit activations"
        if layer.spec.bits != 8 or not layer.spec.symmetric or not layer.per_row:
            return "needs symmetric 8-bit weights with one scale per output row"
        if act.spec.scale_dtype not in SCALE_DTYPES:
            return f"activation scale dtype {act.spec.scale_dtype} is not one of {', '.join(map(str, SCALE_DTYPES))}"
        if layer.in_features > MAX_IN_FEATURES:
            return f"in_features {layer.in_features} > {MAX_IN_FEATURES} could overflow the int32 accumulators"
        module, failure = extension()
        if module is None:
            return f"{NOT_BUILT}: {failure}"
        return None

    def describe(self, layer: LayerTensors) -> str:
        act = layer.activation
        zero = "symmetric" if act.spec.symmetric else "asymmetric (q - z in int16)"
        simd = "AVX2" if extension()[0].has_avx2() else "scalar"
        return f"int8 x int8 -> int32 ({simd}), {act.mode} {zero} activations quantized in C++"

    def prepare(self, layer: LayerTensors) -> dict:
        act = layer.activation
        spec = act.spec
        static = act.mode == "static"
        return {
            "weight": layer.codes().to(torch.int8).contiguous(),  # (out, in): each output row is one stream
            "row_scale": layer.scale_per_row_group(layer.in_features).reshape(-1).contiguous(),
            # The constants of choose_qparams / quantize, as quantize_activation uses them.
            "params": (
                not static,
                spec.symmetric,
                spec.qmin,
                spec.qmax,
                (spec.qmax - spec.qmin) / 2 if spec.symmetric else float(spec.qmax - spec.qmin),
                max(1e-8, torch.finfo(spec.scale_dtype).tiny),
                SCALE_DTYPES[spec.scale_dtype],
                float(layer.activation_scale.float()) if static else 0.0,
                int(layer.activation_zero_point) if static and not spec.symmetric else 0,
            ),
        }

    def run(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        module = extension()[0]
        return module.linear(x.float().contiguous(), state["weight"], state["row_scale"], *state["params"])


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the W8A8 CPU kernel (csrc/int8_cpu.cpp).")
    parser.add_argument("--build", action="store_true", help="build it now and say whether it built")
    args = parser.parse_args()
    if not args.build:
        parser.error("nothing to do: pass --build")
    module, failure = extension()
    # Exit 0 either way: without the kernel, W8A8 layers run on the next registered kernel.
    print("int8 kernel: built" if module is not None else f"int8 kernel: NOT built: {failure}")


if __name__ == "__main__":
    main()
