"""Low-rank (rank 16, 5 iterations, int4 asym g64) on SmolLM2-135M's block-0 layers: full-SVD factors
(before) vs the Gram eigendecomposition (now), interleaved in one process, 3 repeats.

    python -m benchmarks.lowrank_embedded

Prints per layer: median seconds of ``lowrank_quantize`` each way, the median per-repeat speed-up,
whether the codes are identical, and ``||W - dequant(Q) - A B|| / ||W||`` each way.
"""

from __future__ import annotations

import statistics
import time

import torch
from safetensors import safe_open

from benchmarks.quantize_time import _svd_factors
from pipeline.algorithms import lowrank
from pipeline.assets import embedded_model_dir
from pipeline.quant.primitives import QuantSpec, dequantize

SPEC, BLOCK = QuantSpec(4, False), (1, 64)
LAYERS = {"q_proj": "self_attn", "k_proj": "self_attn", "o_proj": "self_attn", "gate_proj": "mlp", "down_proj": "mlp"}


def _svd(residual: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _svd_factors(residual, rank)
    return a.to(dtype), b.to(dtype)


def _error(w: torch.Tensor, result: tuple) -> float:
    codes, scale, zero, a, b = result
    return float((w - dequantize(codes, scale, zero, BLOCK) - a.float() @ b.float()).norm() / w.norm())


def main() -> None:
    gram = lowrank._factors
    with safe_open(str(embedded_model_dir() / "model.safetensors"), "pt") as f:
        for name, part in LAYERS.items():
            w = f.get_tensor(f"model.layers.0.{part}.{name}.weight").float()
            times, out = {"svd": [], "gram": []}, {}
            for _ in range(3):
                for key, factors in (("svd", _svd), ("gram", gram)):
                    lowrank._factors = factors
                    start = time.perf_counter()
                    out[key] = lowrank.lowrank_quantize(w, SPEC, BLOCK, rank=16, iters=5)
                    times[key].append(time.perf_counter() - start)
            lowrank._factors = gram
            speedup = statistics.median(a / b for a, b in zip(times["svd"], times["gram"], strict=True))
            print(
                f"| {name} {tuple(w.shape)} | {statistics.median(times['svd']):.2f} | "
                f"{statistics.median(times['gram']):.2f} | {speedup:.2f}x | "
                f"{'yes' if torch.equal(out['svd'][0], out['gram'][0]) else 'no'} | "
                f"{_error(w, out['svd']):.6f} | {_error(w, out['gram']):.6f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
