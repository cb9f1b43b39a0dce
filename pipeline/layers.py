"""Layer selection: which weight matrices of a model are quantized, and why each other one stays float.

Every weight matrix of the model is listed, either selected or kept with a reason; a selection that
leaves much of the text decoder float is refused before any work, and ``coverage_metrics`` says what
share of the decoder the quantized layers cover once they are in place.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from pipeline.algorithms.sequential import text_decoder
from pipeline.quant.embedding import QuantEmbedding
from pipeline.quant.linear import QuantLinear
from pipeline.train import FakeQuantLinear

LINEAR_TYPES = (nn.Linear, Conv1D, FakeQuantLinear)  # what a QuantLinear can replace
SCOPES = ("text_decoder", "all")
KNOWING_EXCLUSION = "matched by layers.exclude"
FUSED_EXPERTS = "fused MoE experts (3-D parameter): no QuantLinear for it"
# The embeddings follow layers.embeddings, never layers.include (that way a tied table is quantized once).
INPUT_EMBEDDING = "input embedding (quantized only by layers.embeddings)"
LM_HEAD = "lm_head (quantized only by layers.embeddings)"


def _in_features(module: nn.Module) -> int:
    if isinstance(module, Conv1D):  # GPT-2 style: weight is (in, out)
        return module.weight.shape[0]
    return module.in_features


def float_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever layer type holds it."""
    w = module.weight.detach()
    return w.t().contiguous() if isinstance(module, Conv1D) else w


@torch.no_grad()
def store_float_weight(module: nn.Module, w: torch.Tensor) -> None:
    """Write a float (out, in) weight back into ``module`` in its own layout and dtype (``float_weight``'s inverse)."""
    module.weight.copy_((w.t() if isinstance(module, Conv1D) else w).to(module.weight.dtype))


@dataclass
class WeightMatrix:
    """One weight matrix of a model: a linear layer, named by its module, with shape (out, in); or
    any other floating parameter of two or more dimensions, named by the parameter."""

    name: str
    module: nn.Module
    shape: tuple[int, ...]
    tensor: torch.Tensor | None  # the float tensor; None once the layer is a QuantLinear or QuantEmbedding

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def weight_matrices(model: nn.Module) -> list[WeightMatrix]:
    """Every weight matrix of ``model`` (tied tensors appear once per module that holds them)."""
    matrices = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            matrices.append(WeightMatrix(name, module, (module.out_features, module.in_features), None))
        elif isinstance(module, QuantEmbedding):  # named as the nn.Embedding's weight it replaced
            matrices.append(WeightMatrix(f"{name}.weight", module, (module.num_embeddings, module.embedding_dim), None))
        elif isinstance(module, LINEAR_TYPES):
            matrices.append(WeightMatrix(name, module, tuple(float_weight(module).shape), module.weight))
        else:
            for param_name, p in module.named_parameters(recurse=False):
                if p.dim() >= 2 and p.is_floating_point():
                    full = f"{name}.{param_name}" if name else param_name
                    matrices.append(WeightMatrix(full, module, tuple(p.shape), p))
    return matrices


def _inside(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def storage_ptr(module: nn.Module) -> int:
    """Where a (quantized or float) weight's data lives: equal for a tied embedding and lm_head."""
    return (module.packed if isinstance(module, (QuantLinear, QuantEmbedding)) else module.weight).data_ptr()


@dataclass
class Embeddings:
    """The input embedding and the output embedding (lm_head) of a model, with their module names."""

    input: nn.Module | None
    input_name: str | None
    output: nn.Module | None
    output_name: str | None

    @property
    def tied(self) -> bool:
        """One stored table serves both (HF ties ``lm_head.weight`` to ``embed_tokens.weight``)."""
        return (
            self.input is not None and self.output is not None and storage_ptr(self.input) == storage_ptr(self.output)
        )

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.input, self.output) if m is not None]


def embedding_modules(model: nn.Module) -> Embeddings:
    """The model's input and output embeddings (HF's get_input_embeddings / get_output_embeddings)."""
    get = getattr(model, "get_input_embeddings", None)
    embed = get() if callable(get) else None
    head = _output_embeddings(model)
    names = {id(m): n for n, m in model.named_modules()}
    return Embeddings(
        embed,
        names.get(id(embed)) if embed is not None else None,
        head,
        names.get(id(head)) if head is not None else None,
    )


def _is_embedding(matrix: WeightMatrix, lm_head: nn.Module | None) -> bool:
    """Input or output embeddings: kept on purpose, so outside the coverage check."""
    return isinstance(matrix.module, (nn.Embedding, QuantEmbedding)) or (
        lm_head is not None and matrix.module is lm_head
    )


def _not_linear_reason(matrix: WeightMatrix) -> str:
    if len(matrix.shape) == 3 and "expert" in f"{matrix.name} {type(matrix.module).__name__}".lower():
        return FUSED_EXPERTS
    return (
        f"{len(matrix.shape)}-D parameter of {type(matrix.module).__name__}, not a linear layer: no QuantLinear for it"
    )


