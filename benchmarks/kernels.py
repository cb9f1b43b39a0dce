"""Kernel benchmark: each QuantLinear configuration against fp32 F.linear, side by side.

    python -m benchmarks.kernels [--threads 1] [--repeats 20]

For every linear shape of the embedded model and several token counts, times fp32, bf16 and
each method's QuantLinear (its real kernel, and the dequantize fallback) in one process,
interleaved, one thread; reports median microseconds and the ratio to fp32. Written to
experiments/bench/kernels.md and logged to the MLflow experiment "bench".
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F

from pipeline import tracking
from pipeline.profile import torch_threads
from pipeline.quant.linear import ActivationQuant, QuantLinear
from pipeline.quant.primitives import QuantSpec, block_size_for

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in): q/o, k/v, gate/up, down
TOKENS = [1, 8, 64]
ACT8 = ActivationQuant(QuantSpec(8, True, scale_dtype=torch.float32), "dynamic")
CONFIGS = {  # name -> (bits, symmetric, granularity, group_size, activation)
    "int8 per-channel (weight_only)": (8, True, "per_channel", None, None),
    "int8 W8A8 dynamic (ptq_dynamic)": (8, True, "per_channel", None, ACT8),
    "int4 asym g64 (group_wise)": (4, False, "group", 64, None),
    "int4 sym per-channel (per_channel)": (4, True, "per_channel", None, None),
    "int3 asym g64": (3, False, "group", 64, None),
    "int2 asym g32": (2, False, "group", 32, None),
}


def _median_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


@torch.no_grad()
def measure(repeats: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f in SHAPES:
        weight = torch.randn(out_f, in_f, generator=gen) * 0.02
        layers = {}
        for name, (bits, sym, gran, group, act) in CONFIGS.items():
            block = block_size_for(weight.shape, gran, group)
            for pref in ("auto", "dequant"):
                layer = QuantLinear.from_float(
                    weight, QuantSpec(bits, sym), block, activation=act, kernel_preference=pref
                )
                if pref == "dequant" and layers.get((name, "auto")) and layers[(name, "auto")].kernel == "dequant":
                    continue  # no kernel for this config: the auto row already is the fallback
                layers[(name, pref)] = layer
        bf16 = weight.bfloat16()
        for tokens in TOKENS:
            x = torch.randn(tokens, in_f, generator=gen)
            fp32_us = _median_us(lambda x=x, w=weight: F.linear(x, w), repeats)
            bf16_us = _median_us(lambda x=x, w=bf16: F.linear(x.bfloat16(), w), repeats)
            base = {"shape": f"{out_f}x{in_f}", "tokens": tokens}
            rows.append({**base, "variant": "fp32", "kernel": "F.linear", "us": fp32_us, "speedup": 1.0})
            rows.append({**base, "variant": "bf16", "kernel": "F.linear", "us": bf16_us, "speedup": fp32_us / bf16_us})
            for (name, _), layer in layers.items():
                us = _median_us(lambda x=x, layer=layer: layer(x), repeats)
                rows.append({**base, "variant": name, "kernel": layer.kernel, "us": us, "speedup": fp32_us / us})
    return rows


def to_markdown(rows: list[dict], threads: int, repeats: int) -> str:
    lines = [
        "# Kernel benchmark: QuantLinear vs fp32 F.linear",
        "",
        f"Median of {repeats} calls, {threads} thread(s), one process; speed-up = fp32 time / variant time.",
        f"Machine: {tracking.provenance()['host.processor']}, torch {torch.__version__}.",
        "",
        "| shape (out x in) | tokens | variant | kernel | µs | speed-up vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['variant']} | {r['kernel']} | {r['us']:.1f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=tracking.REPO / "experiments" / "bench")
    args = parser.parse_args()
    with torch_threads(args.threads):
        rows = measure(args.repeats)
    text = to_markdown(rows, args.threads, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.md").write_text(text)
    experiment_id = tracking.setup({"uri": None, "experiment": "bench"})
    with mlflow.start_run(experiment_id=experiment_id, run_name="kernels"):
        mlflow.log_params({"threads": args.threads, "repeats": args.repeats, **tracking.provenance()})
        mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "kernels.json")
        mlflow.log_text(text, "kernels.md")
    print(text)


if __name__ == "__main__":
    main()
