"""The report of an experiment, read back from MLflow: method table, precision table, suite, plots.

    python -m pipeline.report experiment=compare            # MLflow experiment of that config: "compare"
    python -m pipeline.report report.experiment=tuned       # an MLflow experiment without a config
    python -m pipeline.report experiment=compare tracking.uri=sqlite:////tmp/mlflow.db report.out=/tmp/r \
        tune.storage=sqlite:////tmp/optuna.db report.allow_mixed=true

The same Hydra overrides as ``python -m pipeline`` (``conf/report.yaml`` composes ``conf/config.yaml``).
Reads the FINISHED runs of one experiment (the latest run of each run name; a method repeated over
seeds counts once, through its parent run's means) and writes to ``experiments/<experiment>/`` (or
``report.out``) and, as artifacts, to one summary run (tag ``quantbench.summary=report``) in the same
experiment:

- ``methods.{md,csv}``: one row per method run: Δppl%, KL, accuracy drop and decode speed-up, each with
  its 95% interval where the run logged one, memory, stability, settings, flags.
- ``precision.md``: the article's precision table (FP / 8 / 4 / 2 bits), measured, next to its words.
- ``suite.{md,csv}``: accuracy per task group ± standard error, perplexity by context, generation.
- ``accuracy_vs_bits.png`` (with the Pareto front), ``accuracy_vs_speed.png``, and
  ``history_<study>.png`` for each Optuna study tuned for this experiment.
- ``comparison.{md,csv}``: every run's raw numbers, and methods side by side at each setting.

Every markdown file opens with a provenance line (commit, host, model, protocol of its runs); see
``check_provenance`` for what is refused and what is flagged. A number a run did not log is '-', so
runs of older code still render.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import mlflow
import optuna
import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from matplotlib.figure import Figure
from omegaconf import DictConfig

from pipeline import tracking
from pipeline.cli import guard
from pipeline.tasks import TASK_GROUPS as GROUPS

log = logging.getLogger(__name__)

CONF = tracking.REPO / "conf"
SUMMARY_TAG = "quantbench.summary"
DEFAULT_STORAGE = f"sqlite:///{tracking.DEFAULT_STORE / 'optuna.db'}"
CI_NOTE = "[lo, hi]: 95% interval, paired over evaluation windows (perplexity, KL) or examples (tasks) vs the reference"

# The article's verdict per precision, shown next to what we measure: the table under "Accuracy vs
# Efficiency: Lessons from the Quantization Methods Comparison" (../shared/reference/000_a51b381b08561bd5.txt,
# lines 53-58). Its first row is FP16; our reference is the model as loaded.
ARTICLE = {
    "FP": {"accuracy": "Excellent", "memory": "High", "speed": "Baseline", "stability": "Very High"},
    "8-bit": {"accuracy": "Near-Perfect", "memory": "Medium", "speed": "Faster", "stability": "Very High"},
    "4-bit": {"accuracy": "Very Good", "memory": "Low", "speed": "Much Faster", "stability": "High"},
    "2-bit": {"accuracy": "Good", "memory": "Very Low", "speed": "Fastest", "stability": "Medium"},
}
PUBLISHED_MARK = "†"
PUBLISHED_NOTE = (
    f"{PUBLISHED_MARK} on the grid the model's weights were published on: reproduces the checkpoint, "
    "says nothing about the method"
)


# ---------------------------------------------------------------------------------------------
# Runs


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


def _is_true(series: pd.Series) -> pd.Series:
    """A tag or metric that says yes ("true", "True", 1.0); missing is no."""
    return series.map(lambda v: not _missing(v) and str(v).strip().lower() in ("true", "1", "1.0"))


def delta_ppl(runs: pd.DataFrame) -> pd.Series:
    """Δppl% vs the reference: the logged ``dppl_pct``, else 100 * (ppl / ppl_ref - 1) (older runs)."""
    return _num(runs, "metrics.dppl_pct").fillna(100 * (_num(runs, "metrics.ppl") / _num(runs, "metrics.ppl_ref") - 1))


def accuracy(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: which accuracy metric it has, its value, its drop vs the reference (%, lower is better),
    the drop's interval, its std across seeds.

    Zero-shot task accuracy (``acc_avg``, ``acc_drop_pct``) where the run measured it, else
    perplexity with Δppl% (``dppl_pct``). The std is across seeds, for repeated runs.
    """
    zero_shot = _num(runs, "metrics.acc_drop_pct").notna()
    return pd.DataFrame(
        {
            "metric": zero_shot.map({True: "acc_avg", False: "ppl"}),
            "value": _num(runs, "metrics.acc_avg").where(zero_shot, _num(runs, "metrics.ppl")),
            "drop_pct": _num(runs, "metrics.acc_drop_pct").where(zero_shot, delta_ppl(runs)),
            "low": _num(runs, "metrics.acc_drop_pct_ci_low").where(zero_shot, _num(runs, "metrics.dppl_pct_ci_low")),
            "high": _num(runs, "metrics.acc_drop_pct_ci_high").where(zero_shot, _num(runs, "metrics.dppl_pct_ci_high")),
            "std": _num(runs, "metrics.acc_avg_std").where(zero_shot, _num(runs, "metrics.ppl_std")),
        },
        index=runs.index,
    )


def _bits(runs: pd.DataFrame) -> pd.Series:
    """Nominal weight bits of each run's method (NaN for the reference)."""
    return _num(runs, "params.method.bits").fillna(_num(runs, "tags.bits"))


