"""Exports on a tiny model: compressed-tensors loaded by transformers, GGUF read back by gguf's reader,
and ``python -m pipeline.export``'s checks on runs in a throwaway MLflow store."""

import shutil
import subprocess
import sys

import mlflow
import pytest
import torch
from conftest import CONF, compose_cfg, tiny_llama
from omegaconf import OmegaConf
from test_checkpoint import quantized_tiny

from pipeline import checkpoint, export, shipping, tracking
from pipeline.export import __main__ as cli
from pipeline.export import compressed_tensors, gguf_file, verify

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml") if p.stem != "fp")
# what each preset can be written to, exactly; AWQ keeps explicit input scales on o_proj and
# down_proj (their scales do not fold into the layer before), which neither format carries
EXPECTED = {
    "activation_aware": "checkpoint",
    "asymmetric": "checkpoint,compressed-tensors,gguf:Q4_1",
    "gptq": "checkpoint,compressed-tensors,gguf:Q4_1",
    "group_wise": "checkpoint,compressed-tensors,gguf:Q4_1",
    "lowrank_w4": "checkpoint",
    "per_channel": "checkpoint,compressed-tensors,gguf:Q4_0",
    "per_tensor": "checkpoint,compressed-tensors,gguf:Q8_0",
    "ptq_dynamic": "checkpoint,compressed-tensors",
    "ptq_static": "checkpoint,compressed-tensors",
    "qat": "checkpoint,compressed-tensors,gguf:Q4_1",
    "smoothquant_dynamic": "checkpoint,compressed-tensors",
    "smoothquant_static": "checkpoint,compressed-tensors",
    "symmetric": "checkpoint,compressed-tensors,gguf:Q4_0",
    "w2_group": "checkpoint",
    "w2_reconstruct": "checkpoint",
    "w2_qat": "checkpoint",
    "w2_efficientqat": "checkpoint",
    "mixed_w3": "checkpoint",
    "w3_group": "checkpoint",
    "weight_only": "checkpoint,compressed-tensors,gguf:Q8_0",
}


@pytest.mark.parametrize("method", METHODS)
def test_each_preset_says_what_it_can_be_exported_to(method):
    model, _ = quantized_tiny(method)
    tags = export.tags(export.of_model(model))
    assert tags["exports"] == EXPECTED[method]
    if method == "activation_aware":
        assert "4 of 14 layers (e.g. model.layers.0.self_attn.o_proj: an explicit (unfolded)" in tags["exports_refused"]
    if "compressed-tensors" not in tags["exports"]:
        assert "it holds: weight-only int4/int8" in tags["exports_refused"]
    if "gguf" not in tags["exports"]:
        assert "closest GGML type" in tags["exports_refused"] and "would re-quantize" in tags["exports_refused"]


@pytest.mark.parametrize("method", ["group_wise", "symmetric", "per_tensor", "ptq_dynamic", "ptq_static", "gptq"])
def test_compressed_tensors_loads_in_transformers_with_our_logits(method, tmp_path):
    model, _ = quantized_tiny(method)
    compressed_tensors.write(model, export.of_model(model), tmp_path)
    check = verify.compressed_tensors_logits(tmp_path, model)  # raises unless equal to our float path
    # transformers + compressed-tensors compute our float path's arithmetic exactly; our own int
    # kernels (bf16 activations for int4/int8 weight-only) differ in the last bits
    assert check["max_abs_diff_vs_float_path"] == 0.0
    assert check["max_abs_diff_vs_as_run"] < 0.01 * check["max_abs_logit"]


def test_compressed_tensors_refuses_what_does_not_map_with_what_does(tmp_path):
    model, _ = quantized_tiny("w2_group")
    with pytest.raises(ValueError, match=r"cannot hold 14 of 14 layers .*2-bit weights\); it holds: weight-only"):
        compressed_tensors.write(model, export.of_model(model), tmp_path)
    model, _ = quantized_tiny("group_wise", "method.zero_point_domain=float")
    with pytest.raises(ValueError, match="a float zero point"):
        compressed_tensors.write(model, export.of_model(model), tmp_path)


@pytest.mark.parametrize(("method", "kind"), [("weight_only", "Q8_0"), ("symmetric", "Q4_0"), ("group_wise", "Q4_1")])
def test_gguf_reads_back_to_our_weights(method, kind, tmp_path):
    import gguf

    model, _ = quantized_tiny(method)
    layers = export.of_model(model)
    written = gguf_file.write(model, layers, tmp_path / "m.gguf")
    # kept layers are written as stored: the embedding in layers.keep_dtype (bfloat16)
    assert written["blk.0.attn_q.weight"] == kind and written["token_embd.weight"] == "BF16"
    assert "output.weight" not in written  # tied: llama.cpp reuses token_embd
    worst = gguf_file.read_back(tmp_path / "m.gguf", model, layers)
    assert worst["BF16"] == 0.0
    # Q8_0 and Q4_0 are the same products as ours; Q4_1's offset m = -z*scale is rounded to fp16
    assert (worst[kind] == 0.0) == (kind != "Q4_1")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert int(reader.fields["llama.block_count"].parts[-1][0]) == 2


def test_gguf_permutes_q_and_k_rows_as_llama_cpp_does(tmp_path):
    import gguf
    import numpy as np

    model, _ = quantized_tiny("weight_only")
    gguf_file.write(model, export.of_model(model), tmp_path / "m.gguf")
    tensor = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}["blk.0.attn_k.weight"]
    read = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))
    ours = model.model.layers[0].self_attn.k_proj.dequantized_weight()
    heads, half = 2, ours.shape[0] // 2 // 2  # 2 kv heads of 16 rows: rotary halves interleaved
    expected = ours.reshape(heads, 2, half, -1).transpose(1, 2).reshape(ours.shape)
    assert torch.equal(read.reshape(ours.shape), expected) and not torch.equal(read.reshape(ours.shape), ours)


