"""Block-by-block calibration: the loop GPTQ and AWQ run in.

The calibration batches are run up to the first decoder block; then, for each block in turn, the
block's inputs are fed through it while hooks record what every selected linear layer sees, the
caller quantizes that block, and the *quantized* block's outputs become the next block's inputs.
Later blocks thus calibrate against the errors of earlier ones, as in the GPTQ and AWQ papers.

Only one block boundary's activations are held at a time. With ``offload`` (``offload.weights``) the
blocks not being calibrated wait off the compute device, like llm-compressor's sequential onloading:
``cpu`` keeps them in CPU RAM and moves each block to the compute device for its turn; ``disk``
writes each float block to a safetensors file and frees it, reading it back for its turn. A block
stays where it is once quantized (quantized, it is the model being built).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.algorithms.gptq import HessianAccumulator
from pipeline.device import module_device
from pipeline.progress import progress


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


@dataclass
class LayerInputs:
    """What one linear layer saw during a block's calibration pass."""

    rows: int = 0
    hessian: HessianAccumulator | None = None  # over all rows, if asked for
    abs_sum: torch.Tensor | None = None  # sum of |x| per input channel
    producer: str | None = None  # the norm layer in the block whose output this layer reads, if any
    input_multiplier: torch.Tensor | None = None  # set when the layer's input is rescaled after recording

    @property
    def channel_abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)


