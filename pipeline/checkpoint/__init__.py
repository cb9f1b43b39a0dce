"""Quantized checkpoints: save, reload bit-identically, and the content hash of the weights."""

from pipeline.checkpoint.atomic import NotEnoughDisk, atomic_dir, check_free_space, check_target
from pipeline.checkpoint.codecs import register
from pipeline.checkpoint.store import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    Loaded,
    checkpoint_bytes,
    load_checkpoint,
    model_sha256,
    model_tensors,
    read_manifest,
    save_checkpoint,
    weights_sha256,
)

__all__ = [
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "Loaded",
    "NotEnoughDisk",
    "atomic_dir",
    "check_free_space",
    "check_target",
    "checkpoint_bytes",
    "load_checkpoint",
    "model_sha256",
    "model_tensors",
    "read_manifest",
    "register",
    "save_checkpoint",
    "weights_sha256",
]
