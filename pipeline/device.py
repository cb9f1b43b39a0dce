"""Where the model computes (``device``) and in which dtype it is loaded (``model.dtype``).

Both are resolved once, before any expensive stage, and written back into the config, so every
stage, the logged params, the reference cache key and a checkpoint's manifest see the concrete
values (``cuda:0``, ``bfloat16``), never ``auto``. A device this machine lacks, or a dtype the device
cannot run, is an error that names the way out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from omegaconf import DictConfig, open_dict

ALLOWED_DEVICES = "auto, cpu, cuda, cuda:N"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# model.dtype=auto: bf16 on CUDA (the dtype 1B-8B models ship in; half fp32's memory). The CPU stays
# fp32: our reference numbers are fp32, and a bf16 GEMM without AMX measured 4-8x slower than fp32.
AUTO_DTYPE = {"cuda": "bfloat16", "cpu": "float32"}


def resolve_device(name: str) -> torch.device:
    """``auto`` (cuda if torch sees a GPU, else cpu), ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine."""
    name = str(name).strip()
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"device must be one of {ALLOWED_DEVICES}, got {name!r}")
    if not torch.cuda.is_available():
        build = f"this torch ({torch.__version__}) has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"device={name} but {build}: use device=cpu (or device=auto)")
    index = int(name[5:]) if ":" in name else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ValueError(f"device={name} but this machine has {torch.cuda.device_count()} GPU(s): use cuda:0..")
    return torch.device("cuda", index)


def resolve_dtype(name: str, device: torch.device) -> str:
    """The dtype name ``model.dtype`` asks for on ``device`` (``auto``: see AUTO_DTYPE), checked it can run there."""
    name = str(name)
    if name == "auto":
        return AUTO_DTYPE[device.type]
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of auto, {', '.join(DTYPES)}, got {name!r}")
    if device.type == "cuda" and name == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"model.dtype=bfloat16 but {torch.cuda.get_device_name(device)} has no bf16: use model.dtype=float16"
        )
    return name


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module computes: the device of its first parameter (or buffer); cpu if it has none.

    Stages move their inputs (tokens, calibration batches) here, at the point of use."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def resolve(cfg: DictConfig) -> torch.device:
    """Resolve ``cfg.device`` and ``cfg.model.dtype`` in place (idempotent); returns the device."""
    device = resolve_device(cfg.get("device", "auto"))
    dtype = resolve_dtype(cfg.model.dtype, device)
    with open_dict(cfg):
        cfg.device = str(device)
        cfg.model.dtype = dtype
    return device


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
