"""Save -> reload on the embedded model (SmolLM2-135M) for a few presets: bit-identical logits."""

import pytest
import torch
from conftest import compose_cfg
from omegaconf import OmegaConf

from pipeline import checkpoint, run
from pipeline.load import load_model

pytestmark = pytest.mark.slow  # ~30-60 s per preset on 2 loaded cores (load, quantize, save 160-230 MB, reload)


@pytest.mark.parametrize("method", ["symmetric", "weight_only", "ptq_dynamic"])
def test_embedded_model_reloads_bit_identically(method, tmp_path):
    container = OmegaConf.to_container(compose_cfg(f"method={method}"), resolve=True)
    model, tokenizer = load_model(container["model"])
    run.quantize_stage(model, container, lambda: None, 0, "auto", lambda _: None)
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    manifest = checkpoint.save_checkpoint(model, tmp_path / "ckpt", {"base_model": container["model"], "run_id": None})
    loaded = checkpoint.load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        after = loaded.model(input_ids=ids).logits
    assert torch.equal(before, after) and loaded.kernel_changes == []
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"} and len(manifest["modules"]) == 210
