"""Proof that an export holds our model: load it with the target's own reader and compare."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.checkpoint.store import with_kernel_preference
from pipeline.kept import activation_dtype


def probe_ids(vocab_size: int, length: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def compressed_tensors_logits(folder: Path, model: nn.Module) -> dict[str, float]:
    """Load ``folder`` with transformers' own loader (which hands it to compressed-tensors) and compare
    its logits to ours: to our model on the float path (``dequant`` kernels, the same arithmetic:
    must be equal) and as it runs (our low-bit kernels, e.g. bf16 activations: reported)."""
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=activation_dtype(model)).eval()
    ids = probe_ids(model.config.vocab_size)
    loaded = theirs(input_ids=ids).logits
    float_path = with_kernel_preference(model, "dequant")(input_ids=ids).logits
    as_run = model(input_ids=ids).logits
    exact = torch.equal(loaded, float_path)
    diff = (loaded - float_path).abs().max().item()
    # The float paths differ only in summation order, if at all: allow fp32 rounding of the logits.
    tolerance = 1e-5 * float_path.abs().max().item()
    if not exact and diff > tolerance:
        raise ValueError(f"{folder}: transformers' logits differ from ours by {diff:.3g} (allowed {tolerance:.3g})")
    return {
        "max_abs_diff_vs_float_path": diff,
        "max_abs_diff_vs_as_run": (loaded - as_run).abs().max().item(),
        "max_abs_logit": float_path.abs().max().item(),
    }
