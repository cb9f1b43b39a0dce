"""Provenance: the runs of one table must be comparable; what they share and what differs, visibly."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from pipeline.report.runs import ReportError, col, run_labels

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
FLAG_KEYS = (
    "git.commit",
    "git.dirty",
    "host.processor",
    "host.cpu_count",
    "host.platform",
    "model.resolved_path",
    "device",
    "model.dtype",
    "host.gpu",  # GPU runs only (pipeline.tracking.gpu_provenance)
    "host.gpu_driver",
    "host.cuda",
)


def provenance_keys(runs: pd.DataFrame) -> tuple[list[str], list[str]]:
    packages = sorted(c.removeprefix("params.") for c in runs.columns if c.startswith("params.pkg."))
    return list(REFUSE_KEYS), [*FLAG_KEYS, *packages]


def differences(runs: pd.DataFrame, keys: Sequence[str]) -> dict[str, pd.Series]:
    """key -> each run's value, for the keys whose logged values differ across the runs."""
    out = {}
    for key in keys:
        values = col(runs, f"params.{key}")
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
    refuse, _ = provenance_keys(runs)
    mixed = differences(runs, refuse)
    if mixed and not allow_mixed:
        labels = run_labels(runs)
        detail = "; ".join(f"{key}: {runs_per_value(values, labels)}" for key, values in mixed.items())
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


def runs_per_value(values: pd.Series, labels: pd.Series, key: str = "") -> str:
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
    refuse, flag = provenance_keys(runs)
    labels = run_labels(runs)
    shared, lines = [], []
    for key in [*refuse, *flag]:
        values = col(runs, f"params.{key}")
        logged = values.dropna()
        if logged.empty or key.startswith("pkg."):
            continue  # packages: named only when they differ, the line stays short
        if logged.nunique() == 1:
            shared.append(f"{key} {_short(key, logged.iloc[0])}")
    for key, values in differences(runs, refuse).items():
        lines.append(f"**Not comparable: {key} differs** (report.allow_mixed=true): {runs_per_value(values, labels)}")
    for key, values in differences(runs, flag).items():
        lines.append(f"**{key} differs** (rows marked ≠ in notes): {runs_per_value(values, labels, key)}")
    unlogged = {}  # run label -> the keys other runs logged and it did not (older code, a parent run)
    for key in [*refuse, *flag]:
        values = col(runs, f"params.{key}")
        if values.notna().any():
            for label in labels[values.isna()]:
                unlogged.setdefault(label, []).append(key)
    if unlogged:
        lines.append("Not logged by: " + "; ".join(f"{label} ({', '.join(keys)})" for label, keys in unlogged.items()))
    head = f"Provenance ({len(runs)} runs): " + (" · ".join(shared) if shared else "no provenance logged")
    return "\n\n".join([head, *lines]) + "\n"


def provenance_marks(runs: pd.DataFrame) -> pd.Series:
    """Per run: '≠ key, key' for the provenance keys where its logged value is not the majority's."""
    refuse, flag = provenance_keys(runs)
    marks = pd.Series([[] for _ in range(len(runs))], index=runs.index)
    for key, values in differences(runs, [*refuse, *flag]).items():
        majority = _counts(values)[0][0]
        for i in values.index[values.notna() & (values != majority)]:
            marks[i] = [*marks[i], key]
    return marks.map(lambda keys: f"≠ {', '.join(keys)}" if keys else "")
