"""The report's figures: accuracy vs bits per weight, vs decode speed-up and vs $ per 1M tokens (with their Pareto
fronts), and the
history of each Optuna study tuned for the experiment."""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import optuna
import pandas as pd
from matplotlib.figure import Figure

from pipeline.report.runs import col, delta_ppl, num

log = logging.getLogger(__name__)


def pareto_front(cost: Sequence[float], loss: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points, by increasing cost: no other point has both lower-or-equal
    cost and lower-or-equal loss with one of them strictly lower. Of identical points, one is kept."""
    cost, loss = list(cost), list(loss)
    front, best = [], math.inf
    for i in sorted(range(len(cost)), key=lambda i: (cost[i], loss[i])):
        if loss[i] < best:  # cheaper points all lose more: nothing dominates this one
            front.append(i)
            best = loss[i]
    return front


def _plot_accuracy(runs: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series, str]:
    """One accuracy axis for all points, with its 95% interval where logged: zero-shot drop if every run
    has it, else Δppl% (always logged)."""
    drop = num(runs, "metrics.acc_drop_pct")
    if drop.notna().all():
        low, high = num(runs, "metrics.acc_drop_pct_ci_low"), num(runs, "metrics.acc_drop_pct_ci_high")
        return drop, low, high, "zero-shot accuracy drop % vs reference (lower is better)"
    low, high = num(runs, "metrics.dppl_pct_ci_low"), num(runs, "metrics.dppl_pct_ci_high")
    return delta_ppl(runs), low, high, "Δppl % vs reference (lower is better)"


def _scatter(ax, points: pd.DataFrame, front: list[int]) -> None:
    x, y = points.x, points.y
    ax.scatter(x, y, s=18, color="C0", zorder=3)
    bars = points.dropna(subset=["low", "high"])
    if not bars.empty:  # 95% intervals, where the runs logged them
        yerr = [(bars.y - bars.low).clip(lower=0), (bars.high - bars.y).clip(lower=0)]
        ax.errorbar(bars.x, bars.y, yerr=yerr, fmt="none", ecolor="C0", alpha=0.5, lw=0.8, zorder=2)
    ax.step(x.iloc[front], y.iloc[front], where="post", color="C3", lw=1.2, zorder=2, label="Pareto front")
    positive = y[y > 0]
    if len(positive) and positive.max() / positive.min() > 100:
        # Losses from a fraction of a percent to thousands: log spacing keeps both readable, and symlog
        # still places 0 (the reference) and gains below it.
        ax.set_yscale("symlog", linthresh=float(positive.min()))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)


def _label(ax, x: pd.Series, y: pd.Series, labels: pd.Series, size: float = 7) -> None:
    """Label each point on the first side (right, left, below right, below left) where the text overlaps
    no label placed before it and stays inside the axes; call it once the axes' scales are set."""
    px = ax.figure.dpi / 72  # points -> pixels
    placed = []
    for xi, yi, label in sorted(zip(x, y, labels), key=lambda p: p[1]):
        cx, cy = ax.transData.transform((xi, yi))
        width, height = 0.6 * size * len(str(label)) * px, size * px  # rough text extent
        candidates = []
        for dx, dy, ha in ((4, 3, "left"), (-4, 3, "right"), (4, -10, "left"), (-4, -10, "right")):
            x0 = cx + dx * px - (width if ha == "right" else 0)
            candidates.append(((dx, dy, ha), (x0, cy + dy * px, x0 + width, cy + dy * px + height)))
        free = [
            c
            for c in candidates
            if ax.bbox.x0 <= c[1][0]
            and c[1][2] <= ax.bbox.x1
            and not any(b[0] < c[1][2] and c[1][0] < b[2] and b[1] < c[1][3] and c[1][1] < b[3] for b in placed)
        ]
        (dx, dy, ha), box = (free or candidates)[0]
        placed.append(box)
        ax.annotate(str(label), (xi, yi), xytext=(dx, dy), textcoords="offset points", fontsize=size, ha=ha)


def _points(runs: pd.DataFrame, x_field: str) -> pd.DataFrame:
    y, low, high, y_label = _plot_accuracy(runs)
    points = pd.DataFrame(
        {"x": num(runs, x_field), "y": y, "low": low, "high": high, "label": col(runs, "tags.method").fillna("?")}
    )
    return points.dropna(subset=["x", "y"]).reset_index(drop=True).assign(y_label=y_label)


def plot_accuracy_vs_bits(runs: pd.DataFrame, title: str = "") -> Figure:
    """Accuracy loss vs bits per weight, one labelled point per run; Pareto front: fewer bits, lower loss."""
    points = _points(runs, "metrics.bits_per_weight")
    fig = Figure(figsize=(8, 5), layout="constrained")  # no pyplot: works under any backend, inline too
    ax = fig.subplots()
    if points.empty:
        ax.set_title(f"{title}: no run has bits per weight and accuracy")
        return fig
    _scatter(ax, points, pareto_front(points.x, points.y))
    ax.set_xscale("log", base=2)
    ticks = [t for t in (2, 3, 4, 5, 6, 8, 12, 16, 32) if points.x.min() / 1.2 <= t <= points.x.max() * 1.2]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    _label(ax, points.x, points.y, points.label)
    ax.set_xlabel("bits per weight (quantized layers, scales and zero points included)")
    ax.set_ylabel(points.y_label[0])
    ax.set_title(f"{title}: accuracy vs bits".strip(": "))
    return fig


def plot_accuracy_vs_speed(runs: pd.DataFrame, title: str = "") -> Figure | None:
    """Accuracy loss vs decode speed-up, runs that were profiled only; None if none was."""
    points = _points(runs, "metrics.speedup_vs_ref")
    if points.empty:
        return None
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    _scatter(ax, points, pareto_front(-points.x, points.y))  # faster and lower loss
    ax.axvline(1.0, color="grey", ls="--", lw=0.8)
    _label(ax, points.x, points.y, points.label)
    ax.set_xlabel("decode speed-up vs the reference (batch 1)")
    ax.set_ylabel(points.y_label[0])
    ax.set_title(f"{title}: accuracy vs speed".strip(": "))
    return fig


def plot_accuracy_vs_cost(runs: pd.DataFrame, title: str = "") -> Figure | None:
    """Accuracy loss vs $ per million generated tokens (batch 1), runs that were profiled only; Pareto front:
    cheaper and lower loss. None if no run logged ``usd_per_1m_tokens``."""
    points = _points(runs, "metrics.usd_per_1m_tokens")
    if points.empty:
        return None
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    _scatter(ax, points, pareto_front(points.x, points.y))
    _label(ax, points.x, points.y, points.label)
    ax.set_xlabel("$ per 1M generated tokens (profile.cost.usd_per_hour / decode tok/s, batch 1)")
    ax.set_ylabel(points.y_label[0])
    ax.set_title(f"{title}: accuracy vs cost".strip(": "))
    return fig


def plot_studies(experiment: str, storage: str, out_dir: Path, studies: set[str] = frozenset()) -> list[Path]:
    """``history_<study>.png`` for each Optuna study whose ``user_attrs["experiment"]`` is this experiment,
    and for the ``studies`` named (those the experiment's tuned runs came from)."""
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).exists():
        log.info("no Optuna storage at %s: no study plots", storage)  # opening it would create an empty one
        return []
    import matplotlib.pyplot as plt  # optuna's plots draw through pyplot
    from optuna.visualization import matplotlib as optuna_plots

    paths = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if summary.user_attrs.get("experiment") != experiment and summary.study_name not in studies:
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            plot = (
                optuna_plots.plot_pareto_front if len(study.directions) > 1 else optuna_plots.plot_optimization_history
            )
            ax = plot(study)
        ax.set_title(f"{summary.study_name}: {ax.get_title()}")
        safe_name = re.sub(r"[^\w.-]+", "_", summary.study_name)  # a study name may hold '/' or spaces
        path = out_dir / f"history_{safe_name}.png"
        ax.figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
        paths.append(path)
    return paths
