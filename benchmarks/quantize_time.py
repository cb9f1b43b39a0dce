"""Quantization time per step on Llama-3.2-1B-shaped layers (hidden 2048, intermediate 8192).

    python -m benchmarks.quantize_time [--repeats 3] [--lowrank-repeats 1] [--awq-grid 2] [--skip-down]

Random weights and inputs (the values are meaningless, the time is real), one process:

- GPTQ W4 g128 asym on gate/up (8192 x 2048) and down (2048 x 8192): ``torch.set_num_threads(t)``
  for t = 1, 2, interleaved per repeat; ``hessian`` (damped inverse Cholesky) and ``sweep``
  seconds from ``gptq_quantize``'s timings, speed-up 1 -> 2 threads per repeat, and whether the
  codes are bit-identical across thread counts.
- Low-rank factors (rank 16): the full SVD the code used before (``torch.linalg.svd``, then the top
  16) against ``lowrank._factors`` (eigendecomposition of the smaller Gram matrix), interleaved,
  with the relative difference of the two rank-16 products.
- AWQ's scale search (``awq.search_scale``) per layer group, seconds per candidate (run with
  ``--awq-grid`` candidates; the preset searches 20).

Written to experiments/scale/quantize_time_layers.md (host, torch, commit at the top).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pipeline import tracking
from pipeline.algorithms import awq, lowrank
from pipeline.algorithms.gptq import gptq_quantize, hessian_from_inputs
from pipeline.quant.primitives import QuantSpec, block_size_for

HIDDEN, INTERMEDIATE, KV = 2048, 8192, 512  # Llama-3.2-1B
SPEC = QuantSpec(4, False)
CALIBRATION_ROWS = 4096


def _inputs(features: int, seed: int) -> torch.Tensor:
    """Calibration-like inputs: a few channels much larger than the rest, as in LLM activations."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(CALIBRATION_ROWS, features, generator=generator) * torch.logspace(1, -1, features)


