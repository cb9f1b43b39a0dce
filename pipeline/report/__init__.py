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
  its 95% interval where the run logged one, memory, energy per token (measured and estimated apart),
  $ per 1M tokens, decode vs the memory-bandwidth floor, stability, settings, flags.
- ``precision.md``: the article's precision table (FP / 8 / 4 / 2 bits), measured, next to its words.
- ``suite.{md,csv}``: accuracy per task group ± standard error, perplexity by context, generation.
- ``accuracy_vs_bits.png`` (with the Pareto front), ``accuracy_vs_speed.png``, ``accuracy_vs_cost.png``
  ($ per 1M tokens), and
  ``history_<study>.png`` for each Optuna study tuned for this experiment.
- ``comparison.{md,csv}``: every run's raw numbers, and methods side by side at each setting.

Every markdown file opens with a provenance line (commit, host, model, protocol of its runs); see
``check_provenance`` for what is refused and what is flagged. A number a run did not log is '-', so
runs of older code still render.
"""

from pipeline.report.cells import PUBLISHED_NOTE, overlapping, speed_cell
from pipeline.report.cli import compose_config, main, storage_url
from pipeline.report.plots import (
    pareto_front,
    plot_accuracy_vs_bits,
    plot_accuracy_vs_cost,
    plot_accuracy_vs_speed,
    plot_studies,
)
from pipeline.report.provenance import check_provenance
from pipeline.report.runs import SUMMARY_TAG, ReportError, load_runs, nominal_bits
from pipeline.report.tables import (
    by_setting,
    method_table,
    methods_markdown,
    precision_markdown,
    precision_table,
    suite_table,
)
from pipeline.report.write import write_report

__all__ = [
    "PUBLISHED_NOTE",
    "SUMMARY_TAG",
    "ReportError",
    "by_setting",
    "check_provenance",
    "compose_config",
    "load_runs",
    "main",
    "method_table",
    "methods_markdown",
    "nominal_bits",
    "overlapping",
    "pareto_front",
    "plot_accuracy_vs_bits",
    "plot_accuracy_vs_cost",
    "plot_accuracy_vs_speed",
    "plot_studies",
    "precision_markdown",
    "precision_table",
    "speed_cell",
    "storage_url",
    "suite_table",
    "write_report",
]
