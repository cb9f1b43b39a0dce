"""The quantized layers an exporter sees: each module's manifest entry and the names of its tensors.

The same view comes from a model in memory (a run tags what it can be exported to) and from a
checkpoint's manifest (``pipeline.export`` checks before it writes), so both take one code path.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pipeline.checkpoint.store import module_entries


@dataclass(frozen=True)
class Layer:
    name: str
    entry: dict  # the module's manifest entry (pipeline.checkpoint.codecs)
    tensors: frozenset[str]  # its own tensor names: packed, scale, zero_point, lowrank_a, ...

    @property
    def bits(self) -> int:
        return int(self.entry["spec"]["bits"])

    @property
    def symmetric(self) -> bool:
        return bool(self.entry["spec"]["symmetric"])

    def describe(self) -> str:
        spec = self.entry["spec"]
        kind = "sym" if spec["symmetric"] else f"asym {spec['zero_point_domain']}-zero"
        return f"int{spec['bits']} {kind} block {tuple(self.entry['block_size'])}"


def of_model(model: nn.Module) -> list[Layer]:
    entries = module_entries(model)
    return [
        Layer(name, entry, frozenset(model.get_submodule(name).state_dict().keys())) for name, entry in entries.items()
    ]


def of_manifest(manifest: dict) -> list[Layer]:
    layers = []
    for name, entry in manifest["modules"].items():
        prefix = f"{name}."
        own = frozenset(k.removeprefix(prefix) for k in manifest["tensors"] if k.startswith(prefix))
        layers.append(Layer(name, entry, own))
    return layers
