"""The report from a small MLflow store of made-up runs: tables, best runs, plots, summary run, notebook."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest

from pipeline import report, tracking

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (run name, tags, params, metrics); one fp reference and methods at 8, 4 and 2 bits.
COMMON = {"ppl_ref": 20.0, "mem_reduction_vs_fp16_pct": 0.0}
RUNS = [
    (
        "m/fp",
        {"method": "fp", "family": "reference", "bits": "None", "granularity": "None", "kernels": "none"},
        {"method.bits": "None", "method.granularity": "None", "method.group_size": "None"},
        {"ppl": 20.0, "kl_vs_ref": 0.0, "bits_per_weight": 32.0, "weight_mb": 500.0, "decode_tok_s": 10.0,
         "speedup_vs_ref": 1.0, "mem_reduction_vs_fp16_pct": -100.0, "acc_avg": 0.5, "acc_drop_pct": 0.0,
         "acc/commonsense": 0.6, "acc/numerical": 0.4, "acc/hellaswag": 0.45, "ppl_ctx/128": 30.0, "ppl_ctx/1024": 21.0,
         "gen_match_rate": 1.0},
    ),
    (
        "m/weight_only",  # best 8-bit: lowest accuracy drop, though per_tensor has the lower KL
        {"method": "weight_only", "family": "weight_only", "bits": "8", "granularity": "per_channel",
         "kernels": "aten_int8_weight_only"},
        {"method.bits": "8", "method.granularity": "per_channel", "method.group_size": "None"},
        {"ppl": 20.1, "kl_vs_ref": 0.004, "bits_per_weight": 8.02, "weight_mb": 210.0, "decode_tok_s": 14.0,
         "speedup_vs_ref": 1.4, "mem_reduction_vs_fp16_pct": 18.0, "acc_avg": 0.495, "acc_drop_pct": 1.0,
         "gen_match_rate": 0.9, "acc/commonsense": 0.59, "acc/numerical": 0.4, "ppl_ctx/128": 30.5,
         "ppl_ctx/1024": 21.2},
    ),
    (
        "m/per_tensor",
        {"method": "per_tensor", "family": "granularity", "bits": "8", "granularity": "per_tensor",
         "kernels": "aten_int8_weight_only"},
        {"method.bits": "8", "method.granularity": "per_tensor", "method.group_size": "None"},
        {"ppl": 20.2, "kl_vs_ref": 0.001, "bits_per_weight": 8.0, "weight_mb": 209.0, "decode_tok_s": 15.0,
         "speedup_vs_ref": 1.5, "mem_reduction_vs_fp16_pct": 18.0, "acc_avg": 0.49, "acc_drop_pct": 2.0},
    ),
    (
        "m/group_wise",
        {"method": "group_wise", "family": "granularity", "bits": "4", "granularity": "group",
         "kernels": "aten_int4_groupwise"},
        {"method.bits": "4", "method.granularity": "group", "method.group_size": "64"},
        {"ppl": 26.0, "kl_vs_ref": 0.34, "bits_per_weight": 4.31, "weight_mb": 163.0, "decode_tok_s": 21.0,
         "speedup_vs_ref": 2.1, "mem_reduction_vs_fp16_pct": 37.0},
    ),
    (
        "m/gptq",  # best 4-bit by KL (no run at 4 bits measured tasks); tuned by a study
        {"method": "gptq", "family": "algorithm", "bits": "4", "granularity": "group", "kernels": "aten_int4_groupwise",
         "tuned_from": "gptq_w4", "overrides": "method=gptq experiment=fake method.gptq.damp=0.05"},
        {"method.bits": "4", "method.granularity": "group", "method.group_size": "64"},
        {"ppl": 24.0, "kl_vs_ref": 0.2, "bits_per_weight": 4.31, "weight_mb": 163.0, "decode_tok_s": 20.0,
         "speedup_vs_ref": 2.0, "mem_reduction_vs_fp16_pct": 37.0},
    ),
    (
        "m/w2_group",  # profiling off: no speed numbers
        {"method": "w2_group", "family": "algorithm", "bits": "2", "granularity": "group", "kernels": "dequant"},
        {"method.bits": "2", "method.granularity": "group", "method.group_size": "32"},
        {"ppl": 280.0, "kl_vs_ref": 2.7, "bits_per_weight": 2.57, "weight_mb": 141.0,
         "mem_reduction_vs_fp16_pct": 45.0},
    ),
]  # fmt: skip


def _log(name: str, tags: dict, params: dict, metrics: dict, **kwargs):
    with mlflow.start_run(run_name=name, tags=tags, **kwargs) as run:
        mlflow.log_params({"eval.tokens": "4096", "eval.context": "512", **params})
        mlflow.log_metrics(metrics)
    return run


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with experiment 'fake' (runs above, a repeated parent, noise to skip) and 'empty'."""
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root}/mlflow.db"
    tracking.setup({"uri": uri, "experiment": "empty"})
    mlflow.set_experiment(experiment_id=tracking.setup({"uri": uri, "experiment": "fake"}))
    _log("m/gptq", RUNS[4][1], RUNS[4][2], {**COMMON, **RUNS[4][3], "kl_vs_ref": 0.01})  # older: superseded
    for name, tags, params, metrics in RUNS:
        _log(name, tags, params, {**COMMON, **metrics})
    # ptq_static repeated over seeds: the parent logs means and stds, the children plain metrics.
    tags = {"method": "ptq_static", "family": "post_training", "bits": "8", "granularity": "per_channel"}
    params = {"method.bits": "8", "method.granularity": "per_channel", "method.group_size": "None"}
    with mlflow.start_run(run_name="m/ptq_static", tags={**tags, "repeats": "[0, 1]"}) as parent:
        mlflow.log_params({"eval.tokens": "4096", **params})
        for seed, ppl in ((0, 30.0), (1, 32.0)):
            _log(f"m/ptq_static seed={seed}", {**tags, "seed": str(seed)}, params,
                 {**COMMON, "ppl": ppl, "kl_vs_ref": 0.4, "bits_per_weight": 8.02}, nested=True)  # fmt: skip
        mlflow.log_metrics({"ppl_mean": 31.0, "ppl_std": 1.414, "ppl_ref_mean": 20.0, "kl_vs_ref_mean": 0.4,
                            "kl_vs_ref_std": 0.01, "bits_per_weight_mean": 8.02})  # fmt: skip
    with mlflow.start_run(run_name="comparison", tags={report.SUMMARY_TAG: "table"}):
        pass
    with mlflow.start_run(run_name="study gptq_w4", tags={"tune.study": "gptq_w4", "method": "gptq"}):
        mlflow.log_metrics({"trials_complete": 4.0})  # a tuning study's parent: no model measured
    with mlflow.start_run(run_name="m/broken") as broken:
        mlflow.log_metrics({"ppl": 1.0})
    mlflow.MlflowClient().set_terminated(broken.info.run_id, "FAILED")

    # Optuna: a single- and a two-objective study for this experiment, and one for another experiment.
    storage = f"sqlite:///{root}/optuna.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name, directions, experiment in (("gptq_w4", ["minimize"], "fake"), ("bits/kl", ["minimize"] * 2, "fake"),
                                         ("other", ["minimize"], "elsewhere")):  # fmt: skip
        study = optuna.create_study(study_name=name, storage=storage, directions=directions)
        study.set_user_attr("experiment", experiment)
        if len(directions) == 1:
            study.optimize(lambda t: (t.suggest_float("damp", 0.0, 1.0) - 0.3) ** 2, n_trials=4)
        else:
            study.optimize(lambda t: (t.suggest_int("bits", 2, 8), 8 / t.suggest_int("g", 1, 4)), n_trials=4)
    return {"root": root, "uri": uri, "storage": storage, "parent": parent.info.run_id}


