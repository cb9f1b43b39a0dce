"""Memory that scales with one block: float weights freed as layers are quantized, models built from a
config, peak memory per stage, a model too large for the machine refused before loading."""

import gc
import weakref

import pytest
import torch
from conftest import layers_cfg, method_cfg, tiny_llama

from pipeline import quantize, shapes
from pipeline.load import load_model, resolve_model_path
from pipeline.quant.linear import QuantLinear


def _float_weight_refs(model):
    return {name: weakref.ref(module.weight) for name, module in model.named_modules() if name.endswith("_proj")}


@pytest.mark.parametrize("method", ["group_wise", "gptq"])
def test_float_weights_are_freed_once_their_layer_is_quantized(method):
    model = tiny_llama()
    refs = _float_weight_refs(model)
    calibration = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    alive_after_block0 = []

    # observe mid-run: after block 0 is quantized its float weights are gone while block 1's are alive
    original = quantize._quantize_layer

    def spy(model, name, *args, **kwargs):
        if name.startswith("model.layers.1.") and not alive_after_block0:
            gc.collect()
            alive_after_block0.extend(n for n, r in refs.items() if n.startswith("model.layers.0.") and r())
            alive_after_block0.append("checked")
        return original(model, name, *args, **kwargs)

    quantize._quantize_layer = spy
    try:
        quantize.quantize_model(model, method_cfg(method), layers_cfg(), calibration=calibration)
    finally:
        quantize._quantize_layer = original
    gc.collect()
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith("_proj"))
    assert alive_after_block0 == ["checked"]  # block 0's float weights freed before block 1 is quantized
    assert [n for n, r in refs.items() if r() is not None] == []


def test_config_source_builds_the_named_shape_in_the_target_dtype():
    cfg = {"source": "config", "shape": "llama-3.2-1b", "config": {"num_hidden_layers": 1}, "init_seed": 3}
    with torch.device("meta"):
        model = shapes.build_model(cfg, torch.bfloat16, torch.device("meta"))
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (2048, 8192, 1)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (32, 8, 128256)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the real 1B
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # the full 1B shape: 1.236B parameters (tied table once), counted on the meta device
    with torch.device("meta"):
        full = shapes.build_model({**cfg, "config": {}}, torch.bfloat16, torch.device("meta"))
    assert round(sum(p.numel() for p in full.parameters()) / 1e6) == 1236
    assert "llama-3.2-1b" in resolve_model_path(cfg) and "seed=3" in resolve_model_path(cfg)


def test_config_source_is_seeded_and_loads_with_the_embedded_tokenizer():
    tiny = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 49152,
    }
    cfg = {"source": "config", "shape": None, "config": tiny, "init_seed": 0, "dtype": "bfloat16"}
    a, tokenizer = load_model(cfg, "cpu")
    b, _ = load_model(cfg, "cpu")
    c, _ = load_model({**cfg, "init_seed": 1}, "cpu")
    assert a.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert int(ids.max()) < 49152 and a(input_ids=ids).logits.shape[-1] == 49152
    assert resolve_model_path(cfg) != resolve_model_path({**cfg, "init_seed": 1})


def test_config_source_names_what_is_wrong():
    with pytest.raises(ValueError, match="unknown model.shape 'llama-9b'.*llama-3.2-1b"):
        resolve_model_path({"source": "config", "shape": "llama-9b", "config": {}, "init_seed": 0})
    with pytest.raises(ValueError, match="needs model.shape"):
        resolve_model_path({"source": "config", "shape": None, "config": {}, "init_seed": 0})


TINY_SHAPE = (
    "model.config={hidden_size:64,intermediate_size:128,num_hidden_layers:2,num_attention_heads:4,"
    "num_key_value_heads:2,vocab_size:49152}"
)


