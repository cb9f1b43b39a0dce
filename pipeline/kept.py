"""Kept layers as a user ships them: every floating parameter a method does not quantize, stored 16-bit.

``store_kept`` casts the parameters of every module other than QuantLinear / QuantEmbedding
(norm weights, biases of kept layers, an unquantized embedding or lm_head, excluded layers, a vision
tower) to ``layers.keep_dtype``, tied tensors once, while activations keep flowing in the dtype the
model was loaded in:

- RMSNorm modules (class name ending in ``RMSNorm``) normalize in float32 themselves and multiply by
  the weight (HF's Llama/Qwen/Mistral: ``weight * h.to(input_dtype)``, which promotes a bf16 weight
  times an fp32 hidden state to fp32; Gemma: ``h * (1 + weight.float())``), so they take the
  activation as it comes; their output is cast back to the activation dtype should a variant return
  the weight's dtype.
- a kept ``nn.Linear`` (an unquantized lm_head, an excluded layer) reads its 16-bit weight with
  our ``half_linear`` C++ kernel for up to ``LOW_PRECISION_MATMUL_ROWS`` rows (decode): each weight
  is widened to fp32 in registers, so a step reads 2 bytes per weight and accumulates in fp32 (the
  lm_head, one thread, quiet: see ``half_linear_kernel``). For more rows (prefill, perplexity
  windows) it upcasts the weight for the call and runs torch's fp32 GEMM. Why not torch's bf16
  matmul: on a CPU without native bf16 (AVX512-BF16/AMX) it is far slower than fp32 (measured here,
  one thread, 49152x576 lm_head: 1 row 46 ms bf16 vs 70 ms fp32; 64 rows 2.7 s vs 0.7 s; 256 rows
  11 s vs 1.4 s). Where ``half_linear`` is not built, up to 16 rows multiply in ``keep_dtype``
  (torch), and the layer table says so. All paths read the same stored 16-bit weight.
- every other kept module (an embedding, a LayerNorm, a vision tower's convolution) runs in
  ``keep_dtype``: floating positional inputs are cast to it and floating outputs back to the
  activation dtype (an embedding looks its rows up in 16 bits and returns them in the activation dtype).
"""

from __future__ import annotations

import types
from collections import Counter
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from pipeline.layers import embedding_modules
from pipeline.quant.embedding import QuantEmbedding
from pipeline.quant.kernels import cpp
from pipeline.quant.linear import QuantLinear

HALF_DTYPES = (torch.bfloat16, torch.float16)
KEEP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANTIZED_TYPES = (QuantLinear, QuantEmbedding)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: as loaded, even where ``store_kept`` stored parameters narrower
    (``model.dtype`` reads the first parameter's, e.g. a 16-bit embedding's)."""
    kept = getattr(model, "quantbench_kept", None)
    return KEEP_DTYPES[kept["activation_dtype"]] if kept else model.dtype


def keep_dtype(name: str) -> torch.dtype:
    """The torch dtype that ``layers.keep_dtype`` names; a clear error for anything else."""
    if name not in KEEP_DTYPES:
        raise ValueError(f"layers.keep_dtype must be one of {', '.join(KEEP_DTYPES)}, got {name!r}")
    return KEEP_DTYPES[name]


def _floating_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.is_floating_point()]


def kept_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every module that directly holds floating parameters a method did not quantize."""
    for name, module in model.named_modules():
        if not isinstance(module, QUANTIZED_TYPES) and _floating_params(module):
            yield name, module


LOW_PRECISION_MATMUL_ROWS = 16


def half_linear_kernel(weight: torch.Tensor, activation_dtype: torch.dtype) -> str:
    """What a kept linear layer with this weight computes decode rows with (the layer table's kernel)."""
    built = cpp.build("half_linear")
    if built.ok and weight.device.type == "cpu" and weight.dtype in HALF_DTYPES and activation_dtype == torch.float32:
        return "half_linear"
    return f"{str(weight.dtype).removeprefix('torch.')} F.linear"


def _kept_linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` on a 16-bit stored weight with activations in another dtype (module docstring)."""
    weight, bias = module.weight, module.bias
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows <= LOW_PRECISION_MATMUL_ROWS and module.kernel == "half_linear":
        y = module.half_linear_op(x.reshape(rows, -1).float().contiguous(), weight)
        y = y.view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias.to(y.dtype)
    dtype = weight.dtype if rows <= LOW_PRECISION_MATMUL_ROWS else x.dtype
    y = F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return y.to(x.dtype)


def _self_upcasting(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


def _cast_floating(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floating(v, dtype) for v in value)
    return value


def store_kept(model: nn.Module, dtype: torch.dtype, activation_dtype: torch.dtype) -> None:
    """Store every kept floating parameter of ``model`` in ``dtype`` (in place), activations unchanged.

    Nothing happens when ``dtype`` is the activation dtype (``layers.keep_dtype: float32`` on a model
    loaded in float32).
    """
    if dtype == activation_dtype:
        return
    # what a checkpoint records, so that a reloaded model computes its kept layers the same way
    model.quantbench_kept = {"dtype": _dtype_name(dtype), "activation_dtype": _dtype_name(activation_dtype)}
    cast: set[int] = set()
    for _, module in list(kept_modules(model)):
        for p in _floating_params(module):
            if id(p) not in cast:  # a tied parameter is one object: cast it once
                p.data = p.data.to(dtype)
                cast.add(id(p))
        if type(module) is nn.Linear:
            module.kernel = half_linear_kernel(module.weight, activation_dtype)
            # looked up once: the op itself is what torch.compile traces (through its fake)
            module.half_linear_op = cpp.op("half_linear", "linear") if module.kernel == "half_linear" else None
            module.forward = types.MethodType(_kept_linear_forward, module)
            continue
        if not _self_upcasting(module):
            module.register_forward_pre_hook(lambda _m, args: _cast_floating(args, dtype))
        module.register_forward_hook(lambda _m, _args, out: _cast_floating(out, activation_dtype))


# -- what was kept, in words -------------------------------------------------------------------
def _kind(module: nn.Module) -> str:
    if "Norm" in type(module).__name__:
        return "norms"
    if isinstance(module, (nn.Linear, Conv1D)):
        return "linear layers"
    return type(module).__name__


def _stored_form(module: nn.Module) -> str:
    if isinstance(module, QUANTIZED_TYPES):
        return f"{module.grid} block {module.block_size}"
    return str(module.weight.dtype).removeprefix("torch.")


def describe_kept(model: nn.Module) -> str:
    """How the embeddings are stored and what else stays unquantized by the method, in which dtype, e.g.
    ``embed_tokens+lm_head (tied) bfloat16; 5 norms bfloat16``."""
    embeddings = embedding_modules(model)
    embed, head = embeddings.input, embeddings.output
    short = {id(m): n.rpartition(".")[2] for n, m in model.named_modules()}
    if embeddings.tied:
        parts = [f"{short[id(embed)]}+{short[id(head)]} (tied) {_stored_form(embed)}"]
    else:
        parts = [f"{short[id(m)]} {_stored_form(m)}" for m in embeddings.modules()]
    counts = Counter(
        (_kind(m), str(_floating_params(m)[0].dtype).removeprefix("torch."))
        for _, m in kept_modules(model)
        if m is not embed and m is not head
    )
    parts += [f"{n} {kind} {dtype}" for (kind, dtype), n in sorted(counts.items())]
    return "; ".join(parts)
