"""Save -> reload of quantized checkpoints (pipeline.checkpoint): bit-identical logits, strict loading."""

import json
import time

import pytest
import torch
from conftest import CONF, compose_cfg, tiny_llama
from omegaconf import OmegaConf

from pipeline import checkpoint, run
from pipeline.checkpoint import atomic
from pipeline.quant.linear import QuantLinear

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml") if p.stem != "fp")
IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(7))
INFO = {"base_model": {"name": "tiny", "source": "test", "path": "", "dtype": "float32"}, "run_id": None}


def quantized_tiny(method: str, *overrides: str):
    """A tiny Llama quantized by a method preset through the run's own quantize stage."""
    container = OmegaConf.to_container(compose_cfg(f"method={method}", *overrides), resolve=True)
    if container["method"].get("train"):
        container["method"]["train"]["steps"] = 2
    model = tiny_llama()
    batches = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(4))
    run.quantize_stage(model, container, lambda: batches, 0, "auto", lambda _: None, log_step=lambda *_: None)
    return model, container


@pytest.mark.parametrize("method", METHODS)
def test_every_preset_reloads_with_bit_identical_logits(method, tmp_path):
    model, _ = quantized_tiny(method)
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    manifest = checkpoint.save_checkpoint(model, tmp_path / "ckpt", INFO)
    loaded = checkpoint.load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        after = loaded.model(input_ids=IDS).logits
    assert torch.equal(before, after), method
    assert loaded.kernel_changes == []
    assert checkpoint.model_sha256(loaded.model) == manifest["weights_sha256"] == checkpoint.model_sha256(model)
    layers = {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == set(manifest["modules"]) and len(layers) == 14
    # tied embeddings are written once and stay tied
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("method", ["group_wise", "w2_group"])
def test_quantized_embeddings_reload_tied_and_bit_identical(method, tmp_path):
    embeddings = "layers.embeddings={bits: 8, symmetric: true, granularity: per_channel}"
    model, _ = quantized_tiny(method, embeddings)
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    manifest = checkpoint.save_checkpoint(model, tmp_path / "ckpt", INFO)
    assert manifest["modules"]["model.embed_tokens"]["type"] == "QuantEmbedding"
    assert manifest["kept"] == {"dtype": "bfloat16", "activation_dtype": "float32"}
    loaded = checkpoint.load_checkpoint(tmp_path / "ckpt").model
    with torch.no_grad():
        assert torch.equal(before, loaded(input_ids=IDS).logits)
    assert loaded.model.embed_tokens.packed.data_ptr() == loaded.lm_head.packed.data_ptr()  # one table


def test_manifest_says_what_the_tensors_do_not(tmp_path):
    model, container = quantized_tiny("ptq_static")
    info = {**INFO, "method": container["method"], "code": {"git_commit": "abc", "git_dirty": False}}
    checkpoint.save_checkpoint(model, tmp_path / "ckpt", info)
    manifest = json.loads((tmp_path / "ckpt" / checkpoint.MANIFEST_FILE).read_text())
    entry = manifest["modules"]["model.layers.0.self_attn.q_proj"]
    assert entry["type"] == "QuantLinear" and entry["spec"]["bits"] == 8 and entry["block_size"] == [1, 64]
    assert entry["activation"] == {
        "spec": {
            "bits": 8,
            "symmetric": True,
            "zero_point_domain": "int",
            "scale_dtype": "float32",
            "symmetric_range": "full",
        },
        "mode": "static",
    }
    assert entry["kernel"] == model.model.layers[0].self_attn.q_proj.kernel
    assert manifest["method"]["name"] == "ptq_static" and manifest["code"]["git_commit"] == "abc"
    assert manifest["tensors"]["model.layers.0.self_attn.q_proj.packed"]["dtype"] == "uint8"


def test_kept_16_bit_tensors_keep_their_dtype(tmp_path):
    model, _ = quantized_tiny("group_wise")
    model.model.norm.weight.data = model.model.norm.weight.data.to(torch.bfloat16)
    checkpoint.save_checkpoint(model, tmp_path / "ckpt", INFO)
    loaded = checkpoint.load_checkpoint(tmp_path / "ckpt").model
    assert loaded.model.norm.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight)


def test_hash_changes_with_any_weight_and_is_cheap():
    model, _ = quantized_tiny("symmetric")
    digest = checkpoint.model_sha256(model)
    assert digest == checkpoint.model_sha256(model)
    model.model.layers[1].mlp.down_proj.scale[0, 0] *= 2
    assert checkpoint.model_sha256(model) != digest
    big = {"w": torch.zeros(64, 2**20, dtype=torch.uint8)}  # 64 MiB
    start = time.perf_counter()
    checkpoint.weights_sha256(big)
    assert time.perf_counter() - start < 2.0


def test_a_changed_file_is_refused(tmp_path):
    model, _ = quantized_tiny("weight_only")
    checkpoint.save_checkpoint(model, tmp_path / "ckpt", INFO)
    path = tmp_path / "ckpt" / checkpoint.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["weights_sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not match its manifest"):
        checkpoint.load_checkpoint(tmp_path / "ckpt")


def test_a_missing_or_extra_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = quantized_tiny("weight_only")
    checkpoint.save_checkpoint(model, tmp_path / "ckpt", INFO)
    weights = tmp_path / "ckpt" / checkpoint.WEIGHTS_FILE
    tensors = load_file(str(weights))
    del tensors["model.norm.weight"]
    tensors["model.extra"] = torch.zeros(3)
    save_file(tensors, str(weights))
    path = tmp_path / "ckpt" / checkpoint.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["weights_sha256"] = checkpoint.weights_sha256(tensors)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\], unused \['model.extra'\]"):
        checkpoint.load_checkpoint(tmp_path / "ckpt")


def test_a_non_empty_target_is_refused_and_a_failed_write_leaves_nothing(tmp_path):
    model, _ = quantized_tiny("weight_only")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        checkpoint.save_checkpoint(model, tmp_path / "full", INFO)
    with pytest.raises(RuntimeError, match="boom"), atomic.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "half").write_text("written")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_not_enough_disk_is_refused_before_writing(tmp_path):
    with pytest.raises(checkpoint.NotEnoughDisk, match="needs about .* MiB free"):
        checkpoint.check_free_space(tmp_path / "out", 2**62)
    assert not (tmp_path / "out").exists()
