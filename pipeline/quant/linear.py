"""QuantLinear: a linear layer that stores packed integer weights and runs a real kernel if one fits.

Storage (what ``weight_bytes`` counts) is always the canonical form: bit-packed codes, scales,
zero points (packed at the weight's width when integer) and bias. A layer whose configuration a
real low-bit kernel supports also keeps that kernel's own layout (``kernel_cache_bytes``);
otherwise it dequantizes on every call and says so in ``kernel``.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.quant import kernels
from pipeline.quant.activation import ActivationQuant, quantize_activation
from pipeline.quant.packing import pack, unpack
from pipeline.quant.primitives import QuantSpec, choose_qparams, dequantize, quantize

__all__ = ["ActivationQuant", "QuantLinear"]


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def spec_entry(spec: QuantSpec) -> dict:
    """A QuantSpec as JSON-ready fields (its scale dtype by name)."""
    return {
        "bits": spec.bits,
        "symmetric": spec.symmetric,
        "zero_point_domain": spec.zero_point_domain,
        "scale_dtype": _DTYPE_NAMES[spec.scale_dtype],
        "symmetric_range": spec.symmetric_range,
    }


def spec_from_entry(entry: dict) -> QuantSpec:
    dtypes = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
    return QuantSpec(**{**entry, "scale_dtype": dtypes[entry["scale_dtype"]]})


class QuantLinear(nn.Module):
    def __init__(
        self,
        codes: torch.Tensor | None,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        spec: QuantSpec,
        block_size: tuple[int, int],
        bias: torch.Tensor | None = None,
        activation: ActivationQuant | None = None,
        activation_scale: torch.Tensor | None = None,
        kernel_preference: str = "auto",
        lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
        input_scale: torch.Tensor | None = None,
        activation_zero_point: torch.Tensor | None = None,
        *,
        stored: tuple[tuple[int, int], torch.Tensor, tuple[int, int] | None] | None = None,
    ) -> None:
        """``stored``: (shape, packed codes, zero point shape) as a checkpoint holds them, with ``codes``
        None and an integer ``zero_point`` already packed; skips re-packing on load."""
        super().__init__()
        if activation is not None and activation.mode == "static":
            if activation_scale is None:
                raise ValueError("static activation quantization needs a calibrated activation_scale")
            if (activation_zero_point is None) != activation.spec.symmetric:
                raise ValueError(
                    "static activation quantization needs a calibrated activation_zero_point exactly when it is "
                    f"asymmetric (symmetric={activation.spec.symmetric}, "
                    f"zero point {'missing' if activation_zero_point is None else 'given'})"
                )
        self.out_features, self.in_features = codes.shape if stored is None else stored[0]
        self.spec, self.block_size, self.activation = spec, tuple(block_size), activation
        # Codes are stored unsigned: symmetric codes are offset by 2**(bits-1) before packing.
        self._offset = 2 ** (spec.bits - 1) if spec.symmetric else 0
        if stored is None:
            packed = pack(codes.to(torch.int32) + self._offset, spec.bits)
            self._int_zero = zero_point is not None and zero_point.dtype == torch.uint8
            self._zero_shape = None if zero_point is None else tuple(zero_point.shape)
            if self._int_zero:
                zero_point = pack(zero_point, spec.bits)
        else:
            _, packed, self._zero_shape = stored
            self._int_zero = zero_point is not None and zero_point.dtype == torch.uint8
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        # Static activation qparams, one per tensor, shape (1, 1); the zero point (uint8) only when asymmetric.
        self.register_buffer("activation_scale", None if activation_scale is None else activation_scale.reshape(1, 1))
        self.register_buffer(
            "activation_zero_point", None if activation_zero_point is None else activation_zero_point.reshape(1, 1)
        )
        # Low-rank correction W ≈ dequant(codes) + A @ B (LoftQ-style), kept in 16 bits and counted.
        a, b = lowrank if lowrank is not None else (None, None)
        self.register_buffer("lowrank_a", a)
        self.register_buffer("lowrank_b", b)
        # Per-input-channel multiplier on x (activation-aware scaling that could not be folded).
        self.register_buffer("input_scale", input_scale)
        self.kernel_preference = kernel_preference
        self._select_kernel()
        self._kernel_only = input_scale is None and lowrank is None and bias is None

    def _select_kernel(self) -> None:
        """Pick and prepare the kernel for where the buffers are now."""
        self._kernel, self.kernel_note = kernels.select(self.tensors(), self.kernel_preference)
        self._kernel_state = self._kernel.prepare(self.tensors())

    @torch.no_grad()
    def set_scale(self, scale: torch.Tensor) -> None:
        """Replace the scales (same shape, dtype and device), e.g. after a step trained them with the
        codes fixed; the kernel's own layout is rebuilt from them."""
        if scale.shape != self.scale.shape or scale.dtype != self.scale.dtype or scale.device != self.scale.device:
            raise ValueError(
                f"new scales must match the stored ones: {tuple(self.scale.shape)} {self.scale.dtype} on "
                f"{self.scale.device}, got {tuple(scale.shape)} {scale.dtype} on {scale.device}"
            )
        self.scale = scale.clone()
        self._select_kernel()

    def _apply(self, fn, recurse: bool = True):
        """After ``.to(device)`` / ``.cuda()`` (or a dtype cast), the kernel's own layout was built for the
        old place: select and prepare again where the buffers are now (the kernel may change: a CPU
        kernel has no CUDA counterpart). A named kernel that cannot run there is an error."""
        before = self.packed.device
        out = super()._apply(fn, recurse)
        if self.packed.device != before:
            self._select_kernel()
        return out

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        spec: QuantSpec,
        block_size: tuple[int, int],
        bias: torch.Tensor | None = None,
        **kwargs,
    ) -> QuantLinear:
        """Round-to-nearest quantization of a float weight (the RTN baseline of every method)."""
        scale, zero = choose_qparams(weight, spec, block_size)
        return cls(quantize(weight, scale, zero, spec, block_size), scale, zero, spec, block_size, bias, **kwargs)

    # -- checkpoint entry (pipeline.checkpoint) ----------------------------------------------
    def manifest_entry(self) -> dict:
        """What the buffers do not say: the grid, the block, the activation scheme, the kernel.

        With the buffers (``state_dict``) it rebuilds this layer exactly (``from_entry``).
        """
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "spec": spec_entry(self.spec),
            "block_size": list(self.block_size),
            "zero_point": None if self.zero_point is None else ("int" if self._int_zero else "float"),
            "zero_point_shape": None if self._zero_shape is None else list(self._zero_shape),
            "activation": None
            if self.activation is None
            else {"spec": spec_entry(self.activation.spec), "mode": self.activation.mode},
            "kernel_preference": self.kernel_preference,
            "kernel": self.kernel,
        }

    @classmethod
    def from_entry(cls, entry: dict, tensors: dict[str, torch.Tensor]) -> QuantLinear:
        """The layer that ``manifest_entry`` and ``state_dict`` describe; its kernel is selected anew."""
        spec = spec_from_entry(entry["spec"])
        shape = (entry["out_features"], entry["in_features"])
        zero_shape = None if entry["zero_point_shape"] is None else tuple(entry["zero_point_shape"])
        act = entry["activation"]
        activation = None if act is None else ActivationQuant(spec=spec_from_entry(act["spec"]), mode=act["mode"])
        lowrank = (tensors["lowrank_a"], tensors["lowrank_b"]) if "lowrank_a" in tensors else None
        return cls(
            None,
            tensors["scale"],
            tensors.get("zero_point"),
            spec,
            tuple(entry["block_size"]),
            tensors.get("bias"),
            activation,
            tensors.get("activation_scale"),
            entry["kernel_preference"],
            lowrank=lowrank,
            input_scale=tensors.get("input_scale"),
            activation_zero_point=tensors.get("activation_zero_point"),
            stored=(shape, tensors["packed"], zero_shape),
        )

    # -- stored form -------------------------------------------------------------------------
    def tensors(self) -> kernels.LayerTensors:
        """The stored form as plain tensors, what kernels take."""
        return kernels.LayerTensors(
            packed=self.packed,
            spec=self.spec,
            out_features=self.out_features,
            in_features=self.in_features,
            block_size=self.block_size,
            scale=self.scale,
            zero_point=self.zero_points(),
            activation=self.activation,
            activation_scale=self.activation_scale,
            activation_zero_point=self.activation_zero_point,
        )

    @property
    def kernel(self) -> str:
        return self._kernel.name

    def codes(self) -> torch.Tensor:
        """Integer codes (int32, signed for symmetric specs) of shape (out, in)."""
        numel = self.out_features * self.in_features
        return (unpack(self.packed, self.spec.bits, numel) - self._offset).reshape(self.out_features, -1)

    def zero_points(self) -> torch.Tensor | None:
        if self.zero_point is None or not self._int_zero:
            return self.zero_point
        n = self._zero_shape[0] * self._zero_shape[1]
        return unpack(self.zero_point, self.spec.bits, n).reshape(self._zero_shape).to(torch.uint8)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The quantized part only (no low-rank term, no input scale)."""
        return dequantize(self.codes(), self.scale, self.zero_points(), self.block_size, dtype)

    def effective_weight(self) -> torch.Tensor:
        """The float weight this layer computes with: quantized + low-rank, times the input scale."""
        w = self.dequantized_weight()
        if self.lowrank_a is not None:
            w = w + self.lowrank_a.float() @ self.lowrank_b.float()
        if self.input_scale is not None:
            w = w * self.input_scale.float()
        return w

    @property
    def weight_bytes(self) -> int:
        """Bytes of the stored weight: packed codes + scales + zero points + bias."""
        return _tensor_bytes(
            self.packed,
            self.scale,
            self.zero_point,
            self.bias,
            self.activation_scale,
            self.activation_zero_point,
            self.lowrank_a,
            self.lowrank_b,
            self.input_scale,
        )

    @property
    def kernel_cache_bytes(self) -> int:
        """Bytes the kernel keeps beyond the stored form (its own layout); shared tensors count once."""
        stored = {t.data_ptr() for t in self.buffers()}
        own = [t for t in self._kernel_state.values() if isinstance(t, torch.Tensor) and t.data_ptr() not in stored]
        return _tensor_bytes(*own)

    @property
    def bytes_read_per_call(self) -> int:
        """Bytes of weights one forward reads: the kernel's own layout (when dequantizing, the stored
        codes and qparams), plus bias, low-rank factors and input scale. The decode floor's numerator."""
        read = [t for t in self._kernel_state.values() if isinstance(t, torch.Tensor)]
        stored = self._kernel_state.get("layer")  # the dequant kernel reads the stored form
        if stored is not None:
            read += [stored.packed, stored.scale, stored.zero_point]
        beside = (self.bias, self.lowrank_a, self.lowrank_b, self.input_scale)
        return _tensor_bytes(*read, *beside, self.activation_scale, self.activation_zero_point)

    # -- compute -----------------------------------------------------------------------------
    @property
    def grid(self) -> str:
        """The weight grid (and the activation grid, if any) that this layer computes on."""
        act = "" if self.activation is None else f"; act {self.activation.describe()}"
        return self.spec.describe() + act

    def quantize_input(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """(codes, scale, zero point, block size) of a 2-D input (``quantize_activation``)."""
        return quantize_activation(x, self.activation, self.activation_scale, self.activation_zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, self.in_features)
        if self._kernel_only:  # the decode hot path: a few hundred of these per token, so no extra ops
            y = self._kernel.run(x2d, self._kernel_state)
            return (y if y.dtype == x.dtype else y.to(x.dtype)).view(*shape[:-1], self.out_features)
        if self.input_scale is not None:
            x2d = x2d * self.input_scale.to(x.dtype)
        y = self._kernel.run(x2d, self._kernel_state)
        if self.lowrank_a is not None:
            y = y + (x2d @ self.lowrank_b.to(x2d.dtype).T) @ self.lowrank_a.to(x2d.dtype).T
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, grid={self.grid}, "
            f"block={self.block_size}, kernel={self.kernel}"
        )
