"""The report of an experiment, read back from MLflow: method table, precision table, plots.

    python -m pipeline.report --experiment compare [--tracking-uri URI] [--out DIR] [--storage OPTUNA_URL]

Reads the FINISHED runs of one experiment (the latest run of each run name; a method repeated over
seeds counts once, through its parent run's means) and writes to ``experiments/<experiment>/`` and,
as artifacts, to one summary run (tag ``quantbench.summary=report``) in the same experiment:

- ``methods.{md,csv}``: one row per method run: accuracy, KL, memory, speed, stability, settings.
- ``precision.md``: the article's precision table (FP / 8 / 4 / 2 bits), measured, next to its words.
- ``accuracy_vs_bits.png`` (with the Pareto front), ``accuracy_vs_speed.png``, and
  ``history_<study>.png`` for each Optuna study tuned for this experiment.
- ``comparison.{md,csv}``: every run's raw numbers, and methods side by side at each setting.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import mlflow
import optuna
import pandas as pd
from matplotlib.figure import Figure

from pipeline import tracking
from pipeline.tasks import TASK_GROUPS as GROUPS

log = logging.getLogger(__name__)

SUMMARY_TAG = "quantbench.summary"
DEFAULT_STORAGE = f"sqlite:///{tracking.DEFAULT_STORE / 'optuna.db'}"

# The article's verdict per precision, shown next to what we measure: the table under "Accuracy vs
# Efficiency: Lessons from the Quantization Methods Comparison" (../shared/reference/000_a51b381b08561bd5.txt,
# lines 53-58). Its first row is FP16; our reference is the model as loaded.
ARTICLE = {
    "FP": {"accuracy": "Excellent", "memory": "High", "speed": "Baseline", "stability": "Very High"},
    "8-bit": {"accuracy": "Near-Perfect", "memory": "Medium", "speed": "Faster", "stability": "Very High"},
    "4-bit": {"accuracy": "Very Good", "memory": "Low", "speed": "Much Faster", "stability": "High"},
    "2-bit": {"accuracy": "Good", "memory": "Very Low", "speed": "Fastest", "stability": "Medium"},
}


# ---------------------------------------------------------------------------------------------
# Runs


class ReportError(ValueError):
    """Nothing to report: the experiment does not exist or has no finished runs."""


def load_runs(experiment: str) -> pd.DataFrame:
    """The experiment's finished runs, one per run name (the latest); summaries and seed children left out.

    The parent of a method repeated over seeds logs ``<metric>_mean`` / ``<metric>_std``; the means
    fill ``<metric>`` so that the parent reads like a single run everywhere below.
    """
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportError(f"no MLflow experiment {experiment!r} in {mlflow.get_tracking_uri()}; {_experiments()}")
    runs = mlflow.search_runs(
        [exp.experiment_id], filter_string="attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"]
    )
    if not runs.empty:
        summary = _col(runs, f"tags.{SUMMARY_TAG}").notna()
        child = _col(runs, "tags.seed").notna() & _col(runs, "tags.mlflow.parentRunId").notna()
        runs = runs[~summary & ~child].drop_duplicates("tags.mlflow.runName")  # sorted newest first
    if runs.empty:
        raise ReportError(f"experiment {experiment!r} has no finished runs; {_experiments()}")
    means = [c for c in runs.columns if c.startswith("metrics.") and c.endswith("_mean")]
    filled = {c.removesuffix("_mean"): _col(runs, c.removesuffix("_mean")).fillna(runs[c]) for c in means}
    runs = runs.assign(**filled)
    # A run that measured nothing of a model (a tuning study's parent run, say) has no row to fill.
    measured = runs.filter(["metrics.ppl", "metrics.acc_avg", "metrics.kl_vs_ref", "metrics.bits_per_weight"])
    runs = runs[measured.notna().any(axis=1)]
    if runs.empty:
        raise ReportError(f"experiment {experiment!r} has no finished runs that measured a model; {_experiments()}")
    return runs.reset_index(drop=True)


def _experiments() -> str:
    names = [e.name for e in mlflow.search_experiments()]
    return f"experiments: {', '.join(names) or 'none'}"


def _col(runs: pd.DataFrame, field: str) -> pd.Series:
    """A column, or all-missing where no run logged that field (older runs, stages switched off)."""
    return runs[field] if field in runs else pd.Series(float("nan"), index=runs.index, dtype=object)


def _num(runs: pd.DataFrame, field: str) -> pd.Series:
    return pd.to_numeric(_col(runs, field), errors="coerce")


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _value(run: pd.Series, field: str) -> float:
    """One run's number, NaN where it has none."""
    return pd.to_numeric(run.get(field), errors="coerce")