@pytest.fixture(scope="module")
def written(store):
    out = store["root"] / "out"
    report.main(
        ["--experiment", "fake", "--tracking-uri", store["uri"], "--out", str(out), "--storage", store["storage"]]
    )
    return out


def test_load_runs_keeps_latest_finished_and_parents_only(store):
    mlflow.set_tracking_uri(store["uri"])
    runs = report.load_runs("fake")
    names = sorted(runs["tags.mlflow.runName"])
    assert names == ["m/fp", "m/gptq", "m/group_wise", "m/per_tensor", "m/ptq_static", "m/w2_group", "m/weight_only"]
    gptq = runs[runs["tags.method"] == "gptq"].iloc[0]
    assert gptq["metrics.kl_vs_ref"] == 0.2  # the latest run of that name, not the older one
    parent = runs[runs["tags.method"] == "ptq_static"].iloc[0]
    assert parent["run_id"] == store["parent"] and parent["metrics.ppl"] == 31.0  # means fill the plain metric


def test_method_table_rows_and_missing_cells(store):
    mlflow.set_tracking_uri(store["uri"])
    runs = report.load_runs("fake")
    table = report.method_table(runs)
    assert list(table.columns) == list(report.METHOD_COLUMNS)
    assert table["method"].tolist()[0] == "fp" and len(table) == 7
    rows = table.set_index("method")
    assert rows.loc["weight_only", "accuracy metric"] == "acc_avg" and rows.loc["weight_only", "drop %"] == 1.0
    assert rows.loc["gptq", "accuracy metric"] == "ppl" and rows.loc["gptq", "drop %"] == pytest.approx(20.0)
    assert (
        rows.loc["ptq_static", "drop %"] == pytest.approx(55.0) and rows.loc["ptq_static", "stability (std)"] == 1.414
    )
    assert rows.loc["gptq", "tuned settings"] == "study gptq_w4: method.gptq.damp=0.05"
    assert rows.loc["w2_group", "mem -% layers"] == pytest.approx(100 * (1 - 2.57 / 16))
    text = report.methods_markdown("fake", runs)
    w2 = next(line for line in text.splitlines() if line.startswith("| w2_group"))
    cells = [c.strip() for c in w2.strip("|").split("|")]
    speed = list(report.METHOD_COLUMNS).index("speed-up")
    assert cells[speed] == "-" and cells[list(report.METHOD_COLUMNS).index("gen match")] == "-"
    assert "| weight_only |" in text and "0.900" in text and "nan" not in text