def test_a_run_logs_peak_memory_per_stage(tmp_path):
    from conftest import compose_cfg

    from pipeline import run

    cfg = compose_cfg(
        "model=llama_3_2_1b",
        "model.shape=null",
        TINY_SHAPE,
        "method=gptq",
        "method.group_size=32",
        "data.calibration.num_samples=2",
        "data.calibration.seq_len=32",
        "eval.tokens=256",
        "eval.kl_tokens=256",
        "eval.context=128",
        "eval.stride=128",
        "eval.generation.prompts=[]",
        "profile.enabled=false",
        "tracking.log_model=false",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.experiment=peaks",
    )
    metrics = run.run(cfg)
    for stage in ("load", "reference", "calibrate", "quantize", "evaluate", "ship"):
        assert metrics[f"peak_rss_mb/{stage}"] >= metrics[f"rss_start_mb/{stage}"] > 0, stage
    assert metrics["peak_rss_mb"] == metrics["peak_rss_mb/evaluate"]  # the figure runs always logged
    assert not any(k.startswith("peak_cuda_mb/") for k in metrics)  # on the CPU


def test_peak_of_a_stage_sees_what_it_allocated():
    from pipeline import peaks

    recorded = {}
    with peaks.stage("quantize", recorded.update, "cpu"):
        block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
        del block
    assert recorded["peak_rss_mb/quantize"] - recorded["rss_start_mb/quantize"] >= 60
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        peaks.stage("train", recorded.update, "cpu").__enter__()


def test_a_model_larger_than_free_memory_is_refused_before_loading(monkeypatch, tmp_path):
    from conftest import compose_cfg

    from pipeline import load, run

    monkeypatch.setattr(load, "available_bytes", lambda device: 2**30)  # 1 GiB free
    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("loaded a model that cannot fit"))
    cfg = compose_cfg("model=llama_3_2_1b", "model.dtype=float32", f"tracking.uri=sqlite:///{tmp_path}/m.db")
    with pytest.raises(
        ValueError,
        match=r"needs 4\.6 GiB for its float32 weights alone.*1\.0 GiB free on cpu: use model\.dtype=bfloat16",
    ):
        run.run(cfg)
    cfg = compose_cfg("model=llama_3_2_1b", f"tracking.uri=sqlite:///{tmp_path}/m.db")  # bf16: 2.3 GiB
    with pytest.raises(ValueError, match="needs 2.3 GiB for its bfloat16 weights.*use a smaller model or a larger"):
        run.run(cfg)
    assert not (tmp_path / "m.db").exists()  # stopped before the MLflow store was touched


def _gptq_with_offload(offload, tmp_path, spy=None):
    model = tiny_llama()
    calibration = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    options = {"weights": offload, "folder": str(tmp_path)}
    quantize.quantize_model(model, method_cfg("gptq"), layers_cfg(), calibration=calibration, offload=options)
    return {k: v for k, v in model.state_dict().items()}


def test_offloaded_calibration_gives_bit_identical_weights_and_holds_one_float_block(tmp_path, monkeypatch):
    from pipeline.algorithms import sequential

    seen = []
    original = sequential._record

    def spy(block, local, state, hessian):  # during each block's turn: which blocks hold float weights
        model_blocks = block_list[0]
        seen.append(
            [
                any(p.device.type == "cpu" for p in b.parameters() if p.dtype == torch.float32 and p.dim() == 2)
                for b in model_blocks
            ]
        )
        return original(block, local, state, hessian)

    block_list = []
    real_blocks = sequential.decoder_blocks

    def remember(model):
        found = real_blocks(model)
        block_list[:] = [found[1]]
        return found

    monkeypatch.setattr(sequential, "decoder_blocks", remember)
    monkeypatch.setattr(sequential, "_record", spy)
    disk = _gptq_with_offload("disk", tmp_path)
    assert seen == [[True, False], [False, True]]  # block 0 quantized (no float matrix), block 1 still on disk
    assert list(tmp_path.iterdir()) == []  # the scratch folder is removed
    for offload in ("none", "cpu"):
        other = _gptq_with_offload(offload, tmp_path)
        assert other.keys() == disk.keys()
        assert all(torch.equal(other[k], disk[k]) for k in disk), offload
    with pytest.raises(ValueError, match="offload.weights must be one of none, cpu, disk, got 'ram'"):
        _gptq_with_offload("ram", tmp_path)