# -- python -m pipeline.export on a throwaway store -----------------------------------------------
@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny Llama with the embedded model's tokenizer, saved as a pretrained folder (model=hf)."""
    from pipeline.assets import embedded_model_dir

    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama(vocab_size=49152).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(embedded_model_dir() / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory, base_model):
    """Runs as the pipeline leaves them: finished with and without a checkpoint, failed, refused."""
    from pipeline.export.source import rebuild

    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    experiment = tracking.setup({"uri": uri, "experiment": "export"})
    runs = {}

    def make(key, method, status="FINISHED", log_model=False, tags=None, metrics=None, overrides=()):
        cfg = compose_cfg(
            "model=hf", f"model.path={base_model}", f"method={method}", "data.calibration.num_samples=2", *overrides
        )
        container = OmegaConf.to_container(cfg, resolve=True)
        model, model_path = rebuild(container)
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            mlflow.set_tags({shipping.HASH_TAG: checkpoint.model_sha256(model), **export.tags(export.of_model(model))})
            mlflow.log_metrics({"checkpoint_mb": checkpoint.checkpoint_bytes(model) / 2**20, **(metrics or {})})
            mlflow.set_tags(tags or {})
            if log_model:
                info = shipping.checkpoint_info(container, model_path, run.info.run_id)
                shipping.log_checkpoint(model, info, run.info.run_id, {"register_model": None}, {})
        if status != "FINISHED":
            mlflow.MlflowClient().set_terminated(run.info.run_id, status)
        runs[key] = run.info.run_id
        return model

    runs["model"] = make("logged", "symmetric", log_model=True)
    make("rebuild", "symmetric")
    make("changed", "symmetric", tags={shipping.HASH_TAG: "0" * 64})
    make("failed", "symmetric", status="FAILED")
    make("two_bit", "w2_group")
    make("huge", "symmetric", metrics={"checkpoint_mb": 1e12})
    # methods that calibrate or train: a rebuild must land on the same weights
    make("gptq", "gptq")
    make("ptq_static", "ptq_static")
    make("qat", "qat", overrides=["method.train.steps=2", "method.train.batch_size=1"])
    return uri, runs


def _export(store, key, fmt, out):
    uri, runs = store
    return cli.export_run(runs[key], fmt, out, uri)


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_export_from_a_logged_checkpoint(store, fmt, tmp_path):
    summary = _export(store, "logged", fmt, tmp_path / "out")
    assert summary["source"].startswith("logged checkpoint m-")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {
        "checkpoint": {"model.safetensors", "quantbench.json"},
        "compressed-tensors": {"config.json", "tokenizer.json"},
    }.get(fmt, {"model.gguf"}) <= files
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    if fmt == "checkpoint":
        loaded = checkpoint.load_checkpoint(tmp_path / "out")
        ids = verify.probe_ids(49152)
        with torch.no_grad():
            assert torch.equal(loaded.model(input_ids=ids).logits, store[1]["model"](input_ids=ids).logits)
        assert loaded.manifest["run_id"] == store[1]["logged"]


def test_export_rebuilds_a_run_without_a_checkpoint_and_checks_its_hash(store, tmp_path):
    summary = _export(store, "rebuild", "gguf", tmp_path / "out")
    assert summary["source"] == "rebuilt from the logged config"
    assert summary["weights_sha256"] == checkpoint.model_sha256(store[1]["model"])
    with pytest.raises(ValueError, match="gave different weights .* code or data changed"):
        _export(store, "changed", "checkpoint", tmp_path / "changed")
    assert not (tmp_path / "changed").exists()


@pytest.mark.parametrize(
    ("key", "fmt"), [("gptq", "gguf"), ("ptq_static", "compressed-tensors"), ("qat", "checkpoint")]
)
def test_rebuilding_a_calibrated_or_trained_run_reproduces_its_hash(store, key, fmt, tmp_path):
    summary = _export(store, key, fmt, tmp_path / "out")  # raises if the rebuilt hash differs
    assert summary["source"] == "rebuilt from the logged config"
    assert summary["weights_sha256"] == mlflow.get_run(store[1][key]).data.tags[shipping.HASH_TAG]


@pytest.mark.parametrize(
    ("key", "fmt", "message"),
    [
        ("failed", "checkpoint", "ended FAILED: only a finished run"),
        ("two_bit", "gguf", "int2 asym .*closest GGML type Q2_K, which would re-quantize"),
        ("two_bit", "compressed-tensors", "2-bit weights.*it holds: weight-only int4/int8"),
        ("logged", "onnx", "unknown --format 'onnx'; formats: checkpoint, compressed-tensors, gguf"),
        ("huge", "checkpoint", "not enough disk for .* needs about"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(store, key, fmt, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        _export(store, key, fmt, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_output_folder_is_refused(store, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists and is not an empty folder"):
        _export(store, "logged", "checkpoint", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_an_unknown_run_is_one_error_line(store, tmp_path):
    uri, _ = store
    cmd = [
        sys.executable,
        "-m",
        "pipeline.export",
        "--run-id",
        "0" * 32,
        "--tracking-uri",
        uri,
        "--out",
        str(tmp_path / "o"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and f"error: no run '{'0' * 32}' in the MLflow store" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o").exists()
