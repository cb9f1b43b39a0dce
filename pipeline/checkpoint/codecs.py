"""How each stored module type goes into a checkpoint and comes back: a small (to_entry, from_entry) pair.

``to_entry(module)`` returns what the module's tensors do not say (grid, block, shapes, kernel) as
JSON-ready data; ``from_entry(entry, tensors)`` rebuilds the module from that entry and its own
``state_dict`` tensors. A new module type (e.g. a quantized embedding) registers its pair here;
the checkpoint code never looks inside a module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.quant.embedding import QuantEmbedding
from pipeline.quant.linear import QuantLinear


@dataclass(frozen=True)
class ModuleCodec:
    cls: type[nn.Module]
    to_entry: Callable[[nn.Module], dict]
    from_entry: Callable[[dict, dict[str, torch.Tensor]], nn.Module]


CODECS: dict[str, ModuleCodec] = {}


def register(name: str, cls: type[nn.Module], to_entry: Callable, from_entry: Callable) -> None:
    """Make ``cls`` (matched by exact type) serializable under the manifest type ``name``."""
    if name in CODECS and CODECS[name].cls is not cls:
        raise ValueError(f"module type {name!r} is already registered for {CODECS[name].cls.__name__}")
    CODECS[name] = ModuleCodec(cls, to_entry, from_entry)


def type_name(module: nn.Module) -> str | None:
    """The manifest type of a registered module, None for anything else (kept as plain tensors)."""
    for name, codec in CODECS.items():
        if type(module) is codec.cls:
            return name
    return None


def codec(name: str) -> ModuleCodec:
    if name not in CODECS:
        raise ValueError(f"the checkpoint holds a module of type {name!r}; this code knows {', '.join(CODECS)}")
    return CODECS[name]


register("QuantLinear", QuantLinear, QuantLinear.manifest_entry, QuantLinear.from_entry)
register("QuantEmbedding", QuantEmbedding, QuantEmbedding.manifest_entry, QuantEmbedding.from_entry)
