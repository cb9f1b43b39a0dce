"""The report from a small MLflow store of made-up runs: tables, best runs, plots, summary run, notebook."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from omegaconf import OmegaConf

from pipeline import report, tracking

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (run name, tags, params, metrics); one fp reference and methods at 8, 4 and 2 bits.
PROVENANCE = {"git.commit": "a" * 40, "git.dirty": "False", "host.processor": "Test CPU", "host.cpu_count": "2",
              "model.name": "tiny"}  # fmt: skip
COMMON = {"ppl_ref": 20.0, "mem_reduction_vs_fp16_pct": 0.0}
RUNS = [
    (
        "m/fp",
        {"method": "fp", "family": "reference", "bits": "None", "granularity": "None", "kernels": "none"},
        {"method.bits": "None", "method.granularity": "None", "method.group_size": "None"},
        {"ppl": 20.0, "kl_vs_ref": 0.0, "bits_per_weight": 32.0, "weight_mb": 500.0, "decode_tok_s": 10.0,
         "speedup_vs_ref": 1.0, "speedup_vs_ref_ci_low": 0.97, "speedup_vs_ref_ci_high": 1.03, "speed_noise_pct": 3.0,
         "speedup_is_win": 0.0, "mem_reduction_vs_fp16_pct": -100.0, "acc_avg": 0.5, "acc_avg_stderr": 0.02,
         "acc_drop_pct": 0.0, "acc/commonsense": 0.6, "acc_stderr/commonsense": 0.049, "acc/numerical": 0.4,
         "acc/hellaswag": 0.45, "ppl_ctx/128": 30.0, "ppl_ctx/1024": 21.0,
         "gen_match_rate": 1.0, "energy_j_per_token_est": 0.05, "usd_per_1m_tokens": 2.125, "decode_vs_floor": 3.0},
    ),
    (
        "m/weight_only",  # best 8-bit: lowest accuracy drop, though per_tensor has the lower KL
        {"method": "weight_only", "family": "weight_only", "bits": "8", "granularity": "per_channel",
         "kernels": "aten_int8_weight_only"},
        {"method.bits": "8", "method.granularity": "per_channel", "method.group_size": "None"},
        {"ppl": 20.1, "kl_vs_ref": 0.004, "bits_per_weight": 8.02, "weight_mb": 210.0, "decode_tok_s": 14.0,
         "speedup_vs_ref": 1.4, "mem_reduction_vs_fp16_pct": 18.0, "acc_avg": 0.495, "acc_drop_pct": 1.0,
         "acc_drop_pct_ci_low": -2.0, "acc_drop_pct_ci_high": 4.0, "acc_drop_significant": 0.0,
         "gen_match_rate": 0.9, "usd_per_1m_tokens": 1.52, "acc/commonsense": 0.59, "acc/numerical": 0.4,
         "ppl_ctx/128": 30.5, "ppl_ctx/1024": 21.2},
    ),
    (
        "m/per_tensor",
        {"method": "per_tensor", "family": "granularity", "bits": "8", "granularity": "per_tensor",
         "kernels": "aten_int8_weight_only"},
        {"method.bits": "8", "method.granularity": "per_tensor", "method.group_size": "None",
         "method.symmetric": "True", "method.symmetric_range": "full"},
        {"ppl": 20.2, "kl_vs_ref": 0.001, "bits_per_weight": 8.0, "weight_mb": 209.0, "decode_tok_s": 15.0,
         "speedup_vs_ref": 1.5, "mem_reduction_vs_fp16_pct": 18.0, "acc_avg": 0.49, "acc_drop_pct": 2.0,
         "acc_drop_pct_ci_low": 0.5, "acc_drop_pct_ci_high": 3.5, "acc_drop_significant": 1.0},
    ),
    (
        "m/group_wise",
        {"method": "group_wise", "family": "granularity", "bits": "4", "granularity": "group",
         "kernels": "aten_int4_groupwise"},
        {"method.bits": "4", "method.granularity": "group", "method.group_size": "64"},
        {"ppl": 26.0, "kl_vs_ref": 0.34, "bits_per_weight": 4.31, "weight_mb": 163.0, "decode_tok_s": 21.0,
         "speedup_vs_ref": 2.1, "mem_reduction_vs_fp16_pct": 37.0, "dppl_pct": 30.0, "dppl_pct_ci_low": 26.0,
         "dppl_pct_ci_high": 34.0, "quantized_weight_share": 0.79},  # no speed intervals, as in an older run
    ),
    (
        "m/gptq",  # best 4-bit by KL (no run at 4 bits measured tasks); tuned by a study
        {"method": "gptq", "family": "algorithm", "bits": "4", "granularity": "group", "kernels": "aten_int4_groupwise",
         "tuned_from": "gptq_w4", "overrides": "method=gptq experiment=fake method.gptq.damp=0.05",
         "tuned_vs_preset": "worse", "tuned_objective": "kl_vs_ref", "tuned_best_value": "0.2",
         "tuned_preset_value": "0.15", "algorithm": "gptq+rtn", "exports": "checkpoint,compressed-tensors,gguf:Q4_1"},
        {"method.bits": "4", "method.granularity": "group", "method.group_size": "64"},
        {"ppl": 24.0, "kl_vs_ref": 0.2, "kl_vs_ref_ci_low": 0.18, "kl_vs_ref_ci_high": 0.22, "bits_per_weight": 4.31,
         "weight_mb": 163.0, "decode_tok_s": 20.0, "speedup_vs_ref": 2.0, "speedup_vs_ref_ci_low": 1.9,
         "speedup_vs_ref_ci_high": 2.1, "speed_noise_pct": 3.0, "speedup_is_win": 1.0,
         "mem_reduction_vs_fp16_pct": 37.0, "dppl_pct": 20.0, "dppl_pct_ci_low": 17.0, "dppl_pct_ci_high": 27.0,
         "energy_j_per_token": 0.0123, "usd_per_1m_tokens": 1.06, "decode_vs_floor": 4.04},  # measured energy
    ),
    (
        "m/group_wise_g32",  # the published grid: the lowest KL at 4 bits, and left out of the best picks
        {"method": "group_wise", "family": "granularity", "bits": "4", "granularity": "group",
         "kernels": "aten_int4_groupwise", "on_published_grid": "true"},
        {"method.bits": "4", "method.granularity": "group", "method.group_size": "32"},
        {"ppl": 20.02, "kl_vs_ref": 0.0003, "bits_per_weight": 4.5, "weight_mb": 165.0,
         "mem_reduction_vs_fp16_pct": 36.0, "dppl_pct": 0.1, "dppl_pct_ci_low": 0.0, "dppl_pct_ci_high": 0.2},
    ),
    (
        "m/w2_group",  # profiling off: no speed numbers; another commit than the others
        {"method": "w2_group", "family": "algorithm", "bits": "2", "granularity": "group", "kernels": "dequant"},
        {"method.bits": "2", "method.granularity": "group", "method.group_size": "32", "method.symmetric": "True",
         "method.symmetric_range": "restricted", "git.commit": "b" * 40},
        {"ppl": 280.0, "kl_vs_ref": 2.7, "bits_per_weight": 2.57, "weight_mb": 141.0,
         "mem_reduction_vs_fp16_pct": 45.0},
    ),
]  # fmt: skip


def _log(name: str, tags: dict, params: dict, metrics: dict, **kwargs):
    with mlflow.start_run(run_name=name, tags=tags, **kwargs) as run:
        mlflow.log_params({"eval.tokens": "4096", "eval.context": "512", **PROVENANCE, **params})
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
    # 'mixed': the same method on two protocols (another number of evaluation tokens).
    mlflow.set_experiment(experiment_id=tracking.setup({"uri": uri, "experiment": "mixed"}))
    for name, tokens in (("m/fp", "4096"), ("m/gptq", "2048")):
        with mlflow.start_run(run_name=name, tags={"method": name.removeprefix("m/")}):
            mlflow.log_params({**PROVENANCE, "eval.tokens": tokens})
            mlflow.log_metrics({"ppl": 20.0, "ppl_ref": 20.0, "kl_vs_ref": 0.1, "bits_per_weight": 4.3})

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
        [
            "report.experiment=fake",
            f"tracking.uri={store['uri']}",
            f"report.out={out}",
            f"tune.storage={store['storage']}",
        ]
    )
    return out


def test_load_runs_keeps_latest_finished_and_parents_only(store):
    mlflow.set_tracking_uri(store["uri"])
    runs = report.load_runs("fake")
    names = sorted(runs["tags.mlflow.runName"])
    assert names == [
        "m/fp", "m/gptq", "m/group_wise", "m/group_wise_g32", "m/per_tensor", "m/ptq_static", "m/w2_group",
        "m/weight_only",
    ]  # fmt: skip
    gptq = runs[runs["tags.method"] == "gptq"].iloc[0]
    assert gptq["metrics.kl_vs_ref"] == 0.2  # the latest run of that name, not the older one
    parent = runs[runs["tags.method"] == "ptq_static"].iloc[0]
    assert parent["run_id"] == store["parent"] and parent["metrics.ppl"] == 31.0  # means fill the plain metric


def _row(text: str, start: str) -> dict[str, str]:
    """The cells of the markdown row that starts with ``start``, by column header."""
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| method |"))
    row = next(line for line in lines if line.startswith(start))
    split = lambda line: [c.strip() for c in line.strip().strip("|").split(" | ")]  # noqa: E731
    return dict(zip(split(header), split(row)))


def test_method_table_rows_and_missing_cells(store):
    mlflow.set_tracking_uri(store["uri"])
    runs = report.load_runs("fake")
    table = report.method_table(runs)
    assert table["method"].tolist()[0] == "fp" and len(table) == 8
    rows = table.set_index("method")
    assert rows.loc["weight_only", "acc drop %"] == 1.0 and rows.loc["weight_only", "acc drop % lo"] == -2.0
    assert rows.loc["gptq", "Δppl %"] == 20.0 and rows.loc["gptq", "Δppl % hi"] == 27.0
    assert rows.loc["ptq_static", "Δppl %"] == pytest.approx(55.0)  # from ppl/ppl_ref: no dppl_pct logged
    assert rows.loc["ptq_static", "stability (std)"] == 1.414
    assert rows.loc["gptq", "tuned settings"] == "study gptq_w4: method.gptq.damp=0.05"
    assert rows.loc["w2_group", "mem -% layers"] == pytest.approx(100 * (1 - 2.57 / 16))
    text = report.methods_markdown("fake", runs)
    assert not re.search(r"\bnan\b", text) and "0.900" in text

    w2 = _row(text, "| w2_group")
    assert w2["speed-up [95% CI]"] == "-" and w2["gen match"] == "-" and w2["setting"] == "2-bit sym[-1,1] g32"
    assert "≠ git.commit" in w2["notes"]  # another commit than the majority
    assert _row(text, "| per_tensor")["setting"] == "8-bit sym[-128,127] per_tensor"
    assert _row(text, "| group_wise |")["coverage %"] == "79" and w2["coverage %"] == "-"  # share bits/weight covers
    assert _row(text, "| weight_only")["setting"] == "8-bit per_channel"  # no symmetry logged: none shown
    gptq = _row(text, "| gptq")
    assert gptq["Δppl % [95% CI]"] == "+20.0 [+17.0, +27.0]" and gptq["KL [95% CI]"] == "0.2000 [0.1800, 0.2200]"
    assert gptq["≈ Δppl (same bits)"] == "group_wise (4-bit g64)"  # overlapping intervals at 4 bits
    assert gptq["speed-up [95% CI]"] == "2.00x [1.90, 2.10]" and gptq["speed noise"] == "±3.0%"
    assert gptq["notes"] == "worse than preset (kl_vs_ref 0.2 vs preset 0.15)" and gptq["algorithm"] == "gptq+rtn"
    # measured and estimated energy in their own columns, never one filling the other
    assert gptq["energy J/token (measured)"] == "0.0123" and gptq["energy J/token (est.)"] == "-"
    assert gptq["$/1M tokens"] == "1.06" and gptq["decode vs floor"] == "4.0x"
    assert gptq["exports"] == "checkpoint, compressed-tensors, gguf:Q4_1"
    assert w2["exports"] == "not recorded" and _row(text, "| fp")["exports"] == "-"  # older run / nothing quantized
    fp = _row(text, "| fp")
    assert fp["energy J/token (measured)"] == "-" and fp["energy J/token (est.)"] == "0.05"
    assert fp["speed-up [95% CI]"] == "1.00x [0.97, 1.03] ~noise"  # the reference against itself: no win
    assert _row(text, "| per_tensor")["acc drop % [95% CI]"] == "+2.0 [+0.5, +3.5] sig."
    assert _row(text, "| weight_only")["acc drop % [95% CI]"] == "+1.0 [-2.0, +4.0]"
    assert _row(text, "| group_wise |")["speed-up [95% CI]"] == "2.10x"  # an older run: no interval logged
    published = _row(text, "| group_wise †")
    assert published["notes"].startswith("† published grid") and published["≈ Δppl (same bits)"] == "-"
    assert "**git.commit differs** (rows marked ≠ in notes): " + "a" * 12 + " (6 runs), " + "b" * 12 in text
    assert "Not logged by: ptq_static (model.name, eval.context, git.commit," in text  # a parent run logs less
    assert "Provenance (8 runs): model.name tiny" in text and report.PUBLISHED_NOTE in text


def test_speed_cell_marks_what_is_not_a_win():
    assert report.speed_cell(1.02, 0.97, 1.06, 3.0, 0.0) == "1.02x [0.97, 1.06] ~noise"
    assert report.speed_cell(0.5, 0.45, 0.55, 3.0, 0.0) == "0.50x [0.45, 0.55] slower"
    assert report.speed_cell(2.0, 1.9, 2.1, 3.0, 1.0) == "2.00x [1.90, 2.10]"
    assert report.speed_cell(1.46, None, None, None, None) == "1.46x"  # an older run: no noise measured
    assert report.speed_cell(float("nan"), None, None, None, None) == "-"


def test_overlapping_intervals_within_a_group_only():
    labels = pd.Series(["a", "b", "c", "d"])
    low, high = pd.Series([1.0, 2.5, 4.0, 1.0]), pd.Series([3.0, 5.0, 6.0, 2.0])
    tied = report.overlapping(labels, low, high, pd.Series([4, 4, 4, 8]))
    assert tied.tolist() == ["b", "a, c", "b", "-"]  # d overlaps a, but at another width


def test_mixed_protocols_are_refused_unless_allowed(store, tmp_path):
    mlflow.set_tracking_uri(store["uri"])
    with pytest.raises(report.ReportError, match=r"eval.tokens: 2048 \(1 runs\), 4096 \(1: fp\).*allow_mixed=true"):
        report.write_report("mixed", tmp_path / "refused", store["storage"])
    assert not (tmp_path / "refused").exists()  # refused before anything is written
    report.write_report("mixed", tmp_path / "allowed", store["storage"], allow_mixed=True)
    assert "**Not comparable: eval.tokens differs**" in (tmp_path / "allowed" / "methods.md").read_text()


def test_precision_table_picks_best_run_per_precision(store):
    mlflow.set_tracking_uri(store["uri"])
    table = report.precision_table(report.load_runs("fake")).set_index("Precision")
    assert table.index.tolist() == ["FP", "8-bit", "4-bit", "2-bit"]
    # by accuracy drop, not KL; per_tensor's interval overlaps
    assert table.loc["8-bit", "best method"] == "weight_only (8-bit per_channel) ≈ per_tensor"
    assert table.loc["4-bit", "best method"] == "gptq (4-bit g64)"  # by KL; the published grid left out
    assert table.loc["8-bit", "Accuracy"] == "acc drop +1.0 [-2.0, +4.0]% · *Near-Perfect*"
    assert table.loc["4-bit", "Accuracy"] == "Δppl +20.0 [+17.0, +27.0]% · *Very Good*"
    assert table.loc["4-bit", "Speed"] == "2.00x [1.90, 2.10] · *Much Faster*"
    assert table.loc["4-bit", "Energy J/token (measured)"] == "0.0123" and table.loc["4-bit", "$/1M tokens"] == "1.06"
    assert table.loc["FP", "Energy J/token (est.)"] == "0.05" and table.loc["FP", "Energy J/token (measured)"] == "-"
    assert table.loc["FP", "Decode vs floor"] == "3.0x" and table.loc["2-bit", "$/1M tokens"] == "-"
    assert (
        table.loc["2-bit", "Speed"] == "- · *Fastest*" and table.loc["FP", "Stability"] == "not repeated · *Very High*"
    )
    # A precision with no run still gets its row; a repeated run shows its spread.
    runs = report.load_runs("fake")
    only_8 = report.precision_table(runs[report.nominal_bits(runs) == 8]).set_index("Precision")
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
    pngs = {"accuracy_vs_bits.png", "accuracy_vs_speed.png", "accuracy_vs_cost.png", "history_gptq_w4.png",
            "history_bits_kl.png"}  # fmt: skip
    assert names == expected | pngs  # no plot for the other experiment's study
    for name in pngs:
        assert (written / name).read_bytes()[:8] == PNG_MAGIC, name
    assert "## By setting" in (written / "comparison.md").read_text()
    precision = (written / "precision.md").read_text()
    assert "| 2-bit | w2_group (2-bit sym[-1,1] g32) |" in precision
    assert "Left out of the picks († on the published grid" in precision and "group_wise (4-bit g32)" in precision
    csv = pd.read_csv(written / "methods.csv")
    assert len(csv) == 8 and {"Δppl % lo", "Δppl % hi", "KL lo", "speed-up lo", "speed noise %"} <= set(csv.columns)
    assert {"energy J/token", "energy J/token (est.)", "$/1M tokens", "decode vs floor"} <= set(csv.columns)
    by_setting = (written / "comparison.md").read_text().split("## By setting")[1]
    assert "24.0 / +20.0 [+17.0, +27.0] / 0.200 / 4.31 ≈ group_wise" in by_setting

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
    assert list(table.columns[1:5]) == ["commonsense", "commonsense stderr", "numerical", "numerical stderr"]
    assert "hellaswag" not in table.columns
    assert [c for c in table.columns if c.startswith("ppl@")] == ["ppl@128", "ppl@1024"]
    assert table.loc["weight_only", "drop %"] == 1.0 and table.loc["weight_only", "gen match"] == 0.9
    text = (written / "suite.md").read_text()
    assert "| fp | 32.00 | 0.600 ± 0.049 | 0.400 | 0.500 ± 0.020 | +0.0 | - | 30.00 | 21.00 | 1.000 |" in text
    assert "| per_tensor | 8.00 | - | - | 0.490 | +2.0 [+0.5, +3.5] | yes |" in text
    assert "| weight_only | 8.02 | 0.590 | 0.400 | 0.495 | +1.0 [-2.0, +4.0] | no |" in text
    assert "significant: yes where that interval excludes 0" in text
    assert report.suite_table(runs.drop(columns=[c for c in runs if "acc/" in c or "ppl_ctx" in c])) is None


def test_study_plots_for_the_studies_tuned_runs_came_from(store, tmp_path):
    paths = report.plot_studies("no_such_experiment", store["storage"], tmp_path, {"other"})
    assert [p.name for p in paths] == ["history_other.png"]


def test_speed_plot_skipped_without_speed_numbers(store):
    mlflow.set_tracking_uri(store["uri"])
    runs = report.load_runs("fake")
    assert report.plot_accuracy_vs_speed(runs[runs["tags.method"] == "w2_group"]) is None
    assert report.plot_accuracy_vs_cost(runs[runs["tags.method"] == "w2_group"]) is None
    assert report.plot_accuracy_vs_bits(runs.drop(columns=["metrics.acc_drop_pct", "metrics.speedup_vs_ref"]))


def test_unknown_or_empty_experiment_is_an_error_naming_the_experiments(store, tmp_path, capsys):
    for name, message in (("nope", "no MLflow experiment 'nope'"), ("empty", "'empty' has no finished runs")):
        with pytest.raises(SystemExit) as e:
            report.main([f"report.experiment={name}", f"tracking.uri={store['uri']}", f"report.out={tmp_path}"])
        assert e.value.code == 2
        error = capsys.readouterr().err.splitlines()[0]  # one line, no traceback
        assert error.startswith("error: ") and message in error and "fake" in error and "empty" in error
    assert not list(tmp_path.iterdir())


def test_cli_takes_the_pipelines_overrides():
    # experiment=<config> reports that config's MLflow experiment; report.experiment names one directly.
    assert report.compose_config(["experiment=compare"]).report.experiment == "compare"
    assert report.compose_config(["experiment=smoke"]).report.experiment == "smoke"
    assert report.compose_config(["report.experiment=tuned"]).report.experiment == "tuned"
    cfg = report.compose_config(["tracking.uri=sqlite:////tmp/x.db", "report.out=/tmp/r"])
    assert (cfg.tracking.uri, cfg.report.out, cfg.report.allow_mixed) == ("sqlite:////tmp/x.db", "/tmp/r", False)
    tune_defaults = OmegaConf.load(REPO / "conf" / "tune.yaml")
    assert cfg.tune.storage == tune_defaults.tune.storage  # one key, one default, for both entry points
    assert report.storage_url("sqlite:///mlruns/optuna.db") == f"sqlite:///{REPO}/mlruns/optuna.db"
    assert report.storage_url("sqlite:////abs/optuna.db") == "sqlite:////abs/optuna.db"
    with pytest.raises(ValueError, match="bad override"):
        report.compose_config(["experiment=no_such_experiment"])


def test_cli_error_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        report.main(["--experiment", "compare"])  # the old argparse flags are not overrides
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: pipeline.report takes Hydra overrides") and "experiment=" in err


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
    assert "| 4-bit g64 | 25.0 / - / 0.200 / 4.31 | 30.0 / - / 0.300 / 4.31 |" in text and "fp" not in text


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


def test_cost_plot_front_is_cheaper_and_more_accurate(store):
    mlflow.set_tracking_uri(store["uri"])
    fig = report.plot_accuracy_vs_cost(report.load_runs("fake"), "fake")
    ax = fig.axes[0]
    (front,) = [line for line in ax.get_lines() if line.get_label() == "Pareto front"]
    # fp ($2.125, Δppl 0), weight_only ($1.52, 0.5%), gptq ($1.06, 20%): none dominates another
    assert sorted(front.get_xdata()) == [1.06, 1.52, 2.125]
    assert ax.get_xlabel().startswith("$ per 1M generated tokens")
