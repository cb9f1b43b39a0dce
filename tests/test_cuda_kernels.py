"""CUDA kernels in the registry: device-aware selection and tinygemm's layout, checked on the CPU
(``select`` takes a device; the packing runs on meta tensors), numerics where CUDA exists."""

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from pipeline.quant import kernels
from pipeline.quant.kernels import cuda_int4_tinygemm
from pipeline.quant.kernels.base import dequantized
from pipeline.quant.linear import QuantLinear
from pipeline.quant.primitives import QuantSpec

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _layer(bits=4, symmetric=True, scale_dtype=torch.bfloat16, group=64, shape=(64, 256), activation=None):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return QuantLinear.from_float(
        w,
        QuantSpec(bits, symmetric, scale_dtype=scale_dtype),
        (1, group),
        **({} if activation is None else {"activation": activation}),
    )


def test_cuda_kernels_run_only_on_cuda_and_cpu_kernels_only_on_cpu():
    layer = _layer().tensors()
    kernel, note = kernels.select(layer, device=CUDA)
    assert kernel.name == "cuda_int4_tinygemm"
    assert "(rows <= 16)" in note and "dequant + bf16 GEMM (rows > 16)" in note
    # on the CPU the CUDA kernel is not even mentioned among the declined
    assert "cuda_int4_tinygemm" not in kernels.select(layer, device=torch.device("cpu"))[1]
    for name in ("lowbit_cpu", "aten_int4_groupwise", "int8_cpu"):
        with pytest.raises(ValueError, match=f"kernels={name} .*runs on cpu, the layer is on cuda"):
            kernels.select(layer, name, device=CUDA)
    with pytest.raises(ValueError, match="kernels=cuda_int4_tinygemm .*runs on cuda, the layer is on cpu"):
        kernels.select(layer, "cuda_int4_tinygemm", device=torch.device("cpu"))


@pytest.mark.parametrize(
    ("bits", "symmetric", "scale_dtype", "group", "reason"),
    [
        (4, True, torch.float16, 64, r"scales \(torch.float16\) are not bf16 numbers"),
        (4, False, torch.bfloat16, 64, r"zero terms \(8 - z\) \* scale are not bf16 numbers"),
        (3, True, torch.bfloat16, 64, "4-bit only"),
        (4, True, torch.bfloat16, 16, "block width 16 is not one of the kernel's groups"),
    ],
)
def test_tinygemm_declines_what_it_would_not_compute_exactly(bits, symmetric, scale_dtype, group, reason):
    layer = _layer(bits, symmetric, scale_dtype, group).tensors()
    kernel, note = kernels.select(layer, device=CUDA)
    assert kernel.name == "dequant"
    assert "cuda_int4_tinygemm: " in note and re.search(reason, note)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_tinygemm_weight_is_the_stored_weight_in_bf16_where_accepted(group):
    """What tinygemm dequantizes, (q_u - 8) * scale + zero with bf16 scale and zero and one rounding,
    equals the stored weight rounded to bf16 (the dequant path of a bf16 model) on every accepted layer."""
    layer = _layer(group=group, shape=(32, 512)).tensors()
    assert cuda_int4_tinygemm.CudaInt4Tinygemm().supports(layer) is None
    scale, zero = cuda_int4_tinygemm._scales_and_zeros(layer, group)
    unsigned = (layer.codes() + layer.offset).float()
    expand = lambda t: t.repeat_interleave(group, dim=1)  # noqa: E731
    tinygemm = ((unsigned - 8) * expand(scale.bfloat16().float()) + expand(zero.bfloat16().float())).bfloat16()
    assert torch.equal(tinygemm, dequantized(layer, torch.bfloat16))