def _symmetry(bits, symmetric, symmetric_range) -> str:
    """ "sym[-8,7]" (full int range), "sym[-7,7]" (restricted), "sym" (range not logged: older runs), "asym"."""
    if _missing(symmetric) or str(symmetric) == "None":
        return ""
    if str(symmetric).lower() != "true":
        return "asym"
    top = 2 ** (int(float(bits)) - 1) - 1
    if symmetric_range == "full":
        return f"sym[{-top - 1},{top}]"
    if symmetric_range == "restricted":
        return f"sym[{-top},{top}]"
    return "sym"  # older runs: no range logged, and guessing one would put words in their mouth


def _setting(bits, granularity, group_size, symmetric=None, symmetric_range=None) -> str:
    if _missing(bits) or str(bits) == "None":
        return "-"
    symmetry = _symmetry(bits, symmetric, symmetric_range)
    words = [f"{bits}-bit"] + ([symmetry] if symmetry else [])
    if not (_missing(granularity) or str(granularity) == "None"):
        words.append(f"g{group_size}" if granularity == "group" else str(granularity))
    return " ".join(words)


SETTING_FIELDS = (
    "params.method.bits",
    "params.method.granularity",
    "params.method.group_size",
    "params.method.symmetric",
    "params.method.symmetric_range",
)


def _settings(runs: pd.DataFrame) -> list[str]:
    return [_setting(*values) for values in zip(*(_col(runs, c) for c in SETTING_FIELDS))]


def _labels(runs: pd.DataFrame) -> pd.Series:
    """A short unique name per run: the method, with its setting where the method repeats, else the run name."""
    method = _col(runs, "tags.method").fillna("?").astype(str)
    with_setting = method + " (" + pd.Series(_settings(runs), index=runs.index) + ")"
    labels = method.where(~method.duplicated(keep=False), with_setting)
    return labels.where(~labels.duplicated(keep=False), _col(runs, "tags.mlflow.runName").astype(str))


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


def _number(text) -> str:
    value = pd.to_numeric(text, errors="coerce")
    return str(text) if _missing(value) else f"{value:.4g}"


def _vs_preset(verdict, objective, best, preset) -> str:
    """The flag of a tuned run that did not beat its preset (``tuned_vs_preset``); empty otherwise."""
    if verdict == "worse":
        return f"worse than preset ({objective} {_number(best)} vs preset {_number(preset)})"
    if verdict == "preset_not_measured":
        return "preset not measured"
    return ""


# ---------------------------------------------------------------------------------------------
# Provenance: runs of one table must be comparable

# Different values make the numbers incomparable (another model, other tokens or windows, other
# task samples): a table that mixes them is refused unless report.allow_mixed=true.
REFUSE_KEYS = (
    "model.name",
    "data.evaluation.corpus",
    "eval.tokens",
    "eval.context",
    "eval.stride",
    "eval.add_special_tokens",
    "eval.bos",
    "eval.bos_used",
    "eval.kl_tokens",
    "eval.tasks.limit",
    "eval.tasks.num_fewshot",
)
# Different values leave the protocol the same but may move the numbers (code, machine, library
# versions: the same compare config on two machines gave w2_group ppl 378 and 392): flagged.
FLAG_KEYS = ("git.commit", "git.dirty", "host.processor", "host.cpu_count", "host.platform", "model.resolved_path")


def _provenance_keys(runs: pd.DataFrame) -> tuple[list[str], list[str]]:
    packages = sorted(c.removeprefix("params.") for c in runs.columns if c.startswith("params.pkg."))
    return list(REFUSE_KEYS), [*FLAG_KEYS, *packages]


def _differences(runs: pd.DataFrame, keys: Sequence[str]) -> dict[str, pd.Series]:
    """key -> each run's value, for the keys whose logged values differ across the runs."""
    out = {}
    for key in keys:
        values = _col(runs, f"params.{key}")
        if values.dropna().nunique() > 1:
            out[key] = values
    return out


def check_provenance(runs: pd.DataFrame, allow_mixed: bool = False) -> None:
    """Refuse a table that mixes models or protocols; flag (see ``provenance_block``) commits and hosts.

    Refused: runs whose ``model.name`` or perplexity/KL/task protocol (``REFUSE_KEYS``) differ. Their
    Δppl% are taken on other tokens, windows or task samples, or of another model: side by side they
    read as a comparison of methods while they compare protocols. ``allow_mixed=True`` renders them
    anyway, under a visible "not comparable" line.
    Flagged: different commits, dirty trees, hosts, packages or model paths (``FLAG_KEYS``, ``pkg.*``).
    The protocol is the same, so the numbers are comparable in kind, but code and machine move them
    (measured: w2_group ppl 378 vs 392 on two machines); the provenance line lists the values and each
    row that differs from the majority says so in its notes.
    A key some runs did not log (older code; a repeated method's parent run) is not a difference: it is
    listed as "not logged by" in the provenance line, not refused.
    """
    refuse, _ = _provenance_keys(runs)
    mixed = _differences(runs, refuse)
    if mixed and not allow_mixed:
        labels = _labels(runs)
        detail = "; ".join(f"{key}: {_value_counts(values, labels)}" for key, values in mixed.items())
        raise ReportError(
            f"the runs differ in model or protocol, so their numbers are not comparable: {detail}. Report one "
            "protocol per experiment (rerun the odd runs), or add report.allow_mixed=true to render them anyway"
        )


def _short(key: str, value) -> str:
    return str(value)[:12] if key == "git.commit" else str(value)


