"""Load stage: a pretrained causal LM and its tokenizer, from safetensors only."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline import shapes
from pipeline.assets import embedded_model_dir
from pipeline.device import DTYPES, resolve_device, resolve_dtype

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


def weight_bytes_estimate(cfg: Mapping, device: torch.device | str = "cpu") -> int:
    """Bytes the weights take in the dtype they load in, from the model's config alone (built on the meta
    device: no weights read), tied tensors once. An estimate of the least a run needs: activations,
    caches and the quantized copy come on top."""
    dtype = DTYPES[resolve_dtype(cfg["dtype"], torch.device(device))]
    if cfg["source"] == "config":
        config = shapes.build_config(cfg)
    else:
        trust = bool(cfg.get("trust_remote_code", False))
        config = AutoConfig.from_pretrained(resolve_model_path(cfg), trust_remote_code=trust)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() yields a tied one once


def available_bytes(device: torch.device | str) -> int:
    """Memory free for a new model on ``device``: the GPU's free memory, or the CPU's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def check_fits(cfg: Mapping, device: torch.device | str) -> None:
    """Refuse, before loading, a model whose weights alone exceed the memory free on ``device``."""
    needed, free = weight_bytes_estimate(cfg, device), available_bytes(device)
    if needed <= free:
        return
    dtype = resolve_dtype(cfg["dtype"], torch.device(device))
    way_out = (
        "use model.dtype=bfloat16 (half the bytes)" if dtype == "float32" else "use a smaller model or a larger machine"
    )
    raise ValueError(
        f"model {cfg.get('name', '')} needs {needed / 2**30:.1f} GiB for its {dtype} weights alone (estimated from "
        f"its config), more than the {free / 2**30:.1f} GiB free on {device}: {way_out}"
    )


def load_model(cfg: Mapping, device: torch.device | str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model in ``cfg["dtype"]`` on ``device`` (either may be ``auto``: pipeline/device.py), and its tokenizer."""
    device = resolve_device(str(device))
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
