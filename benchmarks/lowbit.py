"""The fused low-bit kernel against fp32 F.linear and aten int4, with weights streamed from memory.

    python -m benchmarks.lowbit [--threads 1] [--rounds 15] [--tokens 1 8] [--working-set-mb 96]

A real model's layers are not cache-resident between calls, so every variant cycles through
enough copies of its layer that the bytes it reads exceed ``--working-set-mb`` (default 96 MB,
well over this machine's 16 MB L3). Each round times one pass over all copies of every variant,
the variants interleaved, so load from other processes hits them alike; the table reports the
median per-call time over rounds and its ratio to fp32 in the same process.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.profile import torch_threads
from pipeline.quant.linear import QuantLinear
from pipeline.quant.primitives import QuantSpec, block_size_for

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]  # (out, in)
VARIANTS = {  # name -> (bits, symmetric, granularity, group, kernel)
    "lowbit 2-bit g32": (2, False, "group", 32, "lowbit_cpu"),
    "lowbit 3-bit g64": (3, False, "group", 64, "lowbit_cpu"),
    "lowbit 4-bit g64": (4, False, "group", 64, "lowbit_cpu"),
    "lowbit 8-bit per-channel": (8, True, "per_channel", None, "lowbit_cpu"),
    "aten int4 g64": (4, False, "group", 64, "aten_int4_groupwise"),
}


def _bytes_read(layer: QuantLinear) -> int:
    """Bytes one call reads: the tensors of the kernel's state (the stored codes where it reads those)."""
    state = layer._kernel_state.values()  # what the kernel touches, not what is stored
    return sum(t.numel() * t.element_size() for t in state if isinstance(t, torch.Tensor))


def _copies(nbytes: int, working_set: int) -> int:
    return max(1, -(-working_set // nbytes))


def _variants(out_f: int, in_f: int, working_set: int) -> dict[str, tuple[list, int]]:
    """name -> (callables over distinct copies, bytes one call reads)."""
    weight = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)) * 0.02
    fp32 = [weight.clone() for _ in range(_copies(weight.numel() * 4, working_set))]
    out = {"fp32 F.linear": ([lambda x, w=w: F.linear(x, w) for w in fp32], weight.numel() * 4)}
    for name, (bits, sym, gran, group, kernel) in VARIANTS.items():
        layer = QuantLinear.from_float(
            weight, QuantSpec(bits, sym), block_size_for(weight.shape, gran, group), kernel_preference=kernel
        )
        nbytes = _bytes_read(layer)
        # deepcopy keeps the state sharing the stored tensors, as in the original layer
        layers = [layer] + [copy.deepcopy(layer) for _ in range(_copies(nbytes, working_set) - 1)]
        out[name] = (layers, nbytes)
    return out


@torch.no_grad()
def measure(rounds: int, tokens: list[int], working_set: int) -> list[dict]:
    rows = []
    for out_f, in_f in SHAPES:
        variants = _variants(out_f, in_f, working_set)
        for m in tokens:
            x = torch.randn(m, in_f)
            wall: dict[str, list[float]] = {name: [] for name in variants}
            cpu: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(rounds + 1):  # the first round warms up and is dropped
                for name, (calls, _) in variants.items():
                    start, start_cpu = time.perf_counter(), time.thread_time()
                    for call in calls:
                        call(x)
                    wall[name].append((time.perf_counter() - start) / len(calls))
                    cpu[name].append((time.thread_time() - start_cpu) / len(calls))
            fp32_us = 1e6 * statistics.median(wall["fp32 F.linear"][1:])
            fp32_cpu_us = 1e6 * statistics.median(cpu["fp32 F.linear"][1:])
            for name, (calls, nbytes) in variants.items():
                us = 1e6 * statistics.median(wall[name][1:])
                cpu_us = 1e6 * statistics.median(cpu[name][1:])
                rows.append(
                    {
                        "shape": f"{out_f}x{in_f}",
                        "tokens": m,
                        "variant": name,
                        "copies": len(calls),
                        "us": us,
                        "speedup": fp32_us / us,
                        "cpu_us": cpu_us,
                        "cpu_speedup": fp32_cpu_us / cpu_us,
                        "gb_per_s": nbytes / us / 1e3,
                    }
                )
    return rows


def to_markdown(rows: list[dict], threads: int, rounds: int, working_set_mb: int) -> str:
    lines = [
        f"Median per-call time over {rounds} rounds, {threads} thread(s), weights streamed "
        f"(copies cycled so each variant reads > {working_set_mb} MB per round); speed-up = fp32 / variant. "
        "CPU µs is this thread's CPU time (time.thread_time), which leaves out the time other processes "
        "held the core.",
        "",
        "| shape (out x in) | tokens | variant | copies | µs | speed-up | CPU µs | CPU speed-up | weight GB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['variant']} | {r['copies']} | {r['us']:.1f} "
            f"| {r['speedup']:.2f}x | {r['cpu_us']:.1f} | {r['cpu_speedup']:.2f}x | {r['gb_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--working-set-mb", type=int, default=96)
    parser.add_argument("--shapes", nargs="+", help="e.g. 4096x4096 (default: the four standard shapes)")
    args = parser.parse_args()
    if args.shapes:
        SHAPES[:] = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    with torch_threads(args.threads):
        rows = measure(args.rounds, args.tokens, args.working_set_mb * 2**20)
    print(to_markdown(rows, args.threads, args.rounds, args.working_set_mb))


if __name__ == "__main__":
    main()
