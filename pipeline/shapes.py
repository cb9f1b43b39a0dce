"""Random-init models built from a config (``model.source: config``): real shapes without the Hub.

A named shape copies the architecture of a published model (hidden size, MLP width, blocks, heads,
KV heads, vocabulary, tied embeddings); ``model.config`` overrides or replaces its fields. Weights
are drawn from ``model.init_seed`` directly in the target dtype (a 3B model in bf16 never holds an fp32
copy). The numbers such a model gives are meaningless; its memory and time are real.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel

# Llama 3.x architectures as published (config.json); rope scaling is left out (it changes no memory or time).
_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 131072}
SHAPES: dict[str, dict] = {
    "llama-3.2-1b": {
        **_LLAMA3,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
    },
    "llama-3.2-3b": {
        **_LLAMA3,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
    },
    "llama-3.1-8b": {
        **_LLAMA3,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },
}


def config_fields(cfg: Mapping) -> dict:
    """The architecture ``model.shape`` and ``model.config`` describe (the config's fields win)."""
    shape, overrides = cfg.get("shape"), dict(cfg.get("config") or {})
    if shape is None and not overrides:
        raise ValueError(f"model.source=config needs model.shape ({', '.join(SHAPES)}) or model.config (fields)")
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"unknown model.shape {shape!r}; known: {', '.join(SHAPES)} (or null with model.config)")
    fields = {**(SHAPES[shape] if shape else {}), **overrides}
    fields.setdefault("model_type", "llama")
    return fields


def build_config(cfg: Mapping) -> PretrainedConfig:
    fields = config_fields(cfg)
    model_type = fields.pop("model_type")
    return LlamaConfig(**fields) if model_type == "llama" else AutoConfig.for_model(model_type, **fields)


def identity(cfg: Mapping) -> str:
    """What names this model in caches and logs: the architecture and the seed its weights come from."""
    key = json.dumps({"config": config_fields(cfg), "init_seed": int(cfg["init_seed"])}, sort_keys=True)
    return (
        f"config:{cfg.get('shape') or 'custom'}:seed={cfg['init_seed']}:{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    )


def build_model(cfg: Mapping, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """The random-init model, its weights drawn from ``init_seed`` in ``dtype`` on ``device``."""
    torch.manual_seed(int(cfg["init_seed"]))
    with torch.device(device):
        return AutoModelForCausalLM.from_config(build_config(cfg), dtype=dtype).eval()
