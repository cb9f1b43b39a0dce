"""Write the report: every table and figure to a folder, and as artifacts to one summary run."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow

from pipeline import tracking
from pipeline.report.plots import plot_accuracy_vs_bits, plot_accuracy_vs_cost, plot_accuracy_vs_speed, plot_studies
from pipeline.report.provenance import check_provenance
from pipeline.report.runs import SUMMARY_TAG, col, load_runs
from pipeline.report.tables import (
    comparison,
    comparison_markdown,
    method_cells,
    method_table,
    methods_markdown,
    precision_markdown,
    suite_markdown,
    suite_table,
)

log = logging.getLogger(__name__)

DEFAULT_STORAGE = f"sqlite:///{tracking.DEFAULT_STORE / 'optuna.db'}"


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
        (out_dir / "suite.md").write_text(suite_markdown(experiment, runs, suite))
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
        "accuracy_vs_cost.png": plot_accuracy_vs_cost(runs, experiment),
    }
    for name, fig in figures.items():
        if fig is None:
            log.info("%s: no run was profiled (speedup_vs_ref, usd_per_1m_tokens), no %s", experiment, name)
            (out_dir / name).unlink(missing_ok=True)  # a stale plot would contradict the tables
            continue
        fig.savefig(out_dir / name, dpi=120)
        written.append(out_dir / name)
    written += plot_studies(experiment, storage, out_dir, set(col(runs, "tags.tuned_from").dropna()))

    exp = mlflow.get_experiment_by_name(experiment)
    with mlflow.start_run(experiment_id=exp.experiment_id, run_name="report", tags={SUMMARY_TAG: "report"}):
        for path in written:
            mlflow.log_artifact(str(path))
        mlflow.log_table(method_cells(methods), "methods.json")
    return written
