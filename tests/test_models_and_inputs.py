"""Architectures, loading from a local folder, data sources, and bad input."""

import pytest
import torch
from conftest import compose_cfg, layers_cfg, method_cfg
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from pipeline import data, quantize, run, tracking
from pipeline.load import load_model
from pipeline.quant.linear import QuantLinear

SMALL = {"vocab_size": 256}
LLAMA_LIKE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    **SMALL,
}
ARCHITECTURES = {
    "gpt2": (GPT2LMHeadModel, GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **SMALL), 8),
    "opt": (
        OPTForCausalLM,
        OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=64,
            **SMALL,
        ),
        12,
    ),
    "gpt_neox": (
        GPTNeoXForCausalLM,
        GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            **SMALL,
        ),
        8,
    ),
    "mistral": (
        MistralForCausalLM,
        MistralConfig(**LLAMA_LIKE),
        14,
    ),
    "qwen2": (
        Qwen2ForCausalLM,
        Qwen2Config(**LLAMA_LIKE),
        14,
    ),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architectures_quantize_every_decoder_linear(arch):
    cls, config, n_linear = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = cls(config).eval()
    ids = torch.randint(0, 256, (1, 12))
    before = model(input_ids=ids).logits
    records = quantize.quantize_model(model, method_cfg("weight_only"), layers_cfg())
    assert sum(r.quantized for r in records) == n_linear
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == n_linear
    after = model(input_ids=ids).logits
    # int8 per-channel: the quantized model computes nearly the same function (GPT-2's Conv1D too)
    assert (after - before).norm() / before.norm() < 0.02


def test_gpt2_conv1d_weights_are_transposed_not_skipped():
    cls, config, _ = ARCHITECTURES["gpt2"]
    model = cls(config).eval()
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D: weight (in=64, out=256)
    records = {r.layer: r for r in quantize.quantize_model(model, method_cfg("weight_only"), layers_cfg())}
    assert records["transformer.h.0.mlp.c_fc"].shape == "(256, 64)"
    q = model.transformer.h[0].mlp.c_fc
    assert torch.allclose(q.dequantized_weight(), conv.weight.t(), atol=conv.weight.abs().max().item() / 100)


def test_local_folder_loads_through_from_pretrained(tmp_path, tokenizer):
    from conftest import tiny_llama

    model = tiny_llama(vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    cfg = compose_cfg("model=hf", f"model.path={tmp_path / 'm'}")
    loaded, tok = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    assert cfg.model.name == str(tmp_path / "m")
    assert type(loaded).__name__ == "LlamaForCausalLM" and len(tok) == len(tokenizer)
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


def test_pickle_checkpoints_are_refused(tmp_path):
    from conftest import tiny_llama

    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    cfg = compose_cfg("model=hf", f"model.path={tmp_path}")
    with pytest.raises(OSError, match="safetensors"):
        load_model(OmegaConf.to_container(cfg.model, resolve=True))


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        run.resolve_model_path({"source": "pretrained", "path": str(tmp_path / "absent")})
    with pytest.raises(ValueError, match="model.path is required"):
        run.resolve_model_path({"source": "pretrained", "path": None})


def test_hf_dataset_corpus_from_a_local_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["first document", "", "second document"]}).save_to_disk(tmp_path / "saved")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "test.json").write_text('{"body": "a line"}\n{"body": "another"}\n')
    corpora = {
        "saved": {"kind": "hf_dataset", "path": str(tmp_path / "saved")},
        "raw": {"kind": "hf_dataset", "path": str(tmp_path / "raw"), "split": "test", "text_field": "body"},
    }
    assert data.load_corpus("saved", corpora) == ["first document", "second document"]
    assert data.load_corpus("raw", corpora) == ["a line", "another"]
    with pytest.raises(ValueError, match="no column 'text'"):
        data.load_corpus("raw", {"raw": {**corpora["raw"], "text_field": "text"}})
    with pytest.raises(ValueError, match="configured corpora: raw, saved"):
        data.load_corpus("wikitext", corpora)


