"""The grid a model's weights were published on, and whether a method's setting sits on it.

A checkpoint distributed quantized (the embedded SmolLM2 came as a Q4_1 GGUF: 4-bit, asymmetric,
blocks of 32, float zero point) and converted back to float lies exactly on that grid: quantizing it
again with the same grid reproduces the checkpoint (KL ~0.0003 on the embedded model), which says
nothing about the method. ``model.published_grid`` declares that grid (null: published in float);
tuning never runs a setting on it and every run on it is tagged ``on_published_grid=true``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)

# The settings that define a grid; a published_grid names any of them (all must match).
GRID_KEYS = ("bits", "symmetric", "granularity", "group_size", "zero_point_domain")


def check_grid(grid: Mapping | None) -> None:
    """A published grid is null or a non-empty mapping of ``GRID_KEYS``."""
    if grid is None:
        return
    if not isinstance(grid, Mapping) or not grid:
        raise ValueError(f"model.published_grid must be null or a mapping of {', '.join(GRID_KEYS)}, got {grid!r}")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise ValueError(f"model.published_grid has unknown key(s) {unknown}; allowed: {', '.join(GRID_KEYS)}")


def _setting_on_grid(setting: Mapping, grid: Mapping) -> bool:
    return all(setting.get(key) == value for key, value in grid.items())


def on_published_grid(method: Mapping, model_cfg: Mapping, layer_weights: Mapping[str, int] | None = None) -> bool:
    """Whether ``method`` quantizes the bulk of the selected layers on the model's published grid.

    Without ``layer_overrides`` that is the method's own setting. With them, each selected layer
    counts with the setting that applies to it (first matching override), weighted by its number of
    weights: on the grid if more than half of the selected weights are. ``layer_weights`` (selected
    layer name -> weight count) is needed only then (see ``selected_layer_weights``).
    """
    grid = model_cfg.get("published_grid")
    check_grid(grid)
    from pipeline.steps import quantizes  # it imports torch modules this module need not load early

    if not grid or not quantizes(method):
        return False
    if not method.get("layer_overrides"):
        return _setting_on_grid(method, grid)
    if layer_weights is None:
        raise ValueError("method.layer_overrides: whether the method sits on the published grid needs the layer names")
    from pipeline.quantize import layer_method  # quantize imports torch modules this module need not load early

    total = sum(layer_weights.values())
    on = sum(n for name, n in layer_weights.items() if _setting_on_grid(layer_method(method, name), grid))
    return total > 0 and on > total / 2


@functools.lru_cache(maxsize=8)
def _selected_layer_weights(model_path: str, trust_remote_code: bool, layers_json: str) -> dict[str, int]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.layers import float_weight, select_layers

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):  # shapes only: no weights are read or allocated
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    selected, _ = select_layers(model, json.loads(layers_json))
    return {name: float_weight(module).numel() for name, module in selected.items()}


def selected_layer_weights(model_cfg: Mapping, layers_cfg: Mapping, model_path: str) -> dict[str, int]:
    """Selected layer name -> weight count, from the model's config alone (built on the meta device)."""
    trust = bool(model_cfg.get("trust_remote_code", False))
    return _selected_layer_weights(model_path, trust, json.dumps(dict(layers_cfg), sort_keys=True))


def config_on_published_grid(container: Mapping, model_path: str) -> bool:
    """``on_published_grid`` for a resolved run config; builds the layer list only when overrides need it."""
    method, model_cfg = container["method"], container["model"]
    needs_layers = bool(model_cfg.get("published_grid")) and bool(method.get("layer_overrides"))
    weights = selected_layer_weights(model_cfg, container["layers"], model_path) if needs_layers else None
    return on_published_grid(method, model_cfg, weights)


def describe(model_cfg: Mapping) -> str:
    """The published grid in words, for messages."""
    grid = model_cfg.get("published_grid") or {}
    return ", ".join(f"{key}={grid[key]}" for key in GRID_KEYS if key in grid)
