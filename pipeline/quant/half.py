"""HalfLinear: a linear layer kept in 16 bits (bfloat16 or float16) that computes in float32.

What a shipped model does with the layers a method leaves unquantized (an lm_head, say): store
them in 16 bits. The fused ``half_linear`` C++ kernel widens each weight to fp32 in registers, so
a decode step reads 2 bytes per weight (torch's own bf16 matmul is slower than fp32 on CPUs
without AVX-512 BF16). Where that kernel is not built, the layer widens its weight to fp32 on every
call and says so in ``kernel`` (``widen``): correct, and slower than fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.quant.kernels import cpp

HALF_DTYPES = (torch.bfloat16, torch.float16)


class HalfLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """``weight`` (out, in) in a 16-bit dtype, used as is (a tied tensor stays shared)."""
        super().__init__()
        if weight.dtype not in HALF_DTYPES:
            raise ValueError(f"HalfLinear stores bfloat16 or float16 weights, got {weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
        built = cpp.build("half_linear")
        self.kernel = "half_linear" if built.ok else "widen"
        self.kernel_note = (
            f"fused 16-bit GEMV/GEMM, weights widened in registers, {built.isa}"
            if built.ok
            else f"weight widened to fp32 per call (half_linear {built.describe()})"
        )

    @property
    def bytes_read_per_call(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, self.in_features).float()
        if self.kernel == "half_linear":
            y = cpp.ops("half_linear").linear(x2d.contiguous(), self.weight)
        else:
            y = F.linear(x2d, self.weight.float())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype}, kernel={self.kernel}"
