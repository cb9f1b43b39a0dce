"""Table cells as text: numbers with their intervals, '-' for what a run did not log, and the marks a reader
must see (published grid, worse than the preset, odd provenance)."""

from __future__ import annotations

import pandas as pd

from pipeline.report.provenance import provenance_marks
from pipeline.report.runs import col, is_true, missing

CI_NOTE = "[lo, hi]: 95% interval, paired over evaluation windows (perplexity, KL) or examples (tasks) vs the reference"
PUBLISHED_MARK = "†"
PUBLISHED_NOTE = (
    f"{PUBLISHED_MARK} on the grid the model's weights were published on: reproduces the checkpoint, "
    "says nothing about the method"
)


def cell(value, fmt: str) -> str:
    return "-" if missing(value) else fmt.format(value)


def interval(value, low, high, fmt: str, unit: str = "") -> str:
    """'+14.0 [+12.1, +15.9]'; the value alone where the run logged no interval; '-' without a value."""
    if missing(value):
        return "-"
    text = fmt.format(value) + unit
    if missing(low) or missing(high):
        return text
    return f"{text} [{fmt.format(low)}, {fmt.format(high)}]"


def speed_cell(speedup, low, high, noise_pct, is_win) -> str:
    """'2.00x [1.91, 2.09]'; a speed-up that is not a win (``speedup_is_win`` 0) is marked: '~noise'
    when its interval reaches into the noise floor, 'slower' when it lies wholly below it."""
    text = interval(speedup, low, high, "{:.2f}", "x")
    if missing(is_win) or missing(speedup) or is_win == 1:
        return text
    if not missing(high) and not missing(noise_pct) and high < 1 - noise_pct / 100:
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


def tuned_cell(overrides, study, tuned_settings) -> str:
    """What was set beyond the preset: the run's overrides, and the Optuna study and settings it chose."""
    # method= and experiment= are in the table already; what is left was set by hand or by a tuner.
    items = [] if missing(overrides) else str(overrides).split()
    if not missing(tuned_settings):
        items += str(tuned_settings).split()
    text = " ".join(o for o in items if not o.startswith(("method=", "experiment=")))
    if not missing(study):
        return f"study {study}: {text}" if text else f"study {study}"
    return text or "-"


def _number(text) -> str:
    value = pd.to_numeric(text, errors="coerce")
    return str(text) if missing(value) else f"{value:.4g}"


def _vs_preset(verdict, objective, best, preset) -> str:
    """The flag of a tuned run that did not beat its preset (``tuned_vs_preset``); empty otherwise."""
    if verdict == "worse":
        return f"worse than preset ({objective} {_number(best)} vs preset {_number(preset)})"
    if verdict == "preset_not_measured":
        return "preset not measured"
    return ""


def notes(runs: pd.DataFrame) -> pd.Series:
    """Per run, the flags a reader must see: published grid, worse than its preset, odd provenance."""
    published = is_true(col(runs, "tags.on_published_grid")).map({True: f"{PUBLISHED_MARK} published grid", False: ""})
    vs_preset = pd.Series(
        [
            _vs_preset(*cells)
            for cells in zip(
                col(runs, "tags.tuned_vs_preset"),
                col(runs, "tags.tuned_objective"),
                col(runs, "tags.tuned_best_value"),
                col(runs, "tags.tuned_preset_value"),
            )
        ],
        index=runs.index,
    )
    parts = pd.concat([published, vs_preset, provenance_marks(runs)], axis=1)
    return parts.apply(lambda row: "; ".join(p for p in row if p), axis=1).replace("", "-")


def flag_notes(runs: pd.DataFrame) -> str:
    """Note lines for the flags that occur in this table."""
    lines = []
    if is_true(col(runs, "tags.on_published_grid")).any():
        lines.append(PUBLISHED_NOTE + ".")
    if (col(runs, "tags.tuned_vs_preset") == "worse").any():
        lines.append(
            "worse than preset: the tuned setting scored worse than the method's preset on the study's objective."
        )
    return "".join(f"{line}\n\n" for line in lines)
