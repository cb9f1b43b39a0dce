"""GPTQ's column sweep: the C++ loop (csrc/gptq_sweep.cpp) against the same loop in torch ops.

    python -m benchmarks.gptq_sweep [--repeats 3] [--threads 2] [--skip-1b]

Random weights and calibration-like inputs (the values are meaningless, the time is real), one
process: for each layer shape, ``gptq_quantize`` (W4 g64 asym, and W2 g32 act-order) with the torch
sweep and the C++ sweep interleaved per repeat; the ``sweep`` seconds from its timings, the speed-up
per repeat (median [min, max]) and whether the codes are bit-identical. Shapes: SmolLM2-135M's
(hidden 576, intermediate 1536) and, unless --skip-1b, Llama-3.2-1B's gate and down projections.

Written to experiments/scale/gptq_sweep.md (host, torch, commit at the top).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from pipeline import tracking
from pipeline.algorithms import gptq
from pipeline.quant.primitives import QuantSpec

SHAPES_135M = [("q_proj", 576, 576), ("gate_proj", 1536, 576), ("down_proj", 576, 1536)]
SHAPES_1B = [("gate_proj", 8192, 2048), ("down_proj", 2048, 8192)]
SETTINGS = [("W4 g64", QuantSpec(4, False), 64, False), ("W2 g32 act-order", QuantSpec(2, False), 32, True)]
CALIBRATION_ROWS = 4096


def _hessian(features: int) -> torch.Tensor:
    """From calibration-like inputs: a few channels much larger than the rest, as in LLM activations."""
    x = torch.randn(CALIBRATION_ROWS, features, generator=torch.Generator().manual_seed(1))
    return gptq.hessian_from_inputs(x * torch.logspace(1, -1, features))


def _sweep_seconds(w, h, spec, group, act_order, sweep) -> tuple[float, torch.Tensor]:
    original = gptq.sweep_columns_for
    gptq.sweep_columns_for = lambda _device: sweep  # the one switch gptq_quantize reads
    try:
        timings: dict[str, float] = {}
        codes, _, _ = gptq.gptq_quantize(w, h, spec, (1, group), act_order=act_order, timings=timings)
    finally:
        gptq.sweep_columns_for = original
    return timings["sweep"], codes


def bench(shapes: list[tuple[str, int, int]], repeats: int) -> list[dict]:
    cpp_sweep = gptq.sweep_columns_for(torch.device("cpu"))
    if cpp_sweep is gptq.sweep_columns_torch:
        raise SystemExit("the gptq_sweep kernel is not built here: nothing to compare (make setup builds it)")
    rows = []
    for name, out_features, in_features in shapes:
        w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
        h = _hessian(in_features)
        for setting, spec, group, act_order in SETTINGS:
            seconds: dict[str, list[float]] = {"torch": [], "cpp": []}
            codes = {}
            for _ in range(repeats):
                for kind, sweep in (("torch", gptq.sweep_columns_torch), ("cpp", cpp_sweep)):
                    s, codes[kind] = _sweep_seconds(w, h, spec, group, act_order, sweep)
                    seconds[kind].append(s)
            ratios = [a / b for a, b in zip(seconds["torch"], seconds["cpp"], strict=True)]
            rows.append(
                {
                    "layer": f"{name} ({out_features} x {in_features})",
                    "setting": setting,
                    "torch_s": statistics.median(seconds["torch"]),
                    "cpp_s": statistics.median(seconds["cpp"]),
                    "speedup": statistics.median(ratios),
                    "range": (min(ratios), max(ratios)),
                    "identical": torch.equal(codes["torch"], codes["cpp"]),
                }
            )
            print(rows[-1], flush=True)
    return rows


def to_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    info = tracking.provenance()
    lines = [
        "# GPTQ column sweep: C++ (csrc/gptq_sweep.cpp) vs torch ops",
        "",
        f"`python -m benchmarks.gptq_sweep --repeats {args.repeats} --threads {args.threads}"
        f"{' --skip-1b' if args.skip_1b else ''}` at commit {info['git.commit'][:7]} (dirty: {info['git.dirty']}), "
        f"{info['host.processor']}, {info['host.cpu_count']} cores, torch {torch.__version__}, "
        f"{args.threads} threads. Random weights, {CALIBRATION_ROWS} calibration-like rows; sweep seconds "
        f"(median of {args.repeats}), speed-up = torch / C++ per repeat, median [min, max], "
        "interleaved in one process.",
        "",
        "| layer | setting | torch sweep s | C++ sweep s | speed-up | codes bit-identical |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["range"]
        lines.append(
            f"| {r['layer']} | {r['setting']} | {r['torch_s']:.3f} | {r['cpp_s']:.3f} | "
            f"{r['speedup']:.1f}x [{lo:.1f}, {hi:.1f}] | {'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-1b", action="store_true", help="only the SmolLM2-135M shapes")
    parser.add_argument("--out", type=Path, default=tracking.REPO / "experiments" / "scale")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = bench(SHAPES_135M + ([] if args.skip_1b else SHAPES_1B), args.repeats)
    text = to_markdown(rows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gptq_sweep.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