def test_tinygemm_packs_to_what_its_cuda_mm_takes():
    """prepare runs on meta tensors (no GPU needed: packing makes its helper tensors on the layer's
    device); the CUDA op's shape function (FakeTensorMode) takes what it built."""
    layer = _layer(shape=(48, 384)).tensors()
    kernel = cuda_int4_tinygemm.CudaInt4Tinygemm()
    meta = dataclasses.replace(layer, packed=layer.packed.to("meta"), scale=layer.scale.to("meta"))
    state = kernel.prepare(meta)
    assert state["packed"].dtype == torch.int32 and state["packed"].shape[0] == 48 // 8
    assert state["scales_and_zeros"].shape == (384 // 64, 48, 2)
    assert state["scales_and_zeros"].dtype == torch.bfloat16
    with FakeTensorMode():
        on_cuda = {
            k: torch.empty(v.shape, dtype=v.dtype, device="cuda")
            for k, v in state.items()
            if isinstance(v, torch.Tensor)
        }
        out = kernel.run(torch.empty(3, 384, device="cuda"), {**state, **on_cuda})
        assert out.shape == (3, 48) and out.dtype == torch.bfloat16 and out.device.type == "cuda"


def test_the_row_threshold_comes_from_the_config_setting():
    try:
        kernels.set_small_batch_rows(4)
        assert "(rows <= 4)" in kernels.select(_layer().tensors(), device=CUDA)[1]
        with pytest.raises(ValueError, match="kernel_small_batch_rows must be >= 0"):
            kernels.set_small_batch_rows(-1)
    finally:
        kernels.set_small_batch_rows(kernels.DEFAULT_SMALL_BATCH_ROWS)


# -- on a GPU -------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("rows", [1, 16, 17, 64])
def test_tinygemm_matches_the_dequant_path_on_cuda(rows):
    layer = _layer(shape=(256, 1024)).to("cuda")
    assert layer.kernel == "cuda_int4_tinygemm"
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    reference = F.linear(x.float(), layer.dequantized_weight(torch.bfloat16).float())
    torch.testing.assert_close(layer(x).float(), reference, rtol=2e-2, atol=2e-2)


@needs_cuda
@pytest.mark.parametrize("rows", [1, 16, 17, 40])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_mm_pads_small_inputs_on_cuda_and_matches_the_cpu(rows, symmetric):
    from pipeline.quant.activation import ActivationQuant

    act = ActivationQuant(QuantSpec(8, symmetric), "dynamic")
    cpu = _layer(bits=8, symmetric=True, group=256, shape=(64, 256), activation=act)
    cpu = QuantLinear.from_entry({**cpu.manifest_entry(), "kernel_preference": "int8_int_mm"}, cpu.state_dict())
    gpu = QuantLinear.from_entry(cpu.manifest_entry(), {k: v.cuda() for k, v in cpu.state_dict().items()})
    assert gpu.kernel == "int8_int_mm"
    x = torch.randn(rows, 256)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-5, atol=1e-5)


@needs_cuda
def test_a_layer_moved_to_cuda_selects_a_cuda_kernel_and_back():
    layer = _layer()
    assert layer.to("cuda").kernel == "cuda_int4_tinygemm"
    assert layer.to("cpu").kernel != "cuda_int4_tinygemm"


@needs_cuda
def test_a_checkpoint_reloads_onto_cuda_with_cuda_kernels(tmp_path):
    from conftest import layers_cfg, method_cfg, tiny_llama

    from pipeline import checkpoint, quantize

    model = tiny_llama()
    quantize.quantize_model(model, method_cfg("group_wise", "method.symmetric=true"), layers_cfg())
    info = {"base_model": {"name": "tiny", "source": "test", "path": "", "dtype": "float32"}, "run_id": None}
    checkpoint.save_checkpoint(model, tmp_path / "ckpt", info)
    loaded = checkpoint.load_checkpoint(tmp_path / "ckpt", "cuda").model
    assert all(t.device.type == "cuda" for t in loaded.state_dict().values())
    assert all(m.kernel in ("dequant", "cuda_int4_tinygemm") for m in loaded.modules() if isinstance(m, QuantLinear))
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_cuda = loaded(input_ids=ids.cuda()).logits.cpu()
        torch.testing.assert_close(on_cuda, model(input_ids=ids).logits, rtol=2e-2, atol=2e-2)
