"""Intervals for the comparisons the tables make: small pure functions on tensors.

Every interval here is two-sided at ``LEVEL``. Bootstraps are vectorized (one gather per statistic)
and seeded, so a rerun gives the same interval to the last digit.
"""

from __future__ import annotations

import math

import torch
from scipy import stats as scipy_stats

LEVEL = 0.95


def resample_indices(n_units: int, resamples: int, generator: torch.Generator) -> torch.Tensor:
    """(resamples, n_units) indices drawn with replacement from ``range(n_units)``."""
    if n_units < 1 or resamples < 1:
        raise ValueError(f"a bootstrap needs at least one unit and one resample, got {n_units} and {resamples}")
    return torch.randint(0, n_units, (resamples, n_units), generator=generator)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def percentile_interval(draws: torch.Tensor, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` share of bootstrap draws (percentile method)."""
    alpha = (1.0 - level) / 2
    low, high = torch.quantile(draws.double(), torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(low), float(high)


def unit_sums(values: torch.Tensor, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit sums of ``values`` and per-unit counts, for units labelled 0..U-1 (e.g. window indices)."""
    if values.shape != units.shape:
        raise ValueError(f"values {tuple(values.shape)} and unit labels {tuple(units.shape)} differ in shape")
    n_units = int(units.max()) + 1
    sums = torch.zeros(n_units, dtype=torch.float64).index_add_(0, units, values.double())
    counts = torch.zeros(n_units, dtype=torch.float64).index_add_(
        0, units, torch.ones_like(values, dtype=torch.float64)
    )
    return sums, counts


def resampled_means(sums: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The token-weighted mean of each resample: sum of the drawn units' sums over their counts."""
    return sums[indices].sum(-1) / counts[indices].sum(-1)


def log_ratio_t_interval(ratios: list[float], level: float = LEVEL) -> tuple[float, float]:
    """Student-t interval for the geometric mean of positive ratios (on their logarithms).

    Timing ratios are multiplicative and few (one per repeat), so the bootstrap has too few units;
    the t interval on logs is the small-sample choice. Needs at least two ratios.
    """
    if len(ratios) < 2 or not all(r > 0 and math.isfinite(r) for r in ratios):
        raise ValueError(f"an interval over repeats needs at least two positive ratios, got {ratios}")
    logs = torch.tensor([math.log(r) for r in ratios], dtype=torch.float64)
    half = float(scipy_stats.t.ppf(0.5 + level / 2, len(ratios) - 1)) * float(logs.std()) / math.sqrt(len(ratios))
    centre = float(logs.mean())
    return math.exp(centre - half), math.exp(centre + half)