def test_precision_table_picks_best_run_per_precision(store):
    mlflow.set_tracking_uri(store["uri"])
    table = report.precision_table(report.load_runs("fake")).set_index("Precision")
    assert table.index.tolist() == ["FP", "8-bit", "4-bit", "2-bit"]
    assert table.loc["8-bit", "best method"] == "weight_only (8-bit per_channel)"  # by accuracy drop, not KL
    assert table.loc["4-bit", "best method"] == "gptq (4-bit g64)"  # by KL
    assert table.loc["8-bit", "Accuracy"] == "acc drop +1.0% · *Near-Perfect*"
    assert table.loc["4-bit", "Speed"] == "2.00x · *Much Faster*"
    assert (
        table.loc["2-bit", "Speed"] == "- · *Fastest*" and table.loc["FP", "Stability"] == "not repeated · *Very High*"
    )
    # A precision with no run still gets its row; a repeated run shows its spread.
    runs = report.load_runs("fake")
    only_8 = report.precision_table(runs[report._bits(runs) == 8]).set_index("Precision")
    assert only_8.loc["4-bit", "best method"] == "no run" and only_8.loc["FP", "best method"] == "no run"
    repeated = report.precision_table(runs[runs["tags.method"] == "ptq_static"]).set_index("Precision")
    assert repeated.loc["8-bit", "Stability"].startswith("±1.41 (ppl std")


def test_pareto_front_excludes_dominated_points():
    bits = [32.0, 8.0, 8.0, 4.3, 4.3, 2.5, 5.0]
    loss = [0.0, 0.5, 3.0, 20.0, 12.0, 1000.0, 15.0]
    # (8, 3.0) loses to (8, 0.5); (4.3, 20) to (4.3, 12); (5, 15) to (4.3, 12): fewer bits and lower loss.
    assert report.pareto_front(bits, loss) == [5, 4, 1, 0]
    assert report.pareto_front([], []) == []


