"""Load stage: a pretrained causal LM and its tokenizer, from safetensors only."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline import shapes
from pipeline.assets import embedded_model_dir
from pipeline.device import DTYPES, resolve_dtype

log = logging.getLogger(__name__)


def resolve_model_path(cfg: Mapping) -> str:
    """Local folder or Hub id of the model that ``cfg`` names, checked before any work.

    A model built from a config (``model.source: config``) has no folder: its identity (shape, seed)
    stands in, so caches and logs tell such models apart."""
    if cfg["source"] == "embedded":
        return str(embedded_model_dir())
    if cfg["source"] == "config":
        return shapes.identity(cfg)
    if cfg["source"] != "pretrained":
        raise ValueError(f"model.source must be 'embedded', 'pretrained' or 'config', got {cfg['source']!r}")
    path = cfg.get("path")
    if not path:
        raise ValueError("model.path is required for a pretrained model: a local folder or a Hub id")
    path = str(path)
    looks_local = path.startswith((".", "/", "~")) or Path(path).expanduser().exists()
    if looks_local and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"model.path {path!r} is not a folder")
    return str(Path(path).expanduser()) if looks_local else path


def load_model(cfg: Mapping, device: torch.device | str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model in ``cfg["dtype"]`` (``auto`` resolved for ``device``) on ``device``, and its tokenizer."""
    device = torch.device(device)
    dtype = DTYPES[resolve_dtype(cfg["dtype"], device)]
    path = resolve_model_path(cfg)
    trust = bool(cfg.get("trust_remote_code", False))
    if cfg["source"] == "config":
        model = shapes.build_model(cfg, dtype, device)
        # The embedded SmolLM2 tokenizer: its ids (< 49152) are valid in any vocabulary at least that large.
        tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    else:
        # use_safetensors=True: never unpickle a model file (a .bin checkpoint is refused).
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust
        ).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    model.eval()
    log.info("loaded %s (%s, %.1fM parameters)", path, type(model).__name__, model.num_parameters() / 1e6)
    return model, tokenizer
