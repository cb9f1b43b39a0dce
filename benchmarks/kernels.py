"""Kernel benchmark on weights streamed from memory: each QuantLinear configuration against fp32.

    python -m benchmarks.kernels [--threads 1] [--repeats 7] [--working-set-mb 256]

Every kernel that computes a configuration is timed (the one ``auto`` picks first), next to fp32
and bf16 ``F.linear``. A kernel timed on one cache-resident layer measures the cache, not the kernel (a 576x576 int4
layer read 0.94x while the whole model ran 2x faster). Here every variant is timed over enough
copies of the layer that the copies outgrow the last-level cache (``--working-set-mb``, default
4x the L3 this machine reports): one sample calls each copy once, in order, and reports the time
per call. Each repeat times every variant once, interleaved, so drift hits all of them alike;
speed-up = fp32 time / variant time per repeat, median with a 95% t interval over repeats.

Beside it: the machine's read bandwidth, measured in the same process, and each variant's floor
(bytes its kernel reads per call / bandwidth); ``floor %`` = floor / measured time (100% = at the
memory limit). Written to experiments/bench/kernels.md and logged to the MLflow experiment "bench".
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F

from pipeline import stats, tracking
from pipeline.bandwidth import read_bandwidth_gb_s
from pipeline.device import torch_threads
from pipeline.quant import kernels
from pipeline.quant.activation import ActivationQuant
from pipeline.quant.linear import QuantLinear
from pipeline.quant.primitives import QuantSpec, block_size_for

# (out, in): q/o, k/v, gate/up, down of the embedded model, and a 4096 square (an 8B model's q/o)
SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]
TOKENS = [1, 8]
ACT8 = ActivationQuant(QuantSpec(8, True, scale_dtype=torch.float32), "dynamic")
CONFIGS = {  # name -> (bits, symmetric, granularity, group_size, activation)
    "int8 per-channel (weight_only)": (8, True, "per_channel", None, None),
    "int8 W8A8 dynamic (ptq_dynamic)": (8, True, "per_channel", None, ACT8),
    "int4 asym g64 (group_wise)": (4, False, "group", 64, None),
    "int4 sym per-channel (per_channel)": (4, True, "per_channel", None, None),
    "int3 asym g64": (3, False, "group", 64, None),
    "int2 asym g32 (w2_group)": (2, False, "group", 32, None),
}


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache sysfs reports for cpu0, in bytes (None where sysfs says nothing)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes) if sizes else None


def _copies(layer_bytes: int, working_set: int) -> int:
    return max(2, math.ceil(working_set / max(layer_bytes, 1)))


def _streamed(calls: list[Callable[[], object]]) -> Callable[[], float]:
    """A sample: each call once, in order; seconds per call."""

    def sample() -> float:
        start = time.perf_counter()
        for call in calls:
            call()
        return (time.perf_counter() - start) / len(calls)

    return sample


@torch.no_grad()
def measure(repeats: int, working_set: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f in SHAPES:
        weight = torch.randn(out_f, in_f, generator=gen) * 0.02
        variants: dict[str, tuple[str, int, list]] = {}  # name -> (kernel, bytes read per call, layers)
        n = _copies(weight.numel() * 4, working_set)
        fp32 = [weight.clone() for _ in range(n)]
        variants["fp32"] = ("F.linear", weight.numel() * 4, fp32)
        variants["bf16"] = (
            "F.linear",
            weight.numel() * 2,
            [w.bfloat16() for w in fp32[: _copies(weight.numel() * 2, working_set)]],
        )
        for name, (bits, sym, gran, group, act) in CONFIGS.items():
            block = block_size_for(weight.shape, gran, group)
            auto = QuantLinear.from_float(weight, QuantSpec(bits, sym), block, activation=act)
            # the kernel auto picks, then every other kernel that computes this layout (dequant included)
            others = [k.name for k in kernels.REGISTRY if k.name != auto.kernel and k.supports(auto.tensors()) is None]
            for pref in ("auto", *others):
                layer = (
                    auto
                    if pref == "auto"
                    else QuantLinear.from_float(
                        weight, QuantSpec(bits, sym), block, activation=act, kernel_preference=pref
                    )
                )
                label = name if pref == "auto" else f"{name}, {pref}"
                read = layer.bytes_read_per_call
                variants[label] = (
                    layer.kernel,
                    read,
                    [copy.deepcopy(layer) for _ in range(_copies(read, working_set))],
                )
        for tokens in TOKENS:
            x = torch.randn(tokens, in_f, generator=gen)
            xb = x.bfloat16()
            samplers = {}
            for label, (_kernel, _read, layers) in variants.items():
                if label in ("fp32", "bf16"):
                    inp = x if label == "fp32" else xb
                    samplers[label] = _streamed([lambda w=w, inp=inp: F.linear(inp, w) for w in layers])
                else:
                    samplers[label] = _streamed([lambda m=m, x=x: m(x) for m in layers])
            for sample in samplers.values():  # warm-up: page in every copy, build lazy state
                sample()
            times: dict[str, list[float]] = {label: [] for label in samplers}
            for _ in range(repeats):
                for label, sample in samplers.items():
                    times[label].append(sample())
            for label, (kernel, read, layers) in variants.items():
                ratios = [f / t for f, t in zip(times["fp32"], times[label], strict=True)]
                low, high = stats.log_ratio_t_interval(ratios) if repeats >= 2 else (math.nan, math.nan)
                rows.append(
                    {
                        "shape": f"{out_f}x{in_f}",
                        "tokens": tokens,
                        "variant": label,
                        "kernel": kernel,
                        "copies": len(layers),
                        "bytes_read": read,
                        "us": 1e6 * statistics.median(times[label]),
                        "speedup": statistics.median(ratios),
                        "speedup_ci_low": low,
                        "speedup_ci_high": high,
                    }
                )
    return rows


def to_markdown(rows: list[dict], threads: int, repeats: int, working_set: int, bandwidth: float) -> str:
    lines = [
        "# Kernel benchmark: QuantLinear vs fp32 F.linear, weights streamed from memory",
        "",
        f"Per call: median of {repeats} interleaved repeats over copies of each layer totalling >= "
        f"{working_set / 2**20:.0f} MB (beyond the last-level cache), {threads} thread(s), one process. "
        "Speed-up = fp32 time / variant time per repeat: median [95% t interval].",
        f"Read bandwidth measured in the same process: {bandwidth:.1f} GB/s. Floor = bytes the kernel reads "
        "per call / bandwidth; floor % = floor / time (100% = at the memory limit; small shapes at M=1 "
        "are bound by per-call overhead, not memory).",
        f"Machine: {tracking.provenance()['host.processor']}, torch {torch.__version__}.",
        "",
        "| shape (out x in) | tokens | variant | kernel | KB read | µs | speed-up vs fp32 | floor % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        floor_us = 1e6 * r["bytes_read"] / (bandwidth * 1e9)
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['variant']} | {r['kernel']} | {r['bytes_read'] / 1024:.0f} | "
            f"{r['us']:.1f} | {r['speedup']:.2f}x [{r['speedup_ci_low']:.2f}, {r['speedup_ci_high']:.2f}] | "
            f"{100 * floor_us / r['us']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--working-set-mb", type=int, default=None, help="default: 4x the last-level cache")
    parser.add_argument("--out", type=Path, default=tracking.REPO / "experiments" / "bench")
    args = parser.parse_args()
    llc = last_level_cache_bytes()
    working_set = args.working_set_mb * 2**20 if args.working_set_mb else 4 * (llc or 32 * 2**20)
    with torch_threads(args.threads):
        bandwidth = read_bandwidth_gb_s(buffer_mb=max(256, 4 * working_set // 2**20), repeats=5)
        rows = measure(args.repeats, working_set)
    text = to_markdown(rows, args.threads, args.repeats, working_set, bandwidth)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.md").write_text(text)
    experiment_id = tracking.setup({"uri": None, "experiment": "bench"})
    with mlflow.start_run(experiment_id=experiment_id, run_name="kernels"):
        mlflow.log_params(
            {
                "threads": args.threads,
                "repeats": args.repeats,
                "working_set_bytes": working_set,
                "llc_bytes": llc,
                **tracking.provenance(),
            }
        )
        mlflow.log_metric("mem_bandwidth_gb_s", bandwidth)
        mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "kernels.json")
        mlflow.log_text(text, "kernels.md")
    print(text)


if __name__ == "__main__":
    main()
