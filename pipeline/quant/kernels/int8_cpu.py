"""Our W8A8 CPU kernel (csrc/int8_cpu.cpp): activations quantized in C++, exact int8 x int8 GEMM.

``torch._int_mm`` measured 0.02x fp32 at one token on this AVX2 EPYC (no VNNI); this kernel
sign-extends to int16 and uses ``_mm256_madd_epi16``, blocked over activation rows. It computes
the same integers as ``int8_int_mm`` and the same float ops after (``float(acc) * s_x * s_w``),
so its outputs are bit-identical; the activation codes are those of ``quantize_activation``.

Built by ``pipeline.quant.kernels.cpp`` (``make setup``); where it is not built, W8A8 layers run
``int8_int_mm``.
"""

from __future__ import annotations

import torch

from pipeline.quant.kernels import cpp
from pipeline.quant.kernels.base import NOT_BUILT, LayerTensors
from pipeline.quant.kernels.int8_int_mm import w8a8_layout_refusal

# -- the kernel ---------------------------------------------------------------------------------
# |acc| <= K * 255 * 128 must fit int32 (asymmetric codes enter as q - z in [-255, 255]).
MAX_IN_FEATURES = 65536
SCALE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the codes the C++ side takes


class Int8Cpu:
    name = "int8_cpu"
    devices = ("cpu",)

    def supports(self, layer: LayerTensors) -> str | None:
        refusal = w8a8_layout_refusal(layer)
        if refusal is not None:
            return refusal
        act = layer.activation
        if act.spec.scale_dtype not in SCALE_DTYPES:
            return f"activation scale dtype {act.spec.scale_dtype} is not one of {', '.join(map(str, SCALE_DTYPES))}"
        if layer.in_features > MAX_IN_FEATURES:
            return f"in_features {layer.in_features} > {MAX_IN_FEATURES} could overflow the int32 accumulators"
        built = cpp.build("int8_cpu")
        if not built.ok:
            return f"{NOT_BUILT}: {built.error}"
        return None

    def describe(self, layer: LayerTensors) -> str:
        act = layer.activation
        zero = "symmetric" if act.spec.symmetric else "asymmetric (q - z in int16)"
        return f"int8 x int8 -> int32 ({cpp.build('int8_cpu').isa}), {act.mode} {zero} activations quantized in C++"

    def prepare(self, layer: LayerTensors) -> dict:
        act = layer.activation
        spec = act.spec
        static = act.mode == "static"
        return {
            "op": cpp.ops("int8_cpu").linear.default,  # looked up once; torch.compile traces it through its fake
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
        return state["op"](x.float().contiguous(), state["weight"], state["row_scale"], *state["params"])
