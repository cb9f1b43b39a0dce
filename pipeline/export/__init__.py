"""Exports of a quantized model: our checkpoint, compressed-tensors (vLLM, transformers), GGUF (llama.cpp).

``available(layers)`` says, per format, whether the model's layers map onto it exactly (None) or
why not; a run records it as the tags ``exports`` and ``exports_refused``, and ``pipeline.export``
refuses a format that cannot hold the method before it writes anything.
"""

from __future__ import annotations

from pipeline.export import compressed_tensors, gguf_file
from pipeline.export.layers import Layer, of_manifest, of_model

CHECKPOINT = "checkpoint"
FORMATS = (CHECKPOINT, compressed_tensors.FORMAT, gguf_file.FORMAT)


def available(layers: list[Layer]) -> dict[str, str | None]:
    """Format -> None when the layers map exactly, else why not (and what the format holds)."""
    return {
        CHECKPOINT: None if layers else "the model has no quantized layers",
        compressed_tensors.FORMAT: compressed_tensors.refusal(layers),
        gguf_file.FORMAT: gguf_file.refusal(layers),
    }


def tags(layers: list[Layer]) -> dict[str, str]:
    """``exports``: the formats this model can be written to (GGUF with its types), e.g.
    ``checkpoint,compressed-tensors,gguf:Q4_0``; ``exports_refused``: the others and why, separated by " | "."""
    result = available(layers)
    ok = [
        f"{fmt}:{'+'.join(gguf_file.types(layers))}" if fmt == gguf_file.FORMAT else fmt
        for fmt, why in result.items()
        if why is None
    ]
    refused = " | ".join(f"{fmt}: {why}" for fmt, why in result.items() if why is not None)
    return {"exports": ",".join(ok) or "none", "exports_refused": refused[:5000] or "none"}


__all__ = ["CHECKPOINT", "FORMATS", "Layer", "available", "of_manifest", "of_model", "tags"]
