"""The runs of one experiment, read back from MLflow, and what each logged (missing where it did not)."""

from __future__ import annotations

import math

import mlflow
import pandas as pd

SUMMARY_TAG = "quantbench.summary"


class ReportError(ValueError):
    """Nothing to report (the experiment does not exist or has no finished runs), or runs not comparable."""


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
        summary = col(runs, f"tags.{SUMMARY_TAG}").notna()
        child = col(runs, "tags.seed").notna() & col(runs, "tags.mlflow.parentRunId").notna()
        runs = runs[~summary & ~child].drop_duplicates("tags.mlflow.runName")  # sorted newest first
    if runs.empty:
        raise ReportError(f"experiment {experiment!r} has no finished runs; {_experiments()}")
    means = [c for c in runs.columns if c.startswith("metrics.") and c.endswith("_mean")]
    filled = {c.removesuffix("_mean"): col(runs, c.removesuffix("_mean")).fillna(runs[c]) for c in means}
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


def col(runs: pd.DataFrame, field: str) -> pd.Series:
    """A column, or all-missing where no run logged that field (older runs, stages switched off)."""
    return runs[field] if field in runs else pd.Series(float("nan"), index=runs.index, dtype=object)


def num(runs: pd.DataFrame, field: str) -> pd.Series:
    return pd.to_numeric(col(runs, field), errors="coerce")


def missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def run_value(run: pd.Series, field: str) -> float:
    """One run's number, NaN where it has none."""
    return pd.to_numeric(run.get(field), errors="coerce")


def is_true(series: pd.Series) -> pd.Series:
    """A tag or metric that says yes ("true", "True", 1.0); missing is no."""
    return series.map(lambda v: not missing(v) and str(v).strip().lower() in ("true", "1", "1.0"))


def delta_ppl(runs: pd.DataFrame) -> pd.Series:
    """Δppl% vs the reference: the logged ``dppl_pct``, else 100 * (ppl / ppl_ref - 1) (older runs)."""
    return num(runs, "metrics.dppl_pct").fillna(100 * (num(runs, "metrics.ppl") / num(runs, "metrics.ppl_ref") - 1))


def accuracy(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: which accuracy metric it has, its value, its drop vs the reference (%, lower is better),
    the drop's interval, its std across seeds.

    Zero-shot task accuracy (``acc_avg``, ``acc_drop_pct``) where the run measured it, else
    perplexity with Δppl% (``dppl_pct``). The std is across seeds, for repeated runs.
    """
    zero_shot = num(runs, "metrics.acc_drop_pct").notna()
    return pd.DataFrame(
        {
            "metric": zero_shot.map({True: "acc_avg", False: "ppl"}),
            "value": num(runs, "metrics.acc_avg").where(zero_shot, num(runs, "metrics.ppl")),
            "drop_pct": num(runs, "metrics.acc_drop_pct").where(zero_shot, delta_ppl(runs)),
            "low": num(runs, "metrics.acc_drop_pct_ci_low").where(zero_shot, num(runs, "metrics.dppl_pct_ci_low")),
            "high": num(runs, "metrics.acc_drop_pct_ci_high").where(zero_shot, num(runs, "metrics.dppl_pct_ci_high")),
            "std": num(runs, "metrics.acc_avg_std").where(zero_shot, num(runs, "metrics.ppl_std")),
        },
        index=runs.index,
    )


def nominal_bits(runs: pd.DataFrame) -> pd.Series:
    """Nominal weight bits of each run's method (NaN for the reference)."""
    return num(runs, "params.method.bits").fillna(num(runs, "tags.bits"))


def _symmetry(bits, symmetric, symmetric_range) -> str:
    """ "sym[-8,7]" (full int range), "sym[-7,7]" (restricted), "sym" (range not logged: older runs), "asym"."""
    if missing(symmetric) or str(symmetric) == "None":
        return ""
    if str(symmetric).lower() != "true":
        return "asym"
    top = 2 ** (int(float(bits)) - 1) - 1
    if symmetric_range == "full":
        return f"sym[{-top - 1},{top}]"
    if symmetric_range == "restricted":
        return f"sym[{-top},{top}]"
    return "sym"  # older runs: no range logged, and guessing one would put words in their mouth


def setting_text(bits, granularity, group_size, symmetric=None, symmetric_range=None) -> str:
    if missing(bits) or str(bits) == "None":
        return "-"
    symmetry = _symmetry(bits, symmetric, symmetric_range)
    words = [f"{bits}-bit"] + ([symmetry] if symmetry else [])
    if not (missing(granularity) or str(granularity) == "None"):
        words.append(f"g{group_size}" if granularity == "group" else str(granularity))
    return " ".join(words)


SETTING_FIELDS = (
    "params.method.bits",
    "params.method.granularity",
    "params.method.group_size",
    "params.method.symmetric",
    "params.method.symmetric_range",
)


def run_settings(runs: pd.DataFrame) -> list[str]:
    return [setting_text(*values) for values in zip(*(col(runs, c) for c in SETTING_FIELDS))]


def run_labels(runs: pd.DataFrame) -> pd.Series:
    """A short unique name per run: the method, with its setting where the method repeats, else the run name."""
    method = col(runs, "tags.method").fillna("?").astype(str)
    with_setting = method + " (" + pd.Series(run_settings(runs), index=runs.index) + ")"
    labels = method.where(~method.duplicated(keep=False), with_setting)
    return labels.where(~labels.duplicated(keep=False), col(runs, "tags.mlflow.runName").astype(str))