def text_decoder(model: nn.Module) -> tuple[str, nn.Module]:
    """The text decoder and its path in ``model``: a causal LM's base model, a VLM's language model.

    transformers' ``get_decoder`` knows both layouts (``model.model``, ``model.model.language_model``);
    a module without it is its own decoder.
    """
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else model
    for name, module in model.named_modules():
        if module is decoder:
            return name, module
    raise ValueError(f"{type(model).__name__}.get_decoder() returned a module that is not part of the model")


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The text decoder's list of blocks: its longest ModuleList of identical-type modules.

    Searched inside the text decoder only: a VLM's vision tower may have more blocks than it.
    """
    decoder_name, decoder = text_decoder(model)
    best = None
    for name, module in decoder.named_modules():
        uniform = isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1
        if uniform and (best is None or len(module) > len(best[1])):
            best = (".".join(part for part in (decoder_name, name) if part), module)
    if best is None:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__} (no ModuleList of blocks)")
    return best


@torch.no_grad()
def _first_block_inputs(model: nn.Module, block: nn.Module, batches: torch.Tensor, batch_size: int) -> list:
    captured = []

    def hook(_module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), {k: v for k, v in kwargs.items()}))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, batches.shape[0], batch_size):
            with contextlib.suppress(_StopForward):
                model(input_ids=batches[start : start + batch_size].to(module_device(model)), use_cache=False)
    finally:
        handle.remove()
    return captured


OFFLOADS = ("none", "cpu", "disk")


def check_offload(cfg: Mapping) -> str:
    """``offload.weights``, checked before any work."""
    weights = cfg["weights"]
    if weights not in OFFLOADS:
        raise ValueError(f"offload.weights must be one of {', '.join(OFFLOADS)}, got {weights!r}")
    return weights


class _Onloader:
    """Where the blocks wait (``offload``) and how one is brought to ``device`` for its turn."""

    def __init__(self, blocks: nn.ModuleList, offload: str, device: torch.device, folder: Path | None) -> None:
        self.offload, self.device, self.folder = offload, device, folder
        for index, block in enumerate(blocks):
            if offload == "cpu":
                block.to("cpu")
            elif offload == "disk":
                if any(name not in block.state_dict() for name, _ in block.named_buffers()):
                    raise ValueError(
                        f"{type(block).__name__} has non-persistent buffers: offload.weights=disk cannot restore them"
                    )
                save_file({k: v.contiguous() for k, v in block.state_dict().items()}, self._file(index))
                block.to("meta")  # frees the float weights; their values are in the file

    def _file(self, index: int) -> str:
        return str(self.folder / f"block_{index}.safetensors")

    def onload(self, index: int, block: nn.Module) -> None:
        if self.offload == "disk":
            block.to_empty(device=self.device)
            block.load_state_dict(load_file(self._file(index), device=str(self.device)))
        elif self.offload == "cpu":
            block.to(self.device)


def block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_blocks(
    model: nn.Module,
    layer_names: list[str],
    batches: torch.Tensor,
    quantize_block: Callable[[str, Mapping[str, LayerInputs], list, list | None], None],
    *,
    hessian: bool,
    float_path: bool = False,
    batch_size: int = 8,
    offload: str = "none",
    device: torch.device | str | None = None,
    folder: str | Path | None = None,
) -> None:
    """Calibrate and quantize ``model`` block by block.

    ``quantize_block(block_name, inputs_by_layer, block_inputs, float_outputs)`` must replace that
    block's layers (it may also rescale them); it gets the recorded inputs of each selected layer.
    ``float_path``: also carry the float model's own hidden states from block to block (each block
    run while still float, on the float inputs), and hand the block's float outputs on them to
    ``quantize_block`` (else None): the target of a reconstruction that undoes earlier blocks' errors.
    ``offload`` (none | cpu | disk): where the blocks wait for their turn on ``device`` (the compute
    device; default: where the model's first parameter is); ``folder``: where disk offload writes
    (default: a temporary folder, removed afterwards).
    """
    prefix, blocks = decoder_blocks(model)
    outside = [n for n in layer_names if not n.startswith(prefix + ".")]
    if outside:
        raise ValueError(
            f"calibration-based quantization covers decoder-block layers only; {outside[0]} is outside "
            f"{prefix} (exclude it or use a data-free algorithm)"
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    check_offload({"weights": offload})
    state = _first_block_inputs(model, blocks[0], batches, batch_size)
    float_hidden = [hidden for hidden, _ in state] if float_path else None
    with tempfile.TemporaryDirectory(dir=folder, prefix="offload-") as scratch:
        onloader = _Onloader(blocks, offload, device, Path(scratch))
        for index, block in enumerate(progress(blocks, "quantize: decoder blocks", "block")):
            onloader.onload(index, block)
            block_name = f"{prefix}.{index}"
            local = {n.removeprefix(block_name + "."): n for n in layer_names if n.startswith(block_name + ".")}
            float_out = None
            if float_hidden is not None:  # the block is still float here
                float_out = [block_output(block, h, kw) for h, (_, kw) in zip(float_hidden, state, strict=True)]
            if local:
                inputs = _record(block, local, state, hessian)
                quantize_block(block_name, inputs, state, float_out)
                del inputs
            float_hidden = float_out
            state = [(block_output(block, hidden, kwargs), kwargs) for hidden, kwargs in state]


def _track_norm_outputs(root: nn.Module, produced_by: dict[int, tuple[str, torch.Tensor]]) -> list:
    """Hooks that record each norm layer's output under ``root`` by tensor id (name, output): what
    activation-aware scaling can fold into. The output is held so that its id cannot be reused."""
    return [
        module.register_forward_hook(lambda _m, _a, out, n=name: produced_by.__setitem__(id(out), (n, out)))
        for name, module in root.named_modules()
        if "norm" in type(module).__name__.lower()
    ]


@torch.no_grad()
def norm_producers(model: nn.Module, layer_names: list[str], ids: torch.Tensor) -> dict[str, str]:
    """For each of ``layer_names`` whose input is a norm layer's output, that norm's name: one
    forward pass over ``ids`` (a sequence of token ids), tracked as ``_record`` tracks them."""
    modules = dict(model.named_modules())
    produced_by: dict[int, tuple[str, torch.Tensor]] = {}
    found: dict[str, str] = {}

    def read(name: str, x: torch.Tensor) -> None:
        if id(x) in produced_by:
            found[name] = produced_by[id(x)][0]

    handles = _track_norm_outputs(model, produced_by)
    handles += [modules[n].register_forward_pre_hook(lambda _m, a, n=n: read(n, a[0])) for n in layer_names]
    try:
        model(input_ids=ids.reshape(1, -1).to(module_device(model)), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _record(block: nn.Module, local: Mapping[str, str], state: list, hessian: bool) -> dict[str, LayerInputs]:
    """Run the block on its inputs once; record each selected layer's inputs and their producer.

    Producers are tracked for norm layers only (what activation-aware scaling can fold into);
    their outputs are held until the batch is done so that tensor ids cannot be reused.
    """
    inputs = {full: LayerInputs() for full in local.values()}
    produced_by: dict[int, tuple[str, torch.Tensor]] = {}
    # per batch: the accumulator of each input tensor (x held so its id stays unique)
    products: dict[int, tuple[HessianAccumulator, torch.Tensor]] = {}
    handles = _track_norm_outputs(block, produced_by)

    def record(_module, args, full):
        x = args[0]
        rec = inputs[full]
        rec.producer = produced_by[id(x)][0] if id(x) in produced_by else None
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        rec.rows += rows.shape[0]
        abs_sum = rows.abs().sum(0)
        rec.abs_sum = abs_sum if rec.abs_sum is None else rec.abs_sum + abs_sum
        if hessian:
            # q/k/v (and gate/up) read one tensor: one product per batch and one accumulator for all
            # of them (the same sums, held once: at 8192 inputs one is 512 MiB of float64)
            if id(x) not in products:
                accumulator = rec.hessian or HessianAccumulator()
                accumulator.add_product((rows.T @ rows).double(), rows.shape[0])
                products[id(x)] = (accumulator, x)
            rec.hessian = products[id(x)][0]

    modules = dict(block.named_modules())
    handles += [
        modules[local_name].register_forward_pre_hook(lambda m, a, full=full: record(m, a, full))
        for local_name, full in local.items()
    ]
    try:
        for hidden, kwargs in state:
            block_output(block, hidden, kwargs)
            produced_by.clear()
            products.clear()
    finally:
        for handle in handles:
            handle.remove()
    return inputs
