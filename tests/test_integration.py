"""End to end: `python -m pipeline experiment=smoke` on the embedded model, read back from MLflow."""

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # the embedded model end to end, minutes on 2 cores
CONTRACT_METRICS = [
    "ppl",
    "ppl_ref",
    "kl_vs_ref",
    "top1_agree",
    "bits_per_weight",
    "weight_bytes",
    "compression_ratio",
    "peak_rss_mb",
    "prefill_ms",
    "decode_tok_s",
    "speedup_vs_ref",
    "quantize_s",
    "gen_match_rate",
    "gen_first_divergence",
    "gen_repetition_rate",
]


def _pipeline(store: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "experiment=smoke",
        f"tracking.uri=sqlite:///{store}/mlflow.db",
        f"hydra.run.dir={store}/outputs",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = tmp_path_factory.mktemp("mlruns")
    done = _pipeline(store)
    assert done.returncode == 0, done.stderr[-3000:]
    failed = _pipeline(store, "method.group_size=100")
    assert failed.returncode == 2 and "error: group_size 100 does not divide" in failed.stderr
    assert "Traceback" not in failed.stderr
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    return store


def _runs():
    experiment = mlflow.get_experiment_by_name("smoke")
    return mlflow.search_runs([experiment.experiment_id], output_format="list")


def test_smoke_run_logs_the_contract(store):
    (run,) = [r for r in _runs() if r.info.status == "FINISHED"]
    for name in CONTRACT_METRICS:
        assert name in run.data.metrics, name
    m = run.data.metrics
    assert 4 < m["bits_per_weight"] < 4.5 and m["compression_ratio"] > 1
    assert m["ppl"] > m["ppl_ref"] > 1 and m["kl_vs_ref"] > 0 and 0 < m["top1_agree"] < 1
    p = run.data.params
    assert p["seed"] == "0" and p["method.name"] == "group_wise" and p["eval.add_special_tokens"] == "False"
    assert len(p["git.commit"]) in (40, 7) or p["git.commit"] == "unknown"
    assert p["pkg.torch"].startswith("2.") and "host.processor" in p
    kernels = set(run.data.tags["kernels"].split(","))  # every layer on a real kernel, ours where built
    assert (
        "dequant" not in kernels
        and kernels & {"lowbit_cpu", "aten_int4_groupwise"}
        and "Q4_1" in run.data.tags["caveat"]
    )
    assert run.data.tags["on_published_grid"] == "false"  # group 64, integer zero point: off the Q4_1 grid
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"config.yaml", "layers.json", "__main__.log", "generations.json"} <= artifacts
    assert 0 <= m["gen_match_rate"] <= 1 and 0 <= m["gen_first_divergence"] <= 8
    samples = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/generations.json")
    assert len(samples) == 4 and {"prompt", "reference", "output", "first_divergence"} <= set(samples[0])
    layers = mlflow.MlflowClient().load_table(run.info.experiment_id, "layers.json", run_ids=[run.info.run_id])
    assert (layers["quantized"].sum(), len(layers)) == (210, 212)  # lm_head and the embedding kept


def test_failed_run_is_marked_failed_and_keeps_what_it_logged(store):
    (run,) = [r for r in _runs() if r.info.status == "FAILED"]
    assert run.data.params["method.group_size"] == "100"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert "__main__.log" in artifacts


def test_same_config_same_numbers(store):
    again = _pipeline(store, "profile.enabled=false")
    assert again.returncode == 0, again.stderr[-3000:]
    finished = sorted((r for r in _runs() if r.info.status == "FINISHED"), key=lambda r: r.info.start_time)
    first, second = finished[0].data.metrics, finished[-1].data.metrics
    for name in ("ppl", "kl_vs_ref", "top1_agree", "weight_bytes"):
        assert first[name] == second[name], name


def test_report_from_the_store(store, tmp_path):
    from pipeline import report

    written = report.write_report("smoke", tmp_path, storage=f"sqlite:///{tmp_path}/no-optuna.db")
    text = (tmp_path / "comparison.md").read_text()
    assert "| group_wise |" in text and "Caveat:" in text and (tmp_path / "comparison.csv").exists()
    assert "| group_wise |" in (tmp_path / "methods.md").read_text()
    assert {"precision.md", "accuracy_vs_bits.png", "accuracy_vs_speed.png"} <= {p.name for p in written}


def test_repeats_over_seeds_log_mean_std_and_same_seed_spread(store):
    done = _pipeline(
        store,
        "method=ptq_static",
        "repeat_seeds=[0,1]",
        "profile.enabled=false",
        "eval.tasks.names=[]",
        "eval.context_lengths=[]",
        "tracking.experiment=smoke_repeats",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    experiment = mlflow.get_experiment_by_name("smoke_repeats")
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    parent = next(r for r in runs if "repeats" in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in runs)
    m = parent.data.metrics
    assert m["ppl_std"] > 0  # calibration data follows the seed
    assert m["ppl_same_seed_spread"] == 0 and m["kl_vs_ref_same_seed_spread"] == 0
    assert min(c.data.metrics["ppl"] for c in children) <= m["ppl_mean"] <= max(c.data.metrics["ppl"] for c in children)


def test_tune_on_the_smoke_experiment(store):
    cmd = [
        sys.executable,
        "-m",
        "pipeline.tune",
        "experiment=smoke",
        "tune.n_trials=2",
        "profile.enabled=false",
        f"tracking.uri=sqlite:///{store}/mlflow.db",
        f"tune.storage=sqlite:///{store}/optuna.db",
        f"tune.best_dir={store}/tuned",
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    experiment = mlflow.get_experiment_by_name("tune")  # the study's runs stay out of smoke's report
    trials = [
        r for r in mlflow.search_runs([experiment.experiment_id], output_format="list") if "tune.trial" in r.data.tags
    ]
    assert trials and all(r.data.params["eval.tokens"] == "512" for r in trials)  # smoke's protocol
    (tuned,) = (store / "tuned").glob("*.yaml")
    assert "- /experiment/smoke" in tuned.read_text() and "tuned_vs_preset:" in tuned.read_text()
