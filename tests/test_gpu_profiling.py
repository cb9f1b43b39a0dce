"""Profiling that is honest on a GPU: the warm-up that waits for clocks, peak accelerator memory,
GPU provenance. Their logic runs on the CPU here; the CUDA reads where a GPU exists."""

import pytest
import torch
from conftest import layers_cfg, method_cfg, tiny_llama
from torch._dynamo.utils import counters

from pipeline import generation, memory_peak, profile, quantize, tracking
from pipeline.quant.kernels import cpp

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_settle_stops_when_two_runs_agree_or_the_time_is_up():
    model = tiny_llama()
    prompt = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    # any two runs agree within an infinite tolerance: the second run settles it (a finite one, even
    # 1000%, failed on a loaded CI machine where one run took over 11x another)
    assert profile.settle(model, prompt, 2, {"tolerance_pct": float("inf"), "min_s": 0.0, "max_s": 60.0}) == 2
    # no two runs agree within -1%: stops at max_s, having run at least once
    assert profile.settle(model, prompt, 2, {"tolerance_pct": -1.0, "min_s": 0.0, "max_s": 0.0}) == 1


def test_peak_memory_off_cuda_is_none_and_provenance_has_no_gpu_keys():
    memory_peak.reset_peak("cpu")
    assert memory_peak.peak_mb("cpu") is None
    if not torch.cuda.is_available():
        assert not any(k.startswith("host.gpu") for k in tracking.provenance())


@needs_cuda
def test_peak_memory_counts_a_tensor_made_on_cuda_and_provenance_names_the_gpu():
    memory_peak.reset_peak("cuda")
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    assert memory_peak.peak_mb("cuda") >= 64
    del block
    info = tracking.provenance()
    assert info["host.gpu"] == torch.cuda.get_device_name(0) and info["host.cuda"] == torch.version.cuda


def test_the_compiled_decode_traces_our_kernels_without_a_graph_break_and_decodes_as_eager():
    """aot_eager: dynamo and AOT autograd trace the step (our C++ ops through their fakes) without
    inductor's code generation, which takes about a minute here; the numbers come from the real thing."""
    model = tiny_llama()
    quantize.quantize_model(model, method_cfg("group_wise"), layers_cfg())
    kernels_used = {m.kernel for m in model.modules() if isinstance(getattr(m, "kernel", None), str)}
    if cpp.build("lowbit_cpu").ok and cpp.build("half_linear").ok:  # our C++ ops are in the traced step
        assert {"lowbit_cpu", "half_linear"} <= kernels_used
    prompt = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    counters.clear()
    decoder = generation.CompiledDecoder(model, 2, 14, backend="aot_eager")
    compiled = decoder(prompt, 6)
    eager = generation.greedy(model, prompt, 6)
    assert [g.tokens for g in compiled] == [g.tokens for g in eager]
    assert decoder.compile_s > 0 and decoder(prompt, 6)[0].tokens == eager[0].tokens
    assert not counters["graph_break"], (kernels_used, dict(counters["graph_break"]))
    with pytest.raises(ValueError, match="this decoder takes batch 2 and 14 tokens in all"):
        decoder(prompt, 7)