def test_report_files_and_summary_run(store, written):
    names = {p.name for p in written.iterdir()}
    expected = {"methods.md", "methods.csv", "precision.md", "comparison.md", "comparison.csv", "suite.md", "suite.csv"}
    pngs = {"accuracy_vs_bits.png", "accuracy_vs_speed.png", "history_gptq_w4.png", "history_bits_kl.png"}
    assert names == expected | pngs  # no plot for the other experiment's study
    for name in pngs:
        assert (written / name).read_bytes()[:8] == PNG_MAGIC, name
    assert "## By setting" in (written / "comparison.md").read_text()
    assert "| 2-bit | w2_group (2-bit g32) |" in (written / "precision.md").read_text()
    assert len(pd.read_csv(written / "methods.csv")) == 7

    mlflow.set_tracking_uri(store["uri"])
    exp = mlflow.get_experiment_by_name("fake")
    (summary,) = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`{report.SUMMARY_TAG}` = 'report'")[
        "run_id"
    ]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(summary)}
    assert expected | pngs | {"methods.json"} <= artifacts
    logged = mlflow.MlflowClient().load_table(exp.experiment_id, "methods.json", run_ids=[summary])
    assert "gptq" in set(logged["method"])


def test_suite_table_has_groups_contexts_and_generation(store, written):
    mlflow.set_tracking_uri(store["uri"])
    runs = report.load_runs("fake")
    table = report.suite_table(runs).set_index("method")
    # groups only (a task such as hellaswag is not a column), context lengths in increasing order
    assert list(table.columns[1:3]) == ["commonsense", "numerical"] and "hellaswag" not in table.columns
    assert [c for c in table.columns if c.startswith("ppl@")] == ["ppl@128", "ppl@1024"]
    assert table.loc["weight_only", "drop %"] == 1.0 and table.loc["weight_only", "gen match"] == 0.9
    assert "| fp | 32.00 | 0.600 | 0.400 | 0.500 | +0.0 | 30.00 | 21.00 | 1.000 |" in (written / "suite.md").read_text()
    assert report.suite_table(runs.drop(columns=[c for c in runs if "acc/" in c or "ppl_ctx" in c])) is None


def test_study_plots_for_the_studies_tuned_runs_came_from(store, tmp_path):
    paths = report.plot_studies("no_such_experiment", store["storage"], tmp_path, {"other"})
    assert [p.name for p in paths] == ["history_other.png"]


def test_speed_plot_skipped_without_speed_numbers(store):
    mlflow.set_tracking_uri(store["uri"])
    runs = report.load_runs("fake")
    assert report.plot_accuracy_vs_speed(runs[runs["tags.method"] == "w2_group"]) is None
    assert report.plot_accuracy_vs_bits(runs.drop(columns=["metrics.acc_drop_pct", "metrics.speedup_vs_ref"]))


def test_unknown_or_empty_experiment_is_an_error_naming_the_experiments(store, tmp_path):
    for name, message in (("nope", "no MLflow experiment 'nope'"), ("empty", "'empty' has no finished runs")):
        with pytest.raises(SystemExit) as e:
            report.main(["--experiment", name, "--tracking-uri", store["uri"], "--out", str(tmp_path)])
        assert str(e.value).startswith("error: ") and message in str(e.value)
        assert "fake" in str(e.value) and "empty" in str(e.value)
    assert not list(tmp_path.iterdir())


def test_by_setting_skips_the_reference():
    runs = pd.DataFrame(
        {
            "params.method.bits": ["None", "4", "4", "2"],
            "params.method.group_size": ["None", "64", "64", "32"],
            "params.method.granularity": ["None", "group", "group", "group"],
            "tags.method": ["fp", "group_wise", "gptq", "gptq"],
            "metrics.ppl": [20.0, 30.0, 25.0, 300.0],
            "metrics.kl_vs_ref": [0.0, 0.3, 0.2, 3.0],
            "metrics.bits_per_weight": [32.0, 4.31, 4.31, 2.56],
        }
    )
    text = report.by_setting(runs)
    assert "| 4-bit g64 | 25.0 / 0.200 / 4.31 | 30.0 / 0.300 / 4.31 |" in text and "fp" not in text


def test_notebook_runs_headless(store, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])  # the kernel inherits the environment
    monkeypatch.setenv("QB_EXPERIMENT", "fake")
    notebook = nbformat.read(REPO / "notebooks" / "compare_methods.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # committed clean
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    shown = "".join(str(o.get("data", {}).get("text/markdown", "")) + str(o.get("text", "")) for o in outputs)
    assert "weight_only (8-bit per_channel)" in shown and "| gptq |" in shown
    assert any("image/png" in o.get("data", {}) for o in outputs)