def _counts(values: pd.Series) -> list[tuple[str, int]]:
    """(value, runs) of the logged values, most runs first; a tie goes to the value of the newest run."""
    logged = values.dropna()
    counts = logged.value_counts()
    first_seen = {value: i for i, value in reversed(list(enumerate(logged)))}  # runs are newest first
    return sorted(counts.items(), key=lambda item: (-item[1], first_seen[item[0]]))


def _value_counts(values: pd.Series, labels: pd.Series, key: str = "") -> str:
    """'a (12 runs), b (2: gptq, qat)': the majority value first, the runs of the others named."""
    parts = []
    for i, (value, count) in enumerate(_counts(values)):
        if i == 0:
            parts.append(f"{_short(key, value)} ({count} runs)")
        else:
            names = list(labels[values == value])
            shown = ", ".join(names[:6]) + (", …" if len(names) > 6 else "")
            parts.append(f"{_short(key, value)} ({count}: {shown})")
    return ", ".join(parts)


def provenance_block(runs: pd.DataFrame) -> str:
    """The provenance lines opening each markdown file: what the runs share, and what differs, visibly."""
    refuse, flag = _provenance_keys(runs)
    labels = _labels(runs)
    shared, lines = [], []
    for key in [*refuse, *flag]:
        values = _col(runs, f"params.{key}")
        logged = values.dropna()
        if logged.empty or key.startswith("pkg."):
            continue  # packages: named only when they differ, the line stays short
        if logged.nunique() == 1:
            shared.append(f"{key} {_short(key, logged.iloc[0])}")
    for key, values in _differences(runs, refuse).items():
        lines.append(f"**Not comparable: {key} differs** (report.allow_mixed=true): {_value_counts(values, labels)}")
    for key, values in _differences(runs, flag).items():
        lines.append(f"**{key} differs** (rows marked ≠ in notes): {_value_counts(values, labels, key)}")
    unlogged = {}  # run label -> the keys other runs logged and it did not (older code, a parent run)
    for key in [*refuse, *flag]:
        values = _col(runs, f"params.{key}")
        if values.notna().any():
            for label in labels[values.isna()]:
                unlogged.setdefault(label, []).append(key)
    if unlogged:
        lines.append("Not logged by: " + "; ".join(f"{label} ({', '.join(keys)})" for label, keys in unlogged.items()))
    head = f"Provenance ({len(runs)} runs): " + (" · ".join(shared) if shared else "no provenance logged")
    return "\n\n".join([head, *lines]) + "\n"


def _provenance_marks(runs: pd.DataFrame) -> pd.Series:
    """Per run: '≠ key, key' for the provenance keys where its logged value is not the majority's."""
    refuse, flag = _provenance_keys(runs)
    marks = pd.Series([[] for _ in range(len(runs))], index=runs.index)
    for key, values in _differences(runs, [*refuse, *flag]).items():
        majority = _counts(values)[0][0]
        for i in values.index[values.notna() & (values != majority)]:
            marks[i] = [*marks[i], key]
    return marks.map(lambda keys: f"≠ {', '.join(keys)}" if keys else "")


def notes(runs: pd.DataFrame) -> pd.Series:
    """Per run, the flags a reader must see: published grid, worse than its preset, odd provenance."""
    published = _is_true(_col(runs, "tags.on_published_grid")).map(
        {True: f"{PUBLISHED_MARK} published grid", False: ""}
    )
    vs_preset = pd.Series(
        [
            _vs_preset(*cells)
            for cells in zip(
                _col(runs, "tags.tuned_vs_preset"),
                _col(runs, "tags.tuned_objective"),
                _col(runs, "tags.tuned_best_value"),
                _col(runs, "tags.tuned_preset_value"),
            )
        ],
        index=runs.index,
    )
    parts = pd.concat([published, vs_preset, _provenance_marks(runs)], axis=1)
    return parts.apply(lambda row: "; ".join(p for p in row if p), axis=1).replace("", "-")


def _flag_notes(runs: pd.DataFrame) -> str:
    """Note lines for the flags that occur in this table."""
    lines = []
    if _is_true(_col(runs, "tags.on_published_grid")).any():
        lines.append(PUBLISHED_NOTE + ".")
    if (_col(runs, "tags.tuned_vs_preset") == "worse").any():
        lines.append(
            "worse than preset: the tuned setting scored worse than the method's preset on the study's objective."
        )
    return "".join(f"{line}\n\n" for line in lines)


# ---------------------------------------------------------------------------------------------
# Intervals


def _fmt(value, fmt: str) -> str:
    return "-" if _missing(value) else fmt.format(value)


def interval(value, low, high, fmt: str, unit: str = "") -> str:
    """'+14.0 [+12.1, +15.9]'; the value alone where the run logged no interval; '-' without a value."""
    if _missing(value):
        return "-"
    text = fmt.format(value) + unit
    if _missing(low) or _missing(high):
        return text
    return f"{text} [{fmt.format(low)}, {fmt.format(high)}]"


def speed_cell(speedup, low, high, noise_pct, is_win) -> str:
    """'2.00x [1.91, 2.09]'; a speed-up that is not a win (``speedup_is_win`` 0) is marked: '~noise'
    when its interval reaches into the noise floor, 'slower' when it lies wholly below it."""
    text = interval(speedup, low, high, "{:.2f}", "x")
    if _missing(is_win) or _missing(speedup) or is_win == 1:
        return text
    if not _missing(high) and not _missing(noise_pct) and high < 1 - noise_pct / 100:
        return f"{text} slower"
    return f"{text} ~noise"


