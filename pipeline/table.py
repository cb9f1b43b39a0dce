"""The comparison table of an experiment, read back from MLflow.

    python -m pipeline.table --experiment compare

One row per run name (the latest FINISHED run of each), sorted by bits per weight. Written to
``experiments/<experiment>/comparison.{md,csv}`` and logged to MLflow as a summary run.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import mlflow
import pandas as pd

from pipeline import tracking

SUMMARY_TAG = "quantbench.summary"
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


def load_runs(experiment: str) -> pd.DataFrame:
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in mlflow.search_experiments()]
        raise ValueError(f"no MLflow experiment {experiment!r}; experiments: {', '.join(names) or 'none'}")
    runs = mlflow.search_runs(
        [exp.experiment_id], filter_string="attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"]
    )
    if runs.empty:
        raise ValueError(f"experiment {experiment!r} has no finished runs")
    if f"tags.{SUMMARY_TAG}" in runs:
        runs = runs[runs[f"tags.{SUMMARY_TAG}"].isna()]
    return runs.drop_duplicates("tags.mlflow.runName")  # latest of each run name


def comparison(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    runs["delta_ppl_pct"] = 100 * (runs["metrics.ppl"] / runs["metrics.ppl_ref"] - 1)
    layers_pct = 100 * (1 - runs["metrics.bits_per_weight"] / 16)
    runs["memory_cell"] = [
        f"{a:.0f} / {b:.0f}" for a, b in zip(layers_pct, runs["metrics.mem_reduction_vs_fp16_pct"], strict=True)
    ]
    runs = runs.sort_values(["metrics.bits_per_weight", "metrics.ppl"], ascending=[False, True])
    table = pd.DataFrame({name: runs.get(field, None) for name, (field, _) in COLUMNS.items()})
    return table.reset_index(drop=True)


def by_setting(runs: pd.DataFrame) -> str:
    """Methods side by side at each (bits, group size): 'ppl / KL / bits per weight' per cell."""
    runs = runs[runs["params.method.bits"] != "None"]  # the reference has no setting
    runs = runs.assign(
        setting=runs["params.method.bits"]
        + "-bit "
        + runs["params.method.granularity"].where(
            runs["params.method.granularity"] != "group", "g" + runs["params.method.group_size"]
        ),
        cell=[
            f"{p:.1f} / {k:.3f} / {b:.2f}"
            for p, k, b in zip(runs["metrics.ppl"], runs["metrics.kl_vs_ref"], runs["metrics.bits_per_weight"])
        ],
    )
    grid = runs.pivot_table(index="setting", columns="tags.method", values="cell", aggfunc="first")
    grid = grid.sort_index(key=lambda idx: [(-int(s.split("-")[0]), s) for s in idx])
    lines = ["| setting | " + " | ".join(grid.columns) + " |", "|" + "---|" * (len(grid.columns) + 1)]
    for setting, row in grid.iterrows():
        lines.append(f"| {setting} | " + " | ".join("-" if pd.isna(v) else v for v in row) + " |")
    return "Cells: perplexity / KL vs reference / bits per weight.\n\n" + "\n".join(lines) + "\n"


def to_markdown(table: pd.DataFrame) -> str:
    def cell(value, fmt: str) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return fmt.format(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(cell(row[c], COLUMNS[c][1]) for c in table.columns) + " |")
    return "\n".join(lines)


def write(experiment: str, out_dir: Path) -> str:
    runs = load_runs(experiment)
    table = comparison(runs)
    markdown = to_markdown(table)
    caveats = {c for c in runs.get("tags.caveat", pd.Series(dtype=str)).dropna()}
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
    text = header + "".join(f"\nCaveat: {c}\n" for c in sorted(caveats)) + "\n" + markdown + "\n"
    if runs["tags.method"].nunique() > 1 and runs["params.method.bits"].nunique() > 1:
        text += "\n## By setting\n\n" + by_setting(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.md").write_text(text)
    table.to_csv(out_dir / "comparison.csv", index=False)
    exp = mlflow.get_experiment_by_name(experiment)
    with mlflow.start_run(experiment_id=exp.experiment_id, run_name="comparison", tags={SUMMARY_TAG: "table"}):
        mlflow.log_text(text, "comparison.md")
        mlflow.log_table(table.astype(str), "comparison.json")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="compare")
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or sqlite under mlruns/")
    parser.add_argument("--out", type=Path, default=None, help="default: experiments/<experiment>/")
    args = parser.parse_args(argv)
    tracking.connect(args.tracking_uri)
    try:
        print(write(args.experiment, args.out or tracking.REPO / "experiments" / args.experiment))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
