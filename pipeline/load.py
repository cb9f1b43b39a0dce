"""Load stage: a pretrained causal LM and its tokenizer, from safetensors only."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.assets import embedded_model_dir
from pipeline.device import DTYPES, resolve_device, resolve_dtype

log = logging.getLogger(__name__)


def resolve_model_path(cfg: Mapping) -> str:
    """Local folder or Hub id of the model that ``cfg`` names, checked before any work."""
    if cfg["source"] == "embedded":
        return str(embedded_model_dir())
    if cfg["source"] != "pretrained":
        raise ValueError(f"model.source must be 'embedded' or 'pretrained', got {cfg['source']!r}")
    path = cfg.get("path")
    if not path:
        raise ValueError("model.path is required for a pretrained model: a local folder or a Hub id")
    path = str(path)
    looks_local = path.startswith((".", "/", "~")) or Path(path).expanduser().exists()
    if looks_local and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"model.path {path!r} is not a folder")
    return str(Path(path).expanduser()) if looks_local else path


def load_model(cfg: Mapping, device: torch.device | str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model in ``cfg["dtype"]`` on ``device`` (either may be ``auto``: pipeline/device.py), and its tokenizer."""
    device = resolve_device(str(device))
    dtype = DTYPES[resolve_dtype(cfg["dtype"], device)]
    path = resolve_model_path(cfg)
    trust = bool(cfg.get("trust_remote_code", False))
    # use_safetensors=True: never unpickle a model file (a .bin checkpoint is refused).
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=trust).to(
        device
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    model.eval()
    log.info("loaded %s (%s, %.1fM parameters)", path, type(model).__name__, model.num_parameters() / 1e6)
    return model, tokenizer