def drop_cell(drop, low, high, significant) -> str:
    """'+8.0 [+3.1, +12.9] sig.' where the interval excludes 0 (``acc_drop_significant``)."""
    text = interval(drop, low, high, "{:+.1f}")
    return f"{text} sig." if significant == 1 and text != "-" else text


def overlapping(labels: pd.Series, low: pd.Series, high: pd.Series, groups: pd.Series) -> pd.Series:
    """Per run, the labels of the other runs in its group whose [low, high] overlaps its own ('-' if none).

    Overlapping 95% intervals: this protocol does not tell the two apart (a conservative check).
    """
    out = pd.Series("-", index=labels.index, dtype=object)
    known = low.notna() & high.notna() & groups.notna()
    for i in labels.index[known]:
        others = known & (groups == groups[i]) & (labels.index != i) & (low <= high[i]) & (low[i] <= high)
        if others.any():
            out[i] = ", ".join(labels[others])
    return out


# ---------------------------------------------------------------------------------------------
# Tables


def method_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per method run (the reference first), raw values (intervals as lo/hi columns); missing stay NaN."""
    acc = accuracy(runs)
    bpw = _num(runs, "metrics.bits_per_weight")
    dppl_low, dppl_high = _num(runs, "metrics.dppl_pct_ci_low"), _num(runs, "metrics.dppl_pct_ci_high")
    published = _is_true(_col(runs, "tags.on_published_grid"))
    table = pd.DataFrame(
        {
            "method": _col(runs, "tags.method"),
            "family": _col(runs, "tags.family"),
            "algorithm": _col(runs, "tags.algorithm"),
            "setting": _settings(runs),
            "bits/weight": bpw,
            "ppl": _num(runs, "metrics.ppl"),
            "Δppl %": delta_ppl(runs),
            "Δppl % lo": dppl_low,
            "Δppl % hi": dppl_high,
            "≈ Δppl (same bits)": overlapping(_labels(runs), dppl_low, dppl_high, _bits(runs)),
            "KL": _num(runs, "metrics.kl_vs_ref"),
            "KL lo": _num(runs, "metrics.kl_vs_ref_ci_low"),
            "KL hi": _num(runs, "metrics.kl_vs_ref_ci_high"),
            "acc_avg": _num(runs, "metrics.acc_avg"),
            "acc_avg stderr": _num(runs, "metrics.acc_avg_stderr"),
            "acc drop %": _num(runs, "metrics.acc_drop_pct"),
            "acc drop % lo": _num(runs, "metrics.acc_drop_pct_ci_low"),
            "acc drop % hi": _num(runs, "metrics.acc_drop_pct_ci_high"),
            "acc drop significant": _num(runs, "metrics.acc_drop_significant"),
            "weight MB": _num(runs, "metrics.weight_mb"),
            "mem -% layers": 100 * (1 - bpw / 16),  # vs fp16 over the quantized layers
            "mem -% model": _num(runs, "metrics.mem_reduction_vs_fp16_pct"),
            "decode tok/s": _num(runs, "metrics.decode_tok_s"),
            "speed-up": _num(runs, "metrics.speedup_vs_ref"),
            "speed-up lo": _num(runs, "metrics.speedup_vs_ref_ci_low"),
            "speed-up hi": _num(runs, "metrics.speedup_vs_ref_ci_high"),
            "speed noise %": _num(runs, "metrics.speed_noise_pct"),
            "speed-up is win": _num(runs, "metrics.speedup_is_win"),
            "stability (std)": acc["std"],
            "tuned settings": [
                _tuned(*cells)
                for cells in zip(
                    _col(runs, "tags.overrides"), _col(runs, "tags.tuned_from"), _col(runs, "tags.tuned_settings")
                )
            ],
            "tuned vs preset": _col(runs, "tags.tuned_vs_preset"),
            "on published grid": published,
            "kernels": _col(runs, "tags.kernels"),
            "gen match": _num(runs, "metrics.gen_match_rate"),
            "notes": notes(runs),
        }
    )
    # Runs at about the same bits per weight (8.02 and 8.00) together, most accurate first.
    order = table.assign(_bits=table["bits/weight"].round(1), _drop=acc["drop_pct"]).sort_values(
        ["_bits", "_drop"], ascending=[False, True], na_position="last"
    )
    return table.loc[order.index].reset_index(drop=True)


def method_cells(table: pd.DataFrame) -> pd.DataFrame:
    """The method table as it reads in methods.md: intervals next to their figures, flags marked."""
    t = table
    method = [f"{m} {PUBLISHED_MARK}" if p else _fmt(m, "{}") for m, p in zip(t["method"], t["on published grid"])]
    return pd.DataFrame(
        {
            "method": method,
            "family": [_fmt(v, "{}") for v in t["family"]],
            "algorithm": [_fmt(v, "{}") for v in t["algorithm"]],
            "setting": t["setting"],
            "bits/weight": [_fmt(v, "{:.2f}") for v in t["bits/weight"]],
            "Δppl % [95% CI]": [interval(*v, "{:+.1f}") for v in zip(t["Δppl %"], t["Δppl % lo"], t["Δppl % hi"])],
            "≈ Δppl (same bits)": t["≈ Δppl (same bits)"],
            "KL [95% CI]": [interval(*v, "{:.4f}") for v in zip(t["KL"], t["KL lo"], t["KL hi"])],
            "acc drop % [95% CI]": [
                drop_cell(*v)
                for v in zip(t["acc drop %"], t["acc drop % lo"], t["acc drop % hi"], t["acc drop significant"])
            ],
            "weight MB": [_fmt(v, "{:.1f}") for v in t["weight MB"]],
            "mem -% layers / model": [
                f"{_fmt(a, '{:.0f}')} / {_fmt(b, '{:.0f}')}" for a, b in zip(t["mem -% layers"], t["mem -% model"])
            ],
            "decode tok/s": [_fmt(v, "{:.1f}") for v in t["decode tok/s"]],
            "speed-up [95% CI]": [
                speed_cell(*v)
                for v in zip(
                    t["speed-up"], t["speed-up lo"], t["speed-up hi"], t["speed noise %"], t["speed-up is win"]
                )
            ],
            "speed noise": [_fmt(v, "±{:.1f}%") for v in t["speed noise %"]],
            "stability (std)": [_fmt(v, "±{:.3g}") for v in t["stability (std)"]],
            "tuned settings": t["tuned settings"],
            "kernels": [_fmt(v, "{}") for v in t["kernels"]],
            "gen match": [_fmt(v, "{:.3f}") for v in t["gen match"]],
            "notes": t["notes"],
        }
    )


def best_run(runs: pd.DataFrame) -> pd.Series:
    """The most accurate run: lowest zero-shot accuracy drop where runs measured it, else lowest KL."""
    drop = _num(runs, "metrics.acc_drop_pct")
    key = drop if drop.notna().any() else _num(runs, "metrics.kl_vs_ref")
    return runs.loc[key.idxmin()] if key.notna().any() else runs.iloc[0]


def _ties(runs: pd.DataFrame, best: pd.Series) -> list[str]:
    """The runs whose interval on the pick's metric (acc drop, else KL) overlaps the best run's."""
    metric = "acc_drop_pct" if _num(runs, "metrics.acc_drop_pct").notna().any() else "kl_vs_ref"
    low, high = _num(runs, f"metrics.{metric}_ci_low"), _num(runs, f"metrics.{metric}_ci_high")
    same = pd.Series(0, index=runs.index)
    tied = overlapping(_labels(runs), low, high, same)[best.name]
    return [] if tied == "-" else tied.split(", ")


def _pair(measured: str, word: str | None) -> str:
    return f"{measured} · *{word}*" if word else measured


def precision_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The article's table, measured: the reference, then the best run at each precision (8/4/2 bits, and
    any other). Runs on the published grid are left out of the picks: they reproduce the checkpoint."""
    acc, bits = accuracy(runs), _bits(runs)
    eligible = runs[~_is_true(_col(runs, "tags.on_published_grid"))]
    groups = [("FP", runs[_col(runs, "tags.method") == "fp"])]
    for b in sorted({8, 4, 2} | {int(b) for b in bits.dropna()}, reverse=True):
        groups.append((f"{b}-bit", eligible[bits[eligible.index] == b]))
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
        metric, value, drop, low, high, std = acc.loc[run.name, ["metric", "value", "drop_pct", "low", "high", "std"]]
        if label == "FP":
            measured_acc = f"{metric} {_fmt(value, '{:.4g}')}"
        elif metric == "acc_avg":
            measured_acc = "acc drop " + drop_cell(drop, low, high, _value(run, "metrics.acc_drop_significant")) + "%"
        else:
            measured_acc = f"Δppl {interval(drop, low, high, '{:+.1f}')}%"
        layers_pct = 100 * (1 - _value(run, "metrics.bits_per_weight") / 16)
        model_pct = _value(run, "metrics.mem_reduction_vs_fp16_pct")
        memory = f"{_fmt(layers_pct, '{:.0f}%')} / {_fmt(model_pct, '{:.0f}%')}"
        speed = speed_cell(
            *(
                _value(run, f"metrics.{m}")
                for m in ("speedup_vs_ref", "speedup_vs_ref_ci_low", "speedup_vs_ref_ci_high")
            ),
            _value(run, "metrics.speed_noise_pct"),
            _value(run, "metrics.speedup_is_win"),
        )
        stability = "not repeated" if _missing(std) else f"±{std:.3g} ({metric} std, seeds {run.get('tags.repeats')})"
        setting = _setting(*(run.get(f) for f in SETTING_FIELDS))
        best = run.get("tags.method") if setting == "-" else f"{run.get('tags.method')} ({setting})"
        ties = _ties(group, run) if label != "FP" else []
        rows.append(
            {
                "Precision": label,
                "best method": best + (f" ≈ {', '.join(ties)}" if ties else ""),
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
        + provenance_block(runs)
        + "\nΔppl % = 100·(ppl/ppl_ref − 1) and acc drop % (relative drop of zero-shot task accuracy, "
        "`acc_drop_pct`): vs the reference, lower is better; rows sorted by acc drop where measured, else Δppl. "
        f"{CI_NOTE}; a value without one comes from a run that logged none. "
        "≈ Δppl: the methods at the same nominal bits whose Δppl intervals overlap this one's (not told apart "
        "by this protocol). sig.: the accuracy drop's interval excludes 0. speed-up: decode at batch 1 vs the "
        "reference in the same process, [95% CI]; speed noise: the reference timed against itself; ~noise: not a "
        "win (the interval does not clear 1 + noise). mem -%: memory reduction vs fp16 over the quantized layers "
        "(100·(1 − bits/16)) / the whole model. stability: std of the accuracy metric across seeds, for methods "
        "repeated over seeds. gen match: `gen_match_rate`.\n\n"
        + _flag_notes(runs)
        + to_markdown(method_cells(method_table(runs)))
    )


def precision_markdown(experiment: str, runs: pd.DataFrame) -> str:
    published = _is_true(_col(runs, "tags.on_published_grid"))
    left_out = (
        f"Left out of the picks ({PUBLISHED_MARK} on the published grid: reproduces the checkpoint, says nothing "
        f"about the method): {', '.join(_labels(runs)[published])}.\n\n"
        if published.any()
        else ""
    )
    return (
        f"# {experiment}: the article's precision table, measured\n\n"
        + provenance_block(runs)
        + "\nEach cell: what this experiment measured · *the article's word* for that precision. The best "
        "run per precision has the lowest zero-shot accuracy drop where runs measured tasks, else the "
        "lowest KL vs the reference; ≈ names the runs whose interval on that metric overlaps the best's "
        f"(not told apart). Accuracy: drop vs the reference (lower is better), {CI_NOTE}; sig.: the "
        "interval excludes 0. Memory: reduction vs fp16 over quantized layers / whole model (a reference "
        "stored wider than fp16 is negative). Speed: decode speed-up vs the reference, batch 1, [95% CI]; "
        "~noise: inside the noise floor, not a win. Stability: std of the accuracy metric across seeds.\n\n"
        + left_out
        + to_markdown(precision_table(runs))
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


def _plot_accuracy(runs: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series, str]:
    """One accuracy axis for all points, with its 95% interval where logged: zero-shot drop if every run
    has it, else Δppl% (always logged)."""
    drop = _num(runs, "metrics.acc_drop_pct")
    if drop.notna().all():
        low, high = _num(runs, "metrics.acc_drop_pct_ci_low"), _num(runs, "metrics.acc_drop_pct_ci_high")
        return drop, low, high, "zero-shot accuracy drop % vs reference (lower is better)"
    low, high = _num(runs, "metrics.dppl_pct_ci_low"), _num(runs, "metrics.dppl_pct_ci_high")
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
        {"x": _num(runs, x_field), "y": y, "low": low, "high": high, "label": _col(runs, "tags.method").fillna("?")}
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


def comparison(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run's raw numbers (intervals as lo/hi columns), by bits per weight then perplexity."""
    layers_pct = 100 * (1 - _num(runs, "metrics.bits_per_weight") / 16)
    table = pd.DataFrame(
        {
            "method": _col(runs, "tags.method"),
            "run": _col(runs, "tags.mlflow.runName"),
            "setting": _settings(runs),
            "bits/weight": _num(runs, "metrics.bits_per_weight"),
            "weight MB": _num(runs, "metrics.weight_mb"),
            "mem -% layers": layers_pct,
            "mem -% model": _num(runs, "metrics.mem_reduction_vs_fp16_pct"),
            "ppl": _num(runs, "metrics.ppl"),
            "ppl lo": _num(runs, "metrics.ppl_ci_low"),
            "ppl hi": _num(runs, "metrics.ppl_ci_high"),
            "Δppl %": delta_ppl(runs),
            "Δppl % lo": _num(runs, "metrics.dppl_pct_ci_low"),
            "Δppl % hi": _num(runs, "metrics.dppl_pct_ci_high"),
            "KL": _num(runs, "metrics.kl_vs_ref"),
            "KL lo": _num(runs, "metrics.kl_vs_ref_ci_low"),
            "KL hi": _num(runs, "metrics.kl_vs_ref_ci_high"),
            "top-1": _num(runs, "metrics.top1_agree"),
            "decode tok/s": _num(runs, "metrics.decode_tok_s"),
            "speed-up": _num(runs, "metrics.speedup_vs_ref"),
            "speed-up lo": _num(runs, "metrics.speedup_vs_ref_ci_low"),
            "speed-up hi": _num(runs, "metrics.speedup_vs_ref_ci_high"),
            "speed noise %": _num(runs, "metrics.speed_noise_pct"),
            "speed-up is win": _num(runs, "metrics.speedup_is_win"),
            "kernels": _col(runs, "tags.kernels"),
            "notes": notes(runs),
        }
    )
    order = table.sort_values(["bits/weight", "ppl"], ascending=[False, True], na_position="last").index
    return table.loc[order].reset_index(drop=True)


def comparison_cells(table: pd.DataFrame) -> pd.DataFrame:
    t = table
    return pd.DataFrame(
        {
            "method": [_fmt(v, "{}") for v in t["method"]],
            "run": [_fmt(v, "{}") for v in t["run"]],
            "bits/weight": [_fmt(v, "{:.2f}") for v in t["bits/weight"]],
            "weight MB": [_fmt(v, "{:.1f}") for v in t["weight MB"]],
            "mem -% vs fp16 (layers / model)": [
                f"{_fmt(a, '{:.0f}')} / {_fmt(b, '{:.0f}')}" for a, b in zip(t["mem -% layers"], t["mem -% model"])
            ],
            "ppl [95% CI]": [interval(*v, "{:.2f}") for v in zip(t["ppl"], t["ppl lo"], t["ppl hi"])],
            "Δppl % [95% CI]": [interval(*v, "{:+.1f}") for v in zip(t["Δppl %"], t["Δppl % lo"], t["Δppl % hi"])],
            "KL [95% CI]": [interval(*v, "{:.4f}") for v in zip(t["KL"], t["KL lo"], t["KL hi"])],
            "top-1": [_fmt(v, "{:.3f}") for v in t["top-1"]],
            "decode tok/s": [_fmt(v, "{:.1f}") for v in t["decode tok/s"]],
            "speed-up [95% CI]": [
                speed_cell(*v)
                for v in zip(
                    t["speed-up"], t["speed-up lo"], t["speed-up hi"], t["speed noise %"], t["speed-up is win"]
                )
            ],
            "kernels": [_fmt(v, "{}") for v in t["kernels"]],
            "notes": t["notes"],
        }
    )


def by_setting(runs: pd.DataFrame) -> str:
    """Methods side by side at each setting: 'ppl / Δppl% [95% CI] / KL / bits per weight' per cell, and
    '≈ X' where method X at the same setting has an overlapping Δppl interval."""
    runs = runs.assign(setting=_settings(runs))
    runs = runs[runs["setting"] != "-"]  # the reference has no setting
    methods = _col(runs, "tags.method").astype(str)
    ties = overlapping(
        methods, _num(runs, "metrics.dppl_pct_ci_low"), _num(runs, "metrics.dppl_pct_ci_high"), runs["setting"]
    )
    runs = runs.assign(
        cell=[
            f"{_fmt(p, '{:.1f}')} / {interval(d, lo, hi, '{:+.1f}')} / {_fmt(k, '{:.3f}')} / {_fmt(b, '{:.2f}')}"
            + ("" if tie == "-" else f" ≈ {tie}")
            for p, d, lo, hi, k, b, tie in zip(
                _num(runs, "metrics.ppl"),
                delta_ppl(runs),
                _num(runs, "metrics.dppl_pct_ci_low"),
                _num(runs, "metrics.dppl_pct_ci_high"),
                _num(runs, "metrics.kl_vs_ref"),
                _num(runs, "metrics.bits_per_weight"),
                ties,
            )
        ]
    )
    grid = runs.pivot_table(index="setting", columns="tags.method", values="cell", aggfunc="first")
    grid = grid.sort_index(key=lambda idx: [(-int(s.split("-")[0]), s) for s in idx])
    lines = ["| setting | " + " | ".join(grid.columns) + " |", "|" + "---|" * (len(grid.columns) + 1)]
    for setting, row in grid.iterrows():
        lines.append(f"| {setting} | " + " | ".join("-" if pd.isna(v) else v for v in row) + " |")
    return (
        "Cells: perplexity / Δppl % [95% CI] / KL vs reference / bits per weight; ≈ X: method X at the same "
        "setting has an overlapping Δppl interval (the two are not told apart).\n\n" + "\n".join(lines) + "\n"
    )


def comparison_markdown(experiment: str, runs: pd.DataFrame) -> str:
    table = comparison(runs)
    caveats = set(_col(runs, "tags.caveat").dropna())
    protocol = runs.iloc[0]  # one protocol per table: check_provenance refuses (or flags) a mix
    header = (
        f"# {experiment}: {len(table)} runs\n\n"
        + provenance_block(runs)
        + f"\nPerplexity protocol: corpus {protocol.get('params.data.evaluation.corpus')}, "
        f"{protocol.get('params.eval.tokens')} tokens, context {protocol.get('params.eval.context')}, "
        f"stride {protocol.get('params.eval.stride')}, add_special_tokens "
        f"{protocol.get('params.eval.add_special_tokens')}, BOS {_fmt(protocol.get('params.eval.bos_used'), '{}')}; "
        f"KL over the first {protocol.get('params.eval.kl_tokens')} tokens. Speed: decode at batch 1, "
        f"{protocol.get('params.profile.threads')} thread(s), ratio to the reference in the same process; "
        f"~noise: not a win. {CI_NOTE}.\n"
    )
    text = header + "".join(f"\nCaveat: {c}\n" for c in sorted(caveats)) + "\n" + _flag_notes(runs)
    text += to_markdown(comparison_cells(table))
    if _col(runs, "tags.method").nunique() > 1 and _bits(runs).nunique() > 1:
        text += "\n## By setting\n\n" + by_setting(runs)
    return text


# ---------------------------------------------------------------------------------------------
# The evaluation suite (zero-shot groups, perplexity by context length, generation)


def suite_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    """Per method: accuracy per task group and its standard error, ``acc_avg`` ± stderr, ``acc_drop_pct``
    with its interval and significance, ``ppl_ctx/*``, generation agreement (raw values).

    None when no run measured tasks or context lengths.
    """
    groups = [group for group in GROUPS if f"metrics.acc/{group}" in runs]  # TASK_GROUPS order
    contexts = sorted((c for c in runs.columns if c.startswith("metrics.ppl_ctx/")), key=lambda c: int(c.split("/")[1]))
    if not groups and not contexts:
        return None
    published = _is_true(_col(runs, "tags.on_published_grid"))
    columns = {
        "method": _col(runs, "tags.method").where(~published, _col(runs, "tags.method") + f" {PUBLISHED_MARK}"),
        "bits/weight": _num(runs, "metrics.bits_per_weight"),
    }
    for group in groups:
        columns |= {
            group: _num(runs, f"metrics.acc/{group}"),
            f"{group} stderr": _num(runs, f"metrics.acc_stderr/{group}"),
        }
    columns |= {
        "acc_avg": _num(runs, "metrics.acc_avg"),
        "acc_avg stderr": _num(runs, "metrics.acc_avg_stderr"),
        "drop %": _num(runs, "metrics.acc_drop_pct"),
        "drop % lo": _num(runs, "metrics.acc_drop_pct_ci_low"),
        "drop % hi": _num(runs, "metrics.acc_drop_pct_ci_high"),
        "significant": _num(runs, "metrics.acc_drop_significant"),
    }
    columns |= {f"ppl@{c.split('/')[1]}": _num(runs, c) for c in contexts}
    columns |= {
        "gen match": _num(runs, "metrics.gen_match_rate"),
        "first diverg.": _num(runs, "metrics.gen_first_divergence"),
        "repetition": _num(runs, "metrics.gen_repetition_rate"),
        "notes": notes(runs),
    }
    table = pd.DataFrame(columns)
    return table.sort_values(["bits/weight", "drop %"], ascending=[False, True], na_position="last").reset_index(
        drop=True
    )


def suite_cells(table: pd.DataFrame) -> pd.DataFrame:
    """The suite as it reads in suite.md: 'acc ± stderr', 'drop [lo, hi]', significant yes/no."""
    groups = [c for c in table.columns if f"{c} stderr" in table.columns]
    cells = {
        "method": [_fmt(v, "{}") for v in table["method"]],
        "bits/weight": [_fmt(v, "{:.2f}") for v in table["bits/weight"]],
    }
    for group in groups:
        cells[group] = [
            _fmt(v, "{:.3f}") + ("" if _missing(e) or _missing(v) else f" ± {e:.3f}")
            for v, e in zip(table[group], table[f"{group} stderr"])
        ]
    cells["drop % [95% CI]"] = [
        interval(*v, "{:+.1f}") for v in zip(table["drop %"], table["drop % lo"], table["drop % hi"])
    ]
    cells["significant"] = [{1.0: "yes", 0.0: "no"}.get(v, "-") for v in table["significant"]]
    for column in table.columns:
        if column.startswith("ppl@"):
            cells[column] = [_fmt(v, "{:.2f}") for v in table[column]]
    cells["gen match"] = [_fmt(v, "{:.3f}") for v in table["gen match"]]
    cells["first diverg."] = [_fmt(v, "{:.1f}") for v in table["first diverg."]]
    cells["repetition"] = [_fmt(v, "{:.3f}") for v in table["repetition"]]
    cells["notes"] = table["notes"]
    return pd.DataFrame(cells)


def suite_markdown(experiment: str, runs: pd.DataFrame, table: pd.DataFrame) -> str:
    first = runs.iloc[0]
    return (
        f"# {experiment}: evaluation suite\n\n"
        + provenance_block(runs)
        + "\nZero-shot accuracy per task group through lm-eval (each group the mean of its tasks, acc_norm where "
        "reported), `acc_avg` (mean of the groups) and its relative drop vs the reference (`acc_drop_pct`); "
        "perplexity at several context lengths on the same tokens (`ppl@<len>`); greedy generation vs the "
        "reference (`gen match`: same token at the same position; `first diverg.`: mean index of the first "
        "different token; `repetition`: repeated 3-grams). "
        f"Tasks: {first.get('params.eval.tasks.names')}, limit {first.get('params.eval.tasks.limit')} per task, "
        f"{first.get('params.eval.tasks.num_fewshot')}-shot; generation: "
        f"{first.get('params.eval.generation.new_tokens')} tokens per prompt.\n\n"
        "Intervals: accuracy ± its standard error over the task's examples (lm-eval's `acc_stderr`; a group's "
        "and acc_avg's combined over their tasks); drop [lo, hi]: the 95% interval of acc_drop_pct, paired over "
        "examples vs the reference; significant: yes where that interval excludes 0 (`acc_drop_significant`), "
        "no where it does not: that drop is within the noise of the task sample.\n\n"
        + _flag_notes(runs)
        + to_markdown(suite_cells(table))
    )


# ---------------------------------------------------------------------------------------------
# The report


def write_report(
    experiment: str, out_dir: Path, storage: str = DEFAULT_STORAGE, allow_mixed: bool = False
) -> list[Path]:
    """Write every output of the report to ``out_dir`` and log them to one summary run; return the files.

    Raises ReportError before writing anything if the runs mix models or protocols and not ``allow_mixed``.
    """
    runs = load_runs(experiment)
    check_provenance(runs, allow_mixed)
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
        mlflow.log_table(method_cells(methods), "methods.json")
    return written


# ---------------------------------------------------------------------------------------------
# Command line: the same Hydra overrides as `python -m pipeline`


def compose_config(overrides: list[str]) -> DictConfig:
    """``conf/report.yaml`` (which composes ``conf/config.yaml``) with the overrides; a bad override is a ValueError."""
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="report", overrides=overrides)
    except HydraException as e:
        raise ValueError(f"bad override(s) {' '.join(overrides)}: {e}") from e


def storage_url(url: str) -> str:
    """An Optuna storage URL; a relative sqlite path is under the repository, as for pipeline.tune."""
    if url.startswith("sqlite:///"):
        return f"sqlite:///{tracking.REPO / url.removeprefix('sqlite:///')}"
    return url


def report(overrides: list[str]) -> list[Path]:
    """Compose the config, write the report of ``report.experiment``, print its tables; return the files."""
    cfg = compose_config(overrides)
    name = str(cfg.report.experiment)
    out_dir = Path(cfg.report.out) if cfg.report.out else tracking.REPO / "experiments" / name
    matplotlib.use("Agg")  # files only; no display needed
    tracking.connect(cfg.tracking.uri)
    written = write_report(name, out_dir, storage_url(str(cfg.tune.storage)), bool(cfg.report.allow_mixed))
    print((out_dir / "methods.md").read_text() + "\n" + (out_dir / "precision.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return written


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    guard(lambda: report(argv), argv)


if __name__ == "__main__":
    main()