def test_builtin_corpora_split_disjointly():
    docs = data.load_corpus("wikipedia", {"wikipedia": {"kind": "builtin"}})
    calib, evaluation = data.split_half(docs, "calibration"), data.split_half(docs, "evaluation")
    assert len(docs) > 2000 and not set(calib) & set(evaluation) and len(calib) + len(evaluation) == len(docs)


def test_calibration_batches_are_seeded(tokenizer):
    cfg = OmegaConf.to_container(
        compose_cfg("data.calibration.num_samples=3", "data.calibration.seq_len=16").data, resolve=True
    )
    a, b = data.calibration_batches(tokenizer, cfg), data.calibration_batches(tokenizer, cfg)
    assert a.shape == (3, 16) and torch.equal(a, b)
    cfg["calibration"]["seed"] = 1
    assert not torch.equal(a, data.calibration_batches(tokenizer, cfg))


def test_a_run_calibrating_on_the_evaluation_corpus_says_so(tokenizer, monkeypatch):
    tags = {}
    monkeypatch.setattr(run.mlflow, "set_tag", tags.__setitem__)
    monkeypatch.setattr(run.tracking, "log_dataset", lambda *_args: None)
    overrides = ("data.calibration.num_samples=2", "data.calibration.seq_len=16")
    cfg = OmegaConf.to_container(compose_cfg(*overrides).data, resolve=True)
    run._calibration_batches(tokenizer, cfg)
    assert "calibration" not in tags  # fiction calibrates, wikipedia evaluates: different corpora
    cfg = OmegaConf.to_container(compose_cfg(*overrides, "data.calibration.corpus=wikipedia").data, resolve=True)
    run._calibration_batches(tokenizer, cfg)
    assert tags["calibration"] == "on the evaluation corpus wikipedia (disjoint documents)"


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(MissingConfigException) as e:
        compose_cfg("method=int3_magic")
    assert "group_wise" in str(e.value) and "ptq_static" in str(e.value)


def test_unknown_config_key_is_refused():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="grup_size"):
        compose_cfg("method.grup_size=64")


@pytest.mark.parametrize(
    "override,message",
    [
        ("method.bits=9", "bits must be an integer in 2..8"),
        ("method.bits=1", "bits must be an integer in 2..8"),
        ("method.granularity=per_row", "granularity must be one of"),
        ("method.scale_dtype=float8", "scale_dtype must be one of"),
    ],
)
def test_bad_method_settings_fail_before_any_work(override, message):
    with pytest.raises(ValueError, match=message):
        run.check_method(method_cfg("group_wise", override))


def test_unknown_observer_is_refused():
    with pytest.raises(ValueError, match="allowed: minmax, percentile, mse"):
        run.check_method(method_cfg("ptq_static", "method.activations.observer=histogram"))


def test_unwritable_store_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        import os

        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        with pytest.raises(PermissionError, match="not writable"):
            tracking.setup({"uri": f"sqlite:///{locked}/mlflow.db", "experiment": "x"})
    finally:
        locked.chmod(0o700)


def test_store_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="cannot create"):
        tracking.setup({"uri": f"sqlite:///{tmp_path}/file/sub/mlflow.db", "experiment": "x"})


def test_unreachable_tracking_server_fails_fast():
    import time

    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="not usable"):
        tracking.setup({"uri": "http://127.0.0.1:9", "experiment": "x"})
    assert time.perf_counter() - start < 60


def test_experiments_override_top_level_keys():
    cfg = compose_cfg("experiment=stability")
    assert list(cfg.repeat_seeds) == [0, 1, 2] and cfg.tracking.experiment == "stability"
    assert list(compose_cfg("experiment=stability", "repeat_seeds=[4]").repeat_seeds) == [4]  # the command line wins
