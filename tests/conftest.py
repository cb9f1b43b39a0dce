"""Shared fixtures: configs composed the way users compose them, and tiny models built from configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from services import postgres, private_postgres  # noqa: F401 (fixtures for every test module)

CONF = Path(__file__).resolve().parent.parent / "conf"


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def method_cfg(name: str, *overrides: str) -> dict:
    cfg = compose_cfg(f"method={name}", *overrides)
    return OmegaConf.to_container(cfg.method, resolve=True)


def layers_cfg(*overrides: str) -> dict:
    return OmegaConf.to_container(compose_cfg(*overrides).layers, resolve=True)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from pipeline.assets import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


def tiny_llama(vocab_size: int = 512, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def llama():
    return tiny_llama()
