"""A quantized model as files: ``model.safetensors`` + ``quantbench.json`` (+ the model's ``config.json``).

- ``model.safetensors``: every tensor of the model's ``state_dict`` in its own dtype (packed codes,
  scales, zero points, low-rank factors, input scales, activation qparams, kept float layers).
  Tensors that share memory (tied embeddings) are written once; the manifest lists the aliases.
- ``quantbench.json``: the format version, the base model, the method and layer config, one entry
  per registered module (``pipeline.checkpoint.codecs``), the run id, the code version and the
  content hash ``weights_sha256``.
- ``config.json``: the base model's Hugging Face config, so loading needs nothing but this folder.

No pickle anywhere: loading reads JSON and safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.checkpoint import codecs
from pipeline.checkpoint.atomic import atomic_dir
from pipeline.device import DTYPES, module_device, resolve_dtype

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE, MANIFEST_FILE, CONFIG_FILE = "model.safetensors", "quantbench.json", "config.json"


def model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to save, aliases): the ``state_dict`` with shared tensors once, ``alias -> saved name``."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()  # safetensors writes host memory
    return tensors, aliases


def weights_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted (name, dtype, shape, bytes) of the tensors: equal iff the saved weights are."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def model_sha256(model: nn.Module) -> str:
    return weights_sha256(model_tensors(model)[0])


def module_entries(model: nn.Module) -> dict[str, dict]:
    """One entry per registered module (module path -> type and its codec's fields)."""
    entries = {}
    for name, module in model.named_modules():
        kind = codecs.type_name(module)
        if kind is not None:
            entries[name] = {"type": kind, **codecs.codec(kind).to_entry(module)}
    return entries


def checkpoint_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a checkpoint of ``model`` writes (its safetensors payload)."""
    return sum(t.numel() * t.element_size() for t in model_tensors(model)[0].values())


def save_checkpoint(model: nn.Module, target: Path, info: Mapping) -> dict:
    """Write ``model`` to the folder ``target`` (which must not exist or be empty); return the manifest.

    ``info``: ``base_model`` (name, source, path, dtype, trust_remote_code), ``method``, ``layers``,
    ``run_id``, ``code`` (git commit and dirty flag), recorded as given.
    """
    if "dtype" not in info.get("base_model", {}):
        raise ValueError(
            "a checkpoint needs info['base_model'] with at least its dtype: loading builds the model from it"
        )
    # the concrete dtype the model was loaded in (a config may say auto), which loading rebuilds it in
    base = {**info["base_model"], "dtype": resolve_dtype(info["base_model"]["dtype"], module_device(model))}
    tensors, aliases = model_tensors(model)
    manifest = {
        "format": "quantbench-checkpoint",
        "format_version": FORMAT_VERSION,
        **info,
        "base_model": base,
        "modules": module_entries(model),
        "kept": getattr(model, "quantbench_kept", None),  # how layers left float are stored and computed
        "aliases": aliases,
        "tensors": {
            n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for n, t in tensors.items()
        },
        "weights_sha256": weights_sha256(tensors),
    }
    needed = sum(t.numel() * t.element_size() for t in tensors.values()) + 2**20
    with atomic_dir(Path(target), needed) as tmp:
        save_file(
            tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "weights_sha256": manifest["weights_sha256"]}
        )
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=False))
        model.config.to_json_file(str(tmp / CONFIG_FILE))
    return manifest


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a quantbench checkpoint: it has no {MANIFEST_FILE}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "quantbench-checkpoint" or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this code reads quantbench-checkpoint version {FORMAT_VERSION}"
        )
    return manifest


@dataclass
class Loaded:
    model: nn.Module
    manifest: dict
    # layers whose kernel on this machine differs from the one recorded (layer, saved, now)
    kernel_changes: list[tuple[str, str, str]]


def load_checkpoint(folder: Path, device: torch.device | str = "cpu") -> Loaded:
    """Rebuild the model on ``device``: the base architecture from ``config.json``, each registered
    module from its entry and tensors, every other tensor in its saved dtype. Strict: every saved
    tensor is used and none is missing; the content hash is checked; kernels are selected anew (for
    ``device``) and compared with the saved ones."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    folder = Path(folder)
    manifest = read_manifest(folder)
    start = time.perf_counter()
    tensors = load_file(str(folder / WEIGHTS_FILE))
    digest = weights_sha256(tensors)
    if digest != manifest["weights_sha256"]:
        raise ValueError(
            f"{folder / WEIGHTS_FILE} does not match its manifest: weights_sha256 {digest}, "
            f"manifest {manifest['weights_sha256']} (the file was changed or is incomplete)"
        )
    base = manifest["base_model"]
    trust = bool(base.get("trust_remote_code", False))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust)
    with no_init_weights():  # every weight is overwritten below: skip the random init
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[base["dtype"]], trust_remote_code=trust)
    model.eval()
    state = dict(tensors)
    for alias, saved in manifest["aliases"].items():
        state[alias] = state[saved]
    for name, entry in manifest["modules"].items():
        prefix = f"{name}."
        own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        _set_module(model, name, codecs.codec(entry["type"]).from_entry(entry, own))
    # assign=True: kept tensors keep their saved dtype (a 16-bit kept layer stays 16-bit) and
    # tied names share the one loaded tensor.
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"{folder} does not fit the model its config builds: missing {sorted(missing)[:5]}, "
            f"unused {sorted(unexpected)[:5]}"
        )
    model.to(device)  # quantized layers select their kernels again there
    if manifest.get("kept"):  # kept 16-bit layers compute as in the run (pipeline.kept), on this device
        from pipeline import kept

        kept.store_kept(model, DTYPES[manifest["kept"]["dtype"]], DTYPES[manifest["kept"]["activation_dtype"]])
    changes = []
    for name, entry in manifest["modules"].items():
        now = getattr(model.get_submodule(name), "kernel", None)
        if entry.get("kernel") is not None and now != entry["kernel"]:
            changes.append((name, entry["kernel"], now))
    if changes:
        log.warning(
            "%d layers run a different kernel than when saved (e.g. %s: %s -> %s); logits may differ in the last bits",
            len(changes),
            *changes[0],
        )
    log.info("loaded checkpoint %s in %.2f s", folder, time.perf_counter() - start)
    return Loaded(model, manifest, changes)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def with_kernel_preference(model: nn.Module, preference: str) -> nn.Module:
    """A copy of ``model`` whose registered modules select kernels with ``preference`` (e.g. ``dequant``:
    the float path other loaders take, to compare against them without our kernels' rounding)."""
    import copy

    clone = copy.deepcopy(model)
    for name, entry in module_entries(clone).items():
        if "kernel_preference" not in entry:
            continue
        module = clone.get_submodule(name)
        rebuilt = codecs.codec(entry["type"]).from_entry(
            {**entry, "kernel_preference": preference}, module.state_dict()
        )
        _set_module(clone, name, rebuilt)
    return clone
