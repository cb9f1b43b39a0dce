"""Energy counters, their selection, the estimate's labels, cost per token and the decode bandwidth floor."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline import bandwidth, energy, profile
from pipeline.cost import usd_per_1m_tokens
from pipeline.energy import EnergySourceError, Meter, RaplCounter, Usage
from pipeline.generation import Generation
from pipeline.quant.kernels import cpp
from pipeline.quant.linear import QuantLinear
from pipeline.quant.primitives import QuantSpec, block_size_for

ENERGY_CFG = {"source": "auto", "watts_per_core": 4.4}


def _zone(root: Path, name: str, label: str, energy_uj: int, max_range: int = 2**32) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    return zone


def _powercap(tmp_path: Path) -> Path:
    """Two packages, a core subzone inside the first, and a psys zone: only the packages count."""
    _zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000, max_range=10_000_000)
    _zone(tmp_path, "intel-rapl:0:0", "core", 500)
    _zone(tmp_path, "intel-rapl:1", "package-1", 2_000_000)
    _zone(tmp_path, "intel-rapl:2", "psys", 9_000_000)
    return tmp_path


def test_rapl_sums_the_package_domains_and_unwraps_the_counter(tmp_path):
    root = _powercap(tmp_path)
    counter = RaplCounter(root)
    assert [z.energy.parent.name for z in counter.zones] == ["intel-rapl:0", "intel-rapl:1"]
    start = counter.sample()
    # package-0 wraps past its 10 J range: 1.0 J -> 9.5 J -> 0.25 J reads 9.0 + 0.25 J; package-1 gains 0.5 J
    (root / "intel-rapl:0" / "energy_uj").write_text("250000\n")
    (root / "intel-rapl:1" / "energy_uj").write_text("2500000\n")
    assert counter.joules(start, counter.sample()) == pytest.approx(9.25 + 0.5)


def test_rapl_without_a_readable_package_is_an_error(tmp_path):
    _zone(tmp_path, "intel-rapl:0", "psys", 10)
    with pytest.raises(EnergySourceError, match="no readable RAPL package domain"):
        RaplCounter(tmp_path)


def test_auto_takes_rapl_where_it_exists_else_the_labelled_estimate(tmp_path):
    model = nn.Linear(2, 2)
    assert energy.meter_for(model, ENERGY_CFG, _powercap(tmp_path / "cap")).source == "rapl"
    estimate = energy.meter_for(model, ENERGY_CFG, tmp_path / "none")
    assert not estimate.measured
    assert estimate.source == "estimate:cpu_seconds*4.4 W/core (profile.energy.watts_per_core)"


def test_a_forced_source_that_is_missing_is_a_clear_error(tmp_path):
    model = nn.Linear(2, 2)
    with pytest.raises(EnergySourceError, match="RAPL"):
        energy.meter_for(model, {"source": "rapl", "watts_per_core": 4.4}, tmp_path)
    with pytest.raises(EnergySourceError, match="model is on cpu"):
        energy.meter_for(model, {"source": "nvml", "watts_per_core": 4.4}, tmp_path)
    with pytest.raises(ValueError, match="allowed: auto, rapl, nvml, estimate"):
        energy.check_config({"source": "wattmeter", "watts_per_core": 4.4})
    with pytest.raises(ValueError, match="positive number of watts"):
        energy.check_config({"source": "estimate", "watts_per_core": 0})


@pytest.mark.skipif(Path("/sys/class/powercap").exists(), reason="this machine has powercap")
def test_check_config_refuses_forced_rapl_on_a_machine_without_powercap():
    # what the run checks before loading a model
    with pytest.raises(EnergySourceError, match="/sys/class/powercap"):
        energy.check_config({"source": "rapl", "watts_per_core": 4.4})


class _Counter:
    """A counter whose readings are given: 1 J per window in the order ref A, model, ref B."""

    label = "fake"

    def __init__(self) -> None:
        self.n = 0

    def sample(self) -> tuple[int, ...]:
        self.n += 1
        return (self.n,)

    def joules(self, start, end) -> float:
        return float(end[0] - start[0])


def _runs(cpu: dict[str, float], joules: dict[str, float | None]) -> dict[str, list[Generation]]:
    """Two repeats of ref A, model, ref B with the given CPU seconds and joules per decode window
    (prefill windows use a tenth of them)."""
    return {
        key: [
            Generation(
                [0],
                0.0,
                0.0,
                Usage(cpu[key] / 10, None if joules[key] is None else joules[key] / 10),
                Usage(cpu[key], joules[key]),
            )
            for _ in range(2)
        ]
        for key in ("ref_a", "quant", "ref_b")
    }


def test_the_estimate_is_never_written_under_a_measured_name():
    runs = _runs({"ref_a": 2.0, "quant": 1.0, "ref_b": 2.0}, {"ref_a": None, "quant": None, "ref_b": None})
    out = profile.usage_metrics(runs, decode_tokens=10, prefill_tokens=100, suffix="_b4", meter=Meter(None, 5.0))
    assert not [
        k for k in out if k.startswith(("energy_j_per_token", "energy_j_per_prefill_token")) and "_est" not in k
    ]
    assert not [k for k in out if k.startswith(("energy_saving", "prefill_energy_saving"))]
    assert out["cpu_s_per_token_b4"] == pytest.approx(0.1) and out["cpu_s_per_token_ref_b4"] == pytest.approx(0.2)
    assert out["energy_j_per_token_est_b4"] == pytest.approx(0.5)  # 0.1 CPU s * 5 W
    assert out["energy_j_per_token_est_ref_b4"] == pytest.approx(1.0)
    assert out["cpu_s_per_prefill_token_b4"] == pytest.approx(0.001)
    assert out["energy_j_per_prefill_token_est_b4"] == pytest.approx(0.005)
    assert out["cpu_saving_vs_ref_b4"] == pytest.approx(2.0)


def test_measured_energy_has_its_own_names_and_ratio():
    runs = _runs({"ref_a": 2.0, "quant": 1.0, "ref_b": 2.0}, {"ref_a": 30.0, "quant": 10.0, "ref_b": 30.0})
    out = profile.usage_metrics(runs, decode_tokens=10, prefill_tokens=100, suffix="", meter=Meter(_Counter(), 5.0))
    assert not [k for k in out if "_est" in k]
    assert out["energy_j_per_token"] == pytest.approx(1.0) and out["energy_j_per_token_ref"] == pytest.approx(3.0)
    assert out["energy_j_per_prefill_token"] == pytest.approx(0.01)
    assert out["energy_saving_vs_ref"] == pytest.approx(3.0) and out["energy_noise_pct"] == pytest.approx(0.0)
    assert out["prefill_energy_saving_vs_ref"] == pytest.approx(3.0)


def test_meter_reads_cpu_time_and_the_counter_over_a_window():
    meter = Meter(_Counter(), 4.4)
    started = meter.start()
    sum(i * i for i in range(200_000))  # some CPU work
    usage = meter.stop(started)
    assert usage.cpu_s > 0 and usage.energy_j == 1.0


def test_cost_per_million_tokens():
    # $3.60/h at 100 tok/s: 360,000 tokens per hour, so $10 per million
    assert usd_per_1m_tokens(3.6, 100.0) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="positive throughput"):
        usd_per_1m_tokens(1.0, 0.0)
    speed = {"decode_tok_s": 100.0, "decode_tok_s_ref": 50.0, "decode_tok_s_b8": 400.0, "decode_tok_s_ref_b8": 200.0}
    out = profile.cost_metrics(speed, [1, 8], usd_per_hour=3.6)
    assert out == pytest.approx(
        {"usd_per_1m_tokens": 10.0, "usd_per_1m_tokens_ref": 20.0, "usd_per_1m_tokens_b8": 2.5,
         "usd_per_1m_tokens_ref_b8": 5.0}
    )  # fmt: skip


class _Tiny(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 8)  # 100 rows of 8 fp32: 32 bytes a row
        self.norm = nn.LayerNorm(8)  # 2 * 8 fp32
        self.proj = nn.Linear(8, 8)  # 64 + 8 fp32
        self.head = nn.Linear(8, 100, bias=False)
        if tied:
            self.head.weight = self.embed.weight


def test_bytes_read_per_token_counts_one_embedding_row_and_the_whole_head():
    norm, proj = 2 * 8 * 4, (64 + 8) * 4
    untied = bandwidth.bytes_read_per_token(_Tiny(tied=False))
    assert untied == 32 + norm + proj + 100 * 8 * 4
    # tied: the head reads the whole table, which is counted once
    assert bandwidth.bytes_read_per_token(_Tiny(tied=True)) == norm + proj + 100 * 8 * 4


def test_a_module_that_counts_itself_is_not_counted_twice():
    class Counted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1000))

        @property
        def bytes_read_per_call(self) -> int:
            return 7

    model = nn.Sequential(Counted(), nn.Linear(2, 2, bias=False))
    assert bandwidth.bytes_read_per_token(model) == 7 + 4 * 4


def _quant_linear(kernel: str) -> QuantLinear:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(8, True)
    return QuantLinear.from_float(
        w, spec, block_size_for(w.shape, "per_channel"), torch.zeros(64), kernel_preference=kernel
    )


def test_a_quantized_layer_is_read_in_the_layout_its_kernel_uses():
    copy, slow = _quant_linear("aten_int8_weight_only"), _quant_linear("dequant")
    assert copy.kernel_cache_bytes > 0 and slow.kernel_cache_bytes == 0
    bias = 64 * 4
    assert bandwidth.bytes_read_per_token(copy) == copy.kernel_cache_bytes + bias  # its int8 copy, not the codes
    assert bandwidth.bytes_read_per_token(slow) == slow.weight_bytes  # codes + scales + bias
    if cpp.build("lowbit_cpu").ok:  # reads the stored codes in place, and its fp32 scales and zeros
        fused = _quant_linear("lowbit_cpu")
        assert bandwidth.bytes_read_per_token(fused) == fused.packed.numel() + fused.kernel_cache_bytes + bias


def test_floor_arithmetic():
    # 1e9 bytes at 10 GB/s: 100 ms; 4 tok/s at batch 1 is 250 ms a step (2.5x the floor), 16 tok/s at
    # batch 4 too (a step reads the weights once whatever the batch)
    assert bandwidth.floor_ms(1e9, 10.0) == pytest.approx(100.0)
    speed = {"decode_tok_s": 4.0, "decode_tok_s_ref": 2.0, "decode_tok_s_b4": 16.0, "decode_tok_s_ref_b4": 8.0}
    out = profile.floor_metrics(speed, [1, 4], gb_s=10.0, bytes_read=10**9, bytes_read_ref=2 * 10**9)
    assert out["decode_floor_ms"] == pytest.approx(100.0) and out["decode_floor_ms_ref"] == pytest.approx(200.0)
    assert out["decode_vs_floor"] == pytest.approx(2.5) and out["decode_vs_floor_b4"] == pytest.approx(2.5)
    assert out["decode_vs_floor_ref"] == pytest.approx(2.5) and out["mem_bandwidth_gb_s"] == 10.0
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        bandwidth.floor_ms(1.0, 0.0)


def test_read_bandwidth_is_positive_and_checks_its_arguments():
    assert bandwidth.read_bandwidth_gb_s(8, 2) > 0
    with pytest.raises(ValueError, match="buffer_mb >= 1"):
        bandwidth.read_bandwidth_gb_s(0, 1)


def test_nvml_counter_reads_millijoules_of_the_models_gpu(monkeypatch):
    # No GPU here: a stand-in for the pynvml module with the calls the counter makes; the first read
    # checks that the counter works, the next two bound a window of 2.5 J.
    readings = iter([0, 5_000, 7_500])
    fake = types.SimpleNamespace(
        NVMLError=RuntimeError,
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda index: f"gpu{index}",
        nvmlDeviceGetTotalEnergyConsumption=lambda handle: next(readings) if handle == "gpu1" else 0,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    counter = energy.NvmlCounter(1)
    assert counter.label == "nvml" and counter.joules(counter.sample(), counter.sample()) == pytest.approx(2.5)