def select_layers(
    model: nn.Module, cfg: Mapping, *, check_coverage: bool = True
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Linear layers to quantize, and why each other weight matrix stays float (name -> reason).

    Every weight matrix of the model is in one of the two (see ``weight_matrices``). With
    ``check_coverage``, a selection that would leave more than ``layers.max_unquantized_share`` of
    the text decoder's weights (embeddings and lm_head aside) float, other than by ``layers.exclude``,
    is refused before any work.
    """
    if cfg["scope"] not in SCOPES:
        raise ValueError(f"layers.scope must be one of {', '.join(SCOPES)}, got {cfg['scope']!r}")
    include = [re.compile(p) for p in cfg["include"]]
    exclude = [re.compile(p) for p in cfg["exclude"]]
    embeddings = embedding_modules(model)
    lm_head = embeddings.output
    decoder_name, _ = text_decoder(model)
    matrices = weight_matrices(model)
    selected, kept = {}, {}
    for matrix in matrices:
        name, module = matrix.name, matrix.module
        excluded = any(p.fullmatch(name) for p in exclude)
        if module is lm_head:
            kept[name] = LM_HEAD
        elif module is embeddings.input:
            kept[name] = INPUT_EMBEDDING
        elif cfg["scope"] == "text_decoder" and not _inside(name, decoder_name):
            vision = re.search(r"vision|visual|image", name, re.IGNORECASE)
            kept[name] = "vision tower (outside the text decoder)" if vision else "outside the text decoder"
        elif isinstance(module, nn.Embedding):
            kept[name] = "embedding"
        elif not isinstance(module, LINEAR_TYPES):
            why = _not_linear_reason(matrix)
            kept[name] = f"{KNOWING_EXCLUSION} ({why})" if excluded else why
        elif excluded:  # before include: an explicit exclusion is the knowing reason
            kept[name] = KNOWING_EXCLUSION
        elif not any(p.fullmatch(name) for p in include):
            kept[name] = "not matched by layers.include"
        else:
            selected[name] = module
    if not selected:
        linear = [m.name for m in matrices if isinstance(m.module, LINEAR_TYPES)]
        raise ValueError(
            f"no layer matches layers.include={list(cfg['include'])}; linear layers of this model "
            f"are named like: {', '.join(linear[:5])}"
        )
    if check_coverage:
        _check_coverage(matrices, kept, decoder_name, lm_head, float(cfg["max_unquantized_share"]))
    return selected, kept


def _exclude_pattern(name: str) -> str:
    """A regex for ``name`` in every block: dots escaped, layer indices generalized to ``\\d+``."""
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))


def _check_coverage(
    matrices: list[WeightMatrix], kept: Mapping[str, str], decoder_name: str, lm_head: nn.Module | None, limit: float
) -> None:
    body = [m for m in matrices if _inside(m.name, decoder_name) and not _is_embedding(m, lm_head)]
    left_out = [m for m in body if m.name in kept and not kept[m.name].startswith(KNOWING_EXCLUSION)]
    total, unquantized = sum(m.numel for m in body), sum(m.numel for m in left_out)
    if not total or unquantized / total <= limit:
        return
    examples = "; ".join(f"{m.name} {m.shape}: {kept[m.name]}" for m in left_out[:3])
    patterns = ", ".join(f"'{p}'" for p in dict.fromkeys(_exclude_pattern(m.name) for m in left_out))
    raise ValueError(
        f"{unquantized / total:.0%} of the text decoder's weights (embeddings and lm_head aside; {unquantized:,} of "
        f"{total:,}) would stay unquantized, more than layers.max_unquantized_share={limit}: {len(left_out)} "
        f"matrices, e.g. {examples}. Linear layers can be added with layers.include; parameters without a "
        f"QuantLinear (e.g. fused MoE experts) cannot be quantized here. To run anyway, exclude them knowingly "
        f"(they are then listed as excluded and the figures say what share they cover): "
        f"layers.exclude=[{patterns}]"
    )


def coverage_metrics(model: nn.Module) -> dict[str, float]:
    """What share of the text decoder's weights the quantized layers (and so bits_per_weight) cover.

    ``quantized_weight_share`` counts every weight matrix of the text decoder, embeddings and
    lm_head included (tied tensors once); ``..._excl_embeddings`` leaves those out, as the check does.
    """
    decoder_name, _ = text_decoder(model)
    lm_head = _output_embeddings(model)
    seen: set[int] = set()
    total = quantized = body_total = body_quantized = 0
    for m in weight_matrices(model):
        if not (_inside(m.name, decoder_name) or (lm_head is not None and m.module is lm_head)):
            continue
        is_quantized = isinstance(m.module, (QuantLinear, QuantEmbedding))
        storage = m.module.packed if is_quantized else m.tensor
        if storage.data_ptr() in seen:  # a tied table, float or quantized, counts once
            continue
        seen.add(storage.data_ptr())
        total += m.numel
        quantized += m.numel * is_quantized
        if not _is_embedding(m, lm_head):
            body_total += m.numel
            body_quantized += m.numel * is_quantized
    return {
        "quantized_weight_share": quantized / total if total else 0.0,
        "quantized_weight_share_excl_embeddings": body_quantized / body_total if body_total else 0.0,
        "unquantized_decoder_params": float(total - quantized),
    }


# -- group sizes that fit the selected layers ---------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(8, n + 1) if n % d == 0]


def check_group_size(method: Mapping, layers: Mapping[str, nn.Module]) -> None:
    """Fail before any work if the group size does not divide some selected layer's inputs."""
    if method["granularity"] != "group":
        return
    group_size = method["group_size"]
    in_features = {name: _in_features(m) for name, m in layers.items()}
    bad = {name: k for name, k in in_features.items() if group_size is None or k % group_size}
    if bad:
        name, k = next(iter(bad.items()))
        raise ValueError(
            f"group_size {group_size} does not divide in_features {k} of layer {name} "
            f"({len(bad)} layers affected); group sizes that fit every selected layer: "
            f"{', '.join(map(str, valid_group_sizes(layers)))}"
        )


def valid_group_sizes(layers: Mapping[str, nn.Module]) -> list[int]:
    """Group sizes that divide the inputs of every layer in ``layers``."""
    return _divisors(math.gcd(*(_in_features(m) for m in layers.values())))
