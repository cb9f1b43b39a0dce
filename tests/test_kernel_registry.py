"""The kernel registry: selection order, forced kernels, declined reasons, and byte accounting."""

import pytest
import torch

from pipeline.quant import kernels
from pipeline.quant.linear import QuantLinear
from pipeline.quant.primitives import QuantSpec, block_size_for


def _layer(bits=4, symmetric=False, granularity="group", group=64, kernels_pref="auto", shape=(192, 576)):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return QuantLinear.from_float(
        w, QuantSpec(bits, symmetric), block_size_for(w.shape, granularity, group), kernel_preference=kernels_pref
    )


def test_every_registered_kernel_names_itself_and_answers_for_any_layer():
    layer = _layer().tensors()
    assert kernels.REGISTRY[-1] is kernels.DEQUANT  # the fallback is last: it takes every layer
    assert len(kernels.BY_NAME) == len(kernels.REGISTRY)
    for kernel in kernels.REGISTRY:
        assert kernel.devices and isinstance(kernel.name, str)
        reason = kernel.supports(layer)
        assert reason is None or (isinstance(reason, str) and reason)


def test_a_named_kernel_runs_when_it_fits_and_is_an_error_when_it_does_not():
    assert _layer(kernels_pref="aten_int4_groupwise").kernel == "aten_int4_groupwise"
    with pytest.raises(ValueError, match="kernels=aten_int4_groupwise cannot compute a int3 .*4-bit only"):
        _layer(bits=3, kernels_pref="aten_int4_groupwise")
    with pytest.raises(ValueError, match="kernels must be one of auto, .*dequant"):
        _layer(kernels_pref="fastest")


def test_the_fallback_says_why_each_real_kernel_declined():
    # 96-wide groups: the aten int4 kernel takes 32..256 in powers of two
    layer = _layer(group=96)
    if layer.kernel != "dequant":
        pytest.skip(f"{layer.kernel} computes 96-wide groups here")
    assert "aten_int4_groupwise: block width 96 is not one of the kernel's groups" in layer.kernel_note


def test_selection_follows_registry_order(monkeypatch):
    class Always:
        name, devices = "always", ("cpu",)

        def supports(self, layer):
            return None

        def describe(self, layer):
            return "test kernel"

        def prepare(self, layer):
            return {"weight": kernels.base.dequantized(layer)}

        def run(self, x, state):
            return x @ state["weight"].T

    monkeypatch.setattr(kernels, "REGISTRY", [Always(), *kernels.REGISTRY])
    layer = _layer()
    assert (layer.kernel, layer.kernel_note) == ("always", "test kernel")
    x = torch.randn(3, 576)
    assert torch.allclose(layer(x), x @ layer.dequantized_weight().T)


def test_kernel_cache_counts_the_kernels_own_layout_only():
    dequant = _layer(kernels_pref="dequant")
    assert dequant.kernel_cache_bytes == 0  # it reads the stored tensors themselves
    stored = dequant.packed.numel() + dequant.scale.numel() * 2 + dequant.zero_points().numel()
    assert dequant.bytes_read_per_call == stored  # packed codes + fp16 scales + unpacked uint8 zeros
    int4 = _layer(kernels_pref="aten_int4_groupwise")
    assert int4.kernel_cache_bytes > 0 and int4.bytes_read_per_call == int4.kernel_cache_bytes