def accuracy(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: which accuracy metric it has, its value, its drop vs the reference (%, lower is better), its std.

    Zero-shot task accuracy (``acc_avg``, ``acc_drop_pct``) where the run measured it, else
    perplexity with Δppl% = 100 * (ppl / ppl_ref - 1). The std is across seeds, for repeated runs.
    """
    zero_shot = _num(runs, "metrics.acc_drop_pct").notna()
    delta_ppl = 100 * (_num(runs, "metrics.ppl") / _num(runs, "metrics.ppl_ref") - 1)
    return pd.DataFrame(
        {
            "metric": zero_shot.map({True: "acc_avg", False: "ppl"}),
            "value": _num(runs, "metrics.acc_avg").where(zero_shot, _num(runs, "metrics.ppl")),
            "drop_pct": _num(runs, "metrics.acc_drop_pct").where(zero_shot, delta_ppl),
            "std": _num(runs, "metrics.acc_avg_std").where(zero_shot, _num(runs, "metrics.ppl_std")),
        },
        index=runs.index,
    )


def _bits(runs: pd.DataFrame) -> pd.Series:
    """Nominal weight bits of each run's method (NaN for the reference)."""
    return _num(runs, "params.method.bits").fillna(_num(runs, "tags.bits"))


def _setting(bits, granularity, group_size) -> str:
    if _missing(bits) or str(bits) == "None":
        return "-"
    if _missing(granularity) or str(granularity) == "None":
        return f"{bits}-bit"
    return f"{bits}-bit " + (f"g{group_size}" if granularity == "group" else str(granularity))


def _settings(runs: pd.DataFrame) -> list[str]:
    columns = ("params.method.bits", "params.method.granularity", "params.method.group_size")
    return [_setting(*values) for values in zip(*(_col(runs, c) for c in columns))]


def _tuned(overrides, study, tuned_settings) -> str:
    """What was set beyond the preset: the run's overrides, and the Optuna study and settings it chose."""
    # method= and experiment= are in the table already; what is left was set by hand or by a tuner.
    items = [] if _missing(overrides) else str(overrides).split()
    if not _missing(tuned_settings):
        items += str(tuned_settings).split()
    text = " ".join(o for o in items if not o.startswith(("method=", "experiment=")))
    if not _missing(study):
        return f"study {study}: {text}" if text else f"study {study}"
    return text or "-"


# ---------------------------------------------------------------------------------------------
# Tables

METHOD_COLUMNS = {  # column -> format of its cells
    "method": "{}",
    "family": "{}",
    "setting": "{}",
    "bits/weight": "{:.2f}",
    "accuracy metric": "{}",
    "accuracy": "{:.4g}",
    "drop %": "{:+.1f}",
    "KL": "{:.4f}",
    "weight MB": "{:.1f}",
    "mem -% layers": "{:.0f}",
    "mem -% model": "{:.0f}",
    "decode tok/s": "{:.1f}",
    "speed-up": "{:.2f}x",
    "stability (std)": "±{:.3g}",
    "tuned settings": "{}",
    "kernels": "{}",
    "gen match": "{:.3f}",
}


def method_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per method run (the reference first), raw values; missing numbers stay NaN."""
    acc = accuracy(runs)
    bpw = _num(runs, "metrics.bits_per_weight")
    table = pd.DataFrame(
        {
            "method": _col(runs, "tags.method"),
            "family": _col(runs, "tags.family"),
            "setting": _settings(runs),
            "bits/weight": bpw,
            "accuracy metric": acc["metric"],
            "accuracy": acc["value"],
            "drop %": acc["drop_pct"],
            "KL": _num(runs, "metrics.kl_vs_ref"),
            "weight MB": _num(runs, "metrics.weight_mb"),
            "mem -% layers": 100 * (1 - bpw / 16),  # vs fp16 over the quantized layers
            "mem -% model": _num(runs, "metrics.mem_reduction_vs_fp16_pct"),
            "decode tok/s": _num(runs, "metrics.decode_tok_s"),
            "speed-up": _num(runs, "metrics.speedup_vs_ref"),
            "stability (std)": acc["std"],
            "tuned settings": [
                _tuned(*cells)
                for cells in zip(
                    _col(runs, "tags.overrides"), _col(runs, "tags.tuned_from"), _col(runs, "tags.tuned_settings")
                )
            ],
            "kernels": _col(runs, "tags.kernels"),
            "gen match": _num(runs, "metrics.gen_match_rate"),
        }
    )
    # Runs at about the same bits per weight (8.02 and 8.00) together, most accurate first.
    order = table.assign(_bits=table["bits/weight"].round(1)).sort_values(
        ["_bits", "drop %"], ascending=[False, True], na_position="last"
    )
    return table.loc[order.index].reset_index(drop=True)


def best_run(runs: pd.DataFrame) -> pd.Series:
    """The most accurate run: lowest zero-shot accuracy drop where runs measured it, else lowest KL."""
    drop = _num(runs, "metrics.acc_drop_pct")
    key = drop if drop.notna().any() else _num(runs, "metrics.kl_vs_ref")
    return runs.loc[key.idxmin()] if key.notna().any() else runs.iloc[0]


def _pair(measured: str, word: str | None) -> str:
    return f"{measured} · *{word}*" if word else measured


def _fmt(value, fmt: str) -> str:
    return "-" if _missing(value) else fmt.format(value)


def precision_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The article's table, measured: the reference, then the best run at each precision (8/4/2 bits, and any other)."""
    acc, bits = accuracy(runs), _bits(runs)
    groups = [("FP", runs[_col(runs, "tags.method") == "fp"])]
    for b in sorted({8, 4, 2} | {int(b) for b in bits.dropna()}, reverse=True):
        groups.append((f"{b}-bit", runs[bits == b]))
    rows = []
    for label, group in groups:
        words = ARTICLE.get(label, {})
        if group.empty:
            row = {"Precision": label, "best method": "no run"}
            for key in ("accuracy", "memory", "speed", "stability"):
                row[key.capitalize()] = _pair("-", words.get(key))
            rows.append(row)
            continue
        run = best_run(group)
        metric, value, drop, std = acc.loc[run.name, ["metric", "value", "drop_pct", "std"]]
        name = "acc drop" if metric == "acc_avg" else "Δppl"
        measured_acc = f"{metric} {_fmt(value, '{:.4g}')}" if label == "FP" else f"{name} {_fmt(drop, '{:+.1f}%')}"
        layers_pct = 100 * (1 - _value(run, "metrics.bits_per_weight") / 16)
        model_pct = _value(run, "metrics.mem_reduction_vs_fp16_pct")
        memory = f"{_fmt(layers_pct, '{:.0f}%')} / {_fmt(model_pct, '{:.0f}%')}"
        speed = _fmt(_value(run, "metrics.speedup_vs_ref"), "{:.2f}x")
        stability = "not repeated" if _missing(std) else f"±{std:.3g} ({metric} std, seeds {run.get('tags.repeats')})"
        setting = _setting(
            run.get("params.method.bits"), run.get("params.method.granularity"), run.get("params.method.group_size")
        )
        rows.append(
            {
                "Precision": label,
                "best method": run.get("tags.method") if setting == "-" else f"{run.get('tags.method')} ({setting})",
                "Accuracy": _pair(measured_acc, words.get("accuracy")),
                "Memory": _pair(memory, words.get("memory")),
                "Speed": _pair(speed, words.get("speed")),
                "Stability": _pair(stability, words.get("stability")),
            }
        )
    return pd.DataFrame(rows)


def formatted(table: pd.DataFrame, formats: dict[str, str] | None = None) -> pd.DataFrame:
    """Every cell as text; a missing value is '-'."""
    formats = formats or {}
    return pd.DataFrame({c: [_fmt(v, formats.get(c, "{}")) for v in table[c]] for c in table.columns})


def to_markdown(table: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    text = formatted(table, formats)
    lines = ["| " + " | ".join(text.columns) + " |", "|" + "---|" * len(text.columns)]
    for row in text.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def methods_markdown(experiment: str, runs: pd.DataFrame) -> str:
    return (
        f"# {experiment}: methods\n\n"
        "drop %: relative drop of zero-shot task accuracy vs the reference (`acc_drop_pct`) where the run "
        "measured tasks, else Δppl% = 100·(ppl/ppl_ref − 1); lower is better; `accuracy metric` says which. "
        "mem -%: memory reduction vs fp16 over the quantized layers (100·(1 − bits/16)) and over the whole "
        "model. speed-up: decode at batch 1 vs the reference in the same process. stability: std of the "
        "accuracy metric across seeds, for methods repeated over seeds. gen match: `gen_match_rate`.\n\n"
        + to_markdown(method_table(runs), METHOD_COLUMNS)
    )


def precision_markdown(experiment: str, runs: pd.DataFrame) -> str:
    return (
        f"# {experiment}: the article's precision table, measured\n\n"
        "Each cell: what this experiment measured · *the article's word* for that precision. The best "
        "run per precision has the lowest zero-shot accuracy drop where runs measured tasks, else the "
        "lowest KL vs the reference. Accuracy: drop vs the reference (lower is better). Memory: "
        "reduction vs fp16 over quantized layers / whole model (a reference stored wider than fp16 is "
        "negative). Speed: decode speed-up vs the reference, batch 1. Stability: std of the accuracy "
        "metric across seeds.\n\n" + to_markdown(precision_table(runs))
    )


# ---------------------------------------------------------------------------------------------
# Plots


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


def _plot_accuracy(runs: pd.DataFrame) -> tuple[pd.Series, str]:
    """One accuracy axis for all points: zero-shot drop if every run has it, else Δppl% (always logged)."""
    drop = _num(runs, "metrics.acc_drop_pct")
    if drop.notna().all():
        return drop, "zero-shot accuracy drop % vs reference (lower is better)"
    delta_ppl = 100 * (_num(runs, "metrics.ppl") / _num(runs, "metrics.ppl_ref") - 1)
    return delta_ppl, "Δppl % vs reference (lower is better)"


def _scatter(ax, x: pd.Series, y: pd.Series, front: list[int]) -> None:
    ax.scatter(x, y, s=18, color="C0", zorder=3)
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
    y, y_label = _plot_accuracy(runs)
    points = pd.DataFrame({"x": _num(runs, x_field), "y": y, "label": _col(runs, "tags.method").fillna("?")})
    return points.dropna(subset=["x", "y"]).reset_index(drop=True).assign(y_label=y_label)


def plot_accuracy_vs_bits(runs: pd.DataFrame, title: str = "") -> Figure:
    """Accuracy loss vs bits per weight, one labelled point per run; Pareto front: fewer bits, lower loss."""
    points = _points(runs, "metrics.bits_per_weight")
    fig = Figure(figsize=(8, 5), layout="constrained")  # no pyplot: works under any backend, inline too
    ax = fig.subplots()
    if points.empty:
        ax.set_title(f"{title}: no run has bits per weight and accuracy")
        return fig
    _scatter(ax, points.x, points.y, pareto_front(points.x, points.y))
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
    _scatter(ax, points.x, points.y, pareto_front(-points.x, points.y))  # faster and lower loss
    ax.axvline(1.0, color="grey", ls="--", lw=0.8)
    _label(ax, points.x, points.y, points.label)
    ax.set_xlabel("decode speed-up vs the reference (batch 1)")
    ax.set_ylabel(points.y_label[0])
    ax.set_title(f"{title}: accuracy vs speed".strip(": "))
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


# ---------------------------------------------------------------------------------------------
# The raw comparison (every run's numbers, and methods side by side per setting)

COLUMNS = {  # column -> (MLflow field, format)
    "method": ("tags.method", "{}"),
    "run": ("tags.mlflow.runName", "{}"),
    "bits/weight": ("metrics.bits_per_weight", "{:.2f}"),
    "weight MB": ("metrics.weight_mb", "{:.1f}"),
    "mem -% vs fp16 (layers / model)": ("memory_cell", "{}"),
    "ppl": ("metrics.ppl", "{:.2f}"),
    "Δppl %": ("delta_ppl_pct", "{:+.1f}"),
    "KL": ("metrics.kl_vs_ref", "{:.4f}"),
    "top-1": ("metrics.top1_agree", "{:.3f}"),
    "decode tok/s": ("metrics.decode_tok_s", "{:.1f}"),
    "speed-up": ("metrics.speedup_vs_ref", "{:.2f}x"),
    "kernels": ("tags.kernels", "{}"),
}


def comparison(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    runs["delta_ppl_pct"] = 100 * (_num(runs, "metrics.ppl") / _num(runs, "metrics.ppl_ref") - 1)
    layers_pct = 100 * (1 - _num(runs, "metrics.bits_per_weight") / 16)
    model_pct = _num(runs, "metrics.mem_reduction_vs_fp16_pct")
    runs["memory_cell"] = [f"{_fmt(a, '{:.0f}')} / {_fmt(b, '{:.0f}')}" for a, b in zip(layers_pct, model_pct)]
    runs["_bpw"], runs["_ppl"] = _num(runs, "metrics.bits_per_weight"), _num(runs, "metrics.ppl")
    runs = runs.sort_values(["_bpw", "_ppl"], ascending=[False, True], na_position="last")
    table = pd.DataFrame({name: _col(runs, field) for name, (field, _) in COLUMNS.items()})
    return table.reset_index(drop=True)


def by_setting(runs: pd.DataFrame) -> str:
    """Methods side by side at each (bits, granularity): 'ppl / KL / bits per weight' per cell."""
    runs = runs.assign(setting=_settings(runs))
    runs = runs[runs["setting"] != "-"]  # the reference has no setting
    runs = runs.assign(
        cell=[
            f"{_fmt(p, '{:.1f}')} / {_fmt(k, '{:.3f}')} / {_fmt(b, '{:.2f}')}"
            for p, k, b in zip(
                _num(runs, "metrics.ppl"), _num(runs, "metrics.kl_vs_ref"), _num(runs, "metrics.bits_per_weight")
            )
        ]
    )
    grid = runs.pivot_table(index="setting", columns="tags.method", values="cell", aggfunc="first")
    grid = grid.sort_index(key=lambda idx: [(-int(s.split("-")[0]), s) for s in idx])
    lines = ["| setting | " + " | ".join(grid.columns) + " |", "|" + "---|" * (len(grid.columns) + 1)]
    for setting, row in grid.iterrows():
        lines.append(f"| {setting} | " + " | ".join("-" if pd.isna(v) else v for v in row) + " |")
    return "Cells: perplexity / KL vs reference / bits per weight.\n\n" + "\n".join(lines) + "\n"


def comparison_markdown(experiment: str, runs: pd.DataFrame) -> str:
    table = comparison(runs)
    caveats = set(_col(runs, "tags.caveat").dropna())
    protocol = runs.iloc[0]
    header = (
        f"# {experiment}: {len(table)} runs\n\n"
        f"Perplexity protocol: corpus {protocol.get('params.data.evaluation.corpus')}, "
        f"{protocol.get('params.eval.tokens')} tokens, context {protocol.get('params.eval.context')}, "
        f"stride {protocol.get('params.eval.stride')}, add_special_tokens "
        f"{protocol.get('params.eval.add_special_tokens')}; KL over the first "
        f"{protocol.get('params.eval.kl_tokens')} tokens. Speed: decode at batch 1, "
        f"{protocol.get('params.profile.threads')} thread(s), ratio to the reference in the same process.\n"
    )
    formats = {name: fmt for name, (_, fmt) in COLUMNS.items()}
    text = header + "".join(f"\nCaveat: {c}\n" for c in sorted(caveats)) + "\n" + to_markdown(table, formats)
    if _col(runs, "tags.method").nunique() > 1 and _bits(runs).nunique() > 1:
        text += "\n## By setting\n\n" + by_setting(runs)
    return text


# ---------------------------------------------------------------------------------------------
# The evaluation suite (zero-shot groups, perplexity by context length, generation)


def suite_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    """Per method: accuracy per task group, ``acc_avg``, ``acc_drop_pct``, ``ppl_ctx/*``, generation agreement.

    None when no run measured tasks or context lengths.
    """
    groups = [f"metrics.acc/{group}" for group in GROUPS if f"metrics.acc/{group}" in runs]  # TASK_GROUPS order
    contexts = sorted((c for c in runs.columns if c.startswith("metrics.ppl_ctx/")), key=lambda c: int(c.split("/")[1]))
    if not groups and not contexts:
        return None
    columns = {"method": _col(runs, "tags.method"), "bits/weight": _num(runs, "metrics.bits_per_weight")}
    columns |= {c.removeprefix("metrics.acc/"): _num(runs, c) for c in groups}
    columns |= {"acc_avg": _num(runs, "metrics.acc_avg"), "drop %": _num(runs, "metrics.acc_drop_pct")}
    columns |= {f"ppl@{c.split('/')[1]}": _num(runs, c) for c in contexts}
    columns |= {
        "gen match": _num(runs, "metrics.gen_match_rate"),
        "first diverg.": _num(runs, "metrics.gen_first_divergence"),
        "repetition": _num(runs, "metrics.gen_repetition_rate"),
    }
    table = pd.DataFrame(columns)
    return table.sort_values(["bits/weight", "drop %"], ascending=[False, True], na_position="last").reset_index(
        drop=True
    )


def suite_markdown(experiment: str, runs: pd.DataFrame, table: pd.DataFrame) -> str:
    first = runs.iloc[0]
    formats = {c: "{:.3f}" for c in table.columns} | {
        "method": "{}",
        "bits/weight": "{:.2f}",
        "drop %": "{:+.1f}",
        "first diverg.": "{:.1f}",
    }
    formats |= {c: "{:.2f}" for c in table.columns if c.startswith("ppl@")}
    return (
        f"# {experiment}: evaluation suite\n\n"
        "Zero-shot accuracy per task group through lm-eval (each group the mean of its tasks, acc_norm where "
        "reported), `acc_avg` (mean of the groups) and its relative drop vs the reference (`acc_drop_pct`); "
        "perplexity at several context lengths on the same tokens (`ppl@<len>`); greedy generation vs the "
        "reference (`gen match`: same token at the same position; `first diverg.`: mean index of the first "
        "different token; `repetition`: repeated 3-grams). "
        f"Tasks: {first.get('params.eval.tasks.names')}, limit {first.get('params.eval.tasks.limit')} per task, "
        f"{first.get('params.eval.tasks.num_fewshot')}-shot; generation: "
        f"{first.get('params.eval.generation.new_tokens')} tokens per prompt.\n\n" + to_markdown(table, formats)
    )


# ---------------------------------------------------------------------------------------------
# The report


def write_report(experiment: str, out_dir: Path, storage: str = DEFAULT_STORAGE) -> list[Path]:
    """Write every output of the report to ``out_dir`` and log them to one summary run; return the files."""
    runs = load_runs(experiment)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {
        "methods.md": methods_markdown(experiment, runs),
        "precision.md": precision_markdown(experiment, runs),
        "comparison.md": comparison_markdown(experiment, runs),
    }
    for name, text in texts.items():
        (out_dir / name).write_text(text)
    suite = suite_table(runs)
    if suite is not None:
        texts["suite.md"] = suite_markdown(experiment, runs, suite)
        (out_dir / "suite.md").write_text(texts["suite.md"])
        suite.to_csv(out_dir / "suite.csv", index=False)
    methods = method_table(runs)
    methods.to_csv(out_dir / "methods.csv", index=False)
    comparison(runs).to_csv(out_dir / "comparison.csv", index=False)
    written = [out_dir / n for n in ("methods.md", "methods.csv", "precision.md", "comparison.md", "comparison.csv")]
    if suite is not None:
        written += [out_dir / "suite.md", out_dir / "suite.csv"]

    figures = {
        "accuracy_vs_bits.png": plot_accuracy_vs_bits(runs, experiment),
        "accuracy_vs_speed.png": plot_accuracy_vs_speed(runs, experiment),
    }
    for name, fig in figures.items():
        if fig is None:
            log.info("%s: no run has speedup_vs_ref, no %s", experiment, name)
            (out_dir / name).unlink(missing_ok=True)  # a stale plot would contradict the tables
            continue
        fig.savefig(out_dir / name, dpi=120)
        written.append(out_dir / name)
    written += plot_studies(experiment, storage, out_dir, set(_col(runs, "tags.tuned_from").dropna()))

    exp = mlflow.get_experiment_by_name(experiment)
    with mlflow.start_run(experiment_id=exp.experiment_id, run_name="report", tags={SUMMARY_TAG: "report"}):
        for path in written:
            mlflow.log_artifact(str(path))
        mlflow.log_table(formatted(methods, METHOD_COLUMNS), "methods.json")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="compare")
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or sqlite under mlruns/")
    parser.add_argument("--out", type=Path, default=None, help="default: experiments/<experiment>/")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL (studies to plot)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    matplotlib.use("Agg")  # files only; no display needed
    tracking.connect(args.tracking_uri)
    out_dir = args.out or tracking.REPO / "experiments" / args.experiment
    try:
        written = write_report(args.experiment, out_dir, args.storage)
    except ReportError as e:
        raise SystemExit(f"error: {e}") from None
    print((out_dir / "methods.md").read_text() + "\n" + (out_dir / "precision.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