def _svd_factors(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors as computed before: a full SVD, then the top ``rank`` pairs."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def bench_gptq(shapes: list[tuple[str, int, int]], repeats: int) -> list[dict]:
    rows = []
    for name, out_features, in_features in shapes:
        w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
        h = hessian_from_inputs(_inputs(in_features, 1))
        block = block_size_for(w.shape, "group", 128)
        runs: dict[int, list[dict]] = {1: [], 2: []}
        codes: dict[int, torch.Tensor] = {}
        for _ in range(repeats):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                timings: dict[str, float] = {}
                (q, _, _), total = _timed(gptq_quantize, w, h, SPEC, block, timings=timings)
                runs[threads].append({**timings, "total": total})
                codes[threads] = q
        ratio = {k: [a[k] / b[k] for a, b in zip(runs[1], runs[2], strict=True)] for k in ("hessian", "sweep", "total")}
        rows.append(
            {
                "layer": f"{name} ({out_features} x {in_features})",
                **{f"{k}_{t}": statistics.median(r[k] for r in runs[t]) for t in (1, 2) for k in ratio},
                **{f"speedup_{k}": statistics.median(v) for k, v in ratio.items()},
                **{f"speedup_{k}_range": (min(v), max(v)) for k, v in ratio.items()},
                "identical": torch.equal(codes[1], codes[2]),
            }
        )
    return rows


def bench_lowrank(shapes: list[tuple[int, int]], repeats: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for out_features, in_features in shapes:
        residual = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(2)) * 0.01
        before, after = [], []
        for _ in range(repeats):
            (a0, b0), t0 = _timed(_svd_factors, residual, 16)
            (a1, b1), t1 = _timed(lowrank._factors, residual, 16, torch.float32)
            before.append(t0)
            after.append(t1)
        reference = a0 @ b0
        rows.append(
            {
                "shape": f"{out_features} x {in_features}",
                "svd_s": statistics.median(before),
                "gram_s": statistics.median(after),
                "speedup": statistics.median(b / a for a, b in zip(after, before, strict=True)),
                "rel_diff": float((a1 @ b1 - reference).norm() / reference.norm()),
            }
        )
    return rows


def bench_awq(grid: int, threads: int, skip_down: bool) -> list[dict]:
    torch.set_num_threads(threads)
    groups = [
        ("q,k,v (input_layernorm)", HIDDEN, [HIDDEN, KV, KV]),
        ("o_proj", HIDDEN, [HIDDEN]),
        ("gate,up (post_attention_layernorm)", HIDDEN, [INTERMEDIATE, INTERMEDIATE]),
    ]
    if not skip_down:
        groups.append(("down_proj", INTERMEDIATE, [HIDDEN]))
    rows = []
    for name, in_features, outs in groups:
        x = _inputs(in_features, 3)
        gram = (x.T @ x) * (2.0 / x.shape[0])
        weights = [torch.randn(o, in_features, generator=torch.Generator().manual_seed(o)) for o in outs]
        blocks = [block_size_for(w.shape, "group", 128) for w in weights]
        _, seconds = _timed(awq.search_scale, gram, x.abs().mean(0), weights, SPEC, blocks, grid)
        rows.append({"group": name, "in": in_features, "per_candidate_s": seconds / grid})
    return rows


def to_markdown(gptq: list[dict], low: list[dict], awq_rows: list[dict], args: argparse.Namespace) -> str:
    info = tracking.provenance()
    lines = [
        "# Quantization time per step, Llama-3.2-1B-shaped layers (random weights)",
        "",
        f"`python -m benchmarks.quantize_time --repeats {args.repeats} --lowrank-repeats {args.lowrank_repeats} "
        f"--awq-grid {args.awq_grid}{' --skip-down' if args.skip_down else ''}` at commit {info['git.commit'][:7]} "
        f"(dirty: {info['git.dirty']}), {info['host.processor']}, {info['host.cpu_count']} cores, "
        f"torch {torch.__version__}. Shared machine: other processes ran beside it, so times are noisy; "
        "ratios are per repeat, interleaved, in one process.",
        "",
        f"## GPTQ W4 g128 asym, {CALIBRATION_ROWS} calibration rows: 1 vs 2 threads "
        f"(median of {args.repeats}; speed-up = 1-thread / 2-thread time, median [min, max] over repeats)",
        "",
        "| layer | hessian s (1 / 2 thr) | sweep s (1 / 2 thr) | total s (1 / 2 thr) | speed-up sweep | "
        "speed-up total | codes bit-identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in gptq:
        lo, hi = r["speedup_sweep_range"]
        tlo, thi = r["speedup_total_range"]
        lines.append(
            f"| {r['layer']} | {r['hessian_1']:.2f} / {r['hessian_2']:.2f} | {r['sweep_1']:.2f} / {r['sweep_2']:.2f} | "
            f"{r['total_1']:.2f} / {r['total_2']:.2f} | {r['speedup_sweep']:.2f}x [{lo:.2f}, {hi:.2f}] | "
            f"{r['speedup_total']:.2f}x [{tlo:.2f}, {thi:.2f}] | {'yes' if r['identical'] else 'NO'} |"
        )
    lines += [
        "",
        f"## Low-rank factors, rank 16 ({args.threads} threads, median of {args.lowrank_repeats})",
        "",
        "| residual | full SVD s (before) | Gram eigh s (now) | speed-up | rel. diff of A@B |",
        "|---|---|---|---|---|",
    ]
    for r in low:
        lines.append(
            f"| {r['shape']} | {r['svd_s']:.2f} | {r['gram_s']:.2f} | {r['speedup']:.1f}x | {r['rel_diff']:.1e} |"
        )
    lines += [
        "",
        f"## AWQ scale search ({args.threads} threads), seconds per candidate (the preset tries 20 per group)",
        "",
        "| group | in features | s per candidate |",
        "|---|---|---|",
    ]
    lines += [f"| {r['group']} | {r['in']} | {r['per_candidate_s']:.2f} |" for r in awq_rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lowrank-repeats", type=int, default=1)
    parser.add_argument("--awq-grid", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads for the low-rank and AWQ parts")
    parser.add_argument("--skip-down", action="store_true", help="leave out the 8192-input layers (slow)")
    parser.add_argument("--out", type=Path, default=tracking.REPO / "experiments" / "scale")
    args = parser.parse_args()
    gptq_shapes = [("gate_proj", INTERMEDIATE, HIDDEN)] + (
        [] if args.skip_down else [("down_proj", HIDDEN, INTERMEDIATE)]
    )
    gptq = bench_gptq(gptq_shapes, args.repeats)
    low = bench_lowrank(
        [(HIDDEN, HIDDEN), (HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)], args.lowrank_repeats, args.threads
    )
    awq_rows = bench_awq(args.awq_grid, args.threads, args.skip_down)
    text = to_markdown(gptq, low, awq_rows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize_time_layers.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
