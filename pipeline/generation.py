"""Greedy generation, and how far a model's generations agree with the reference's.

Perplexity and KL score one step at a time on fixed text; generation feeds the model its own
output, so an early difference compounds. For each fixed prompt both models decode greedily for
``new_tokens`` tokens (no early stop at end-of-sequence, so every sequence has the same length):

- ``gen_match_rate``: fraction of positions where the token equals the reference's, over all prompts.
- ``gen_first_divergence``: mean index of the first differing token (``new_tokens`` if none).
- ``gen_repetition_rate``: mean fraction of repeated 3-grams in a generation (0 = no 3-gram twice;
  near 1 = a loop); ``gen_degenerate_frac``: fraction of generations at or above ``DEGENERATE`` (0.5).
  The reference's own rates are logged as ``ref_gen_*`` so a degenerate model can be told from a
  prompt that loops anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from transformers import DynamicCache, StaticCache

from pipeline.device import module_device
from pipeline.energy import Meter, Usage
from pipeline.memory_peak import synchronize

T = TypeVar("T")

NGRAM = 3
DEGENERATE = 0.5


@dataclass
class Generation:
    tokens: list[int]  # the generated tokens only
    prefill_s: float
    decode_s: float
    # CPU time and energy over the same two windows, when a meter was given
    prefill_usage: Usage | None = None
    decode_usage: Usage | None = None


@torch.no_grad()
def greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int, meter: Meter | None = None) -> list[Generation]:
    """Greedy decoding of ``new_tokens`` tokens after each row of ``prompt`` (batch, length), with a KV cache.

    With a ``meter``, each timed window (prefill, decode) is also metered; its readings sit just outside
    the timed interval, so the times mean what they mean without one. On a GPU each window starts and
    ends with a synchronize: it times the GPU's work, not how fast Python queued it.
    """
    device = module_device(model)
    prompt = prompt.to(device)
    cache = DynamicCache(config=model.config)
    out, prefill_s, prefill_usage = _timed(device, meter, lambda: model(input_ids=prompt, cache=cache, use_cache=True))
    next_ids = out.logits[:, -1:].argmax(-1)
    # the cache object grows in place
    generated, decode_s, decode_usage = _timed(device, meter, lambda: _steps(model, next_ids, cache, new_tokens))
    rows = torch.cat(generated, dim=1).tolist()
    return [Generation(row, prefill_s, decode_s, prefill_usage, decode_usage) for row in rows]


def _timed(device: torch.device, meter: Meter | None, work: Callable[[], T]) -> tuple[T, float, Usage | None]:
    """``work()`` as one timed window, synchronized at both ends and metered just outside the timing:
    (its result, seconds, the meter's reading or None)."""
    synchronize(device)
    metered = meter.start() if meter else None
    start = time.perf_counter()
    result = work()
    synchronize(device)
    seconds = time.perf_counter() - start
    return result, seconds, (meter.stop(metered) if meter else None)


def _steps(step: Callable, next_ids: torch.Tensor, cache, new_tokens: int) -> list[torch.Tensor]:
    """The greedy decode steps after the prefill's token ``next_ids``: every token, that one first."""
    generated = [next_ids]
    for _ in range(new_tokens - 1):
        out = step(input_ids=next_ids, cache=cache, use_cache=True)
        next_ids = out.logits[:, -1:].argmax(-1)
        generated.append(next_ids)
    return generated


class CompiledDecoder:
    """Greedy decoding as ``greedy`` does it, with a static KV cache and a compiled decode step.

    Eager HF decode is overhead-bound (Python and kernel launches per op; the 135M model spent ~37 ms
    a token outside weight reading on the CPU): compiling the step shows the kernels' own speed.
    One decoder per (model, batch, length): its cache is allocated once and reset per call, so the
    compiled graph (and on a GPU, with ``mode="reduce-overhead"``, its CUDA graph) is reused. The
    prefill runs eager; only decode steps are compiled. The first call compiles (``compile_s``).
    """

    def __init__(
        self, model: nn.Module, batch: int, max_len: int, mode: str | None = None, backend: str = "inductor"
    ) -> None:
        self.model, self.batch, self.max_len = model, batch, max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.step = torch.compile(model, mode=mode, backend=backend, dynamic=False)
        self.compile_s: float | None = None

    @torch.no_grad()
    def __call__(self, prompt: torch.Tensor, new_tokens: int, meter: Meter | None = None) -> list[Generation]:
        """As ``greedy``: one ``Generation`` per prompt row."""
        if prompt.shape[0] != self.batch or prompt.shape[1] + new_tokens > self.max_len:
            raise ValueError(f"this decoder takes batch {self.batch} and {self.max_len} tokens in all")
        device = module_device(self.model)
        prompt = prompt.to(device)
        self.cache.reset()
        out, prefill_s, prefill_usage = _timed(
            device, meter, lambda: self.model(input_ids=prompt, cache=self.cache, use_cache=True)
        )
        next_ids = out.logits[:, -1:].argmax(-1)
        if self.compile_s is None:  # the first step compiles: outside the timed window
            first = time.perf_counter()
            self.step(input_ids=next_ids, cache=self.cache, use_cache=True)
            synchronize(device)
            self.compile_s = time.perf_counter() - first
            self.cache.reset()
            return self(prompt, new_tokens, meter)
        generated, decode_s, decode_usage = _timed(
            device, meter, lambda: _steps(self.step, next_ids, self.cache, new_tokens)
        )
        rows = torch.cat(generated, dim=1).tolist()
        return [Generation(row, prefill_s, decode_s, prefill_usage, decode_usage) for row in rows]


def generate(model: nn.Module, tokenizer, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """Each prompt alone (no padding, so no attention-mask effects), greedy, ``new_tokens`` tokens."""
    if new_tokens < 1:
        raise ValueError(f"eval.generation.new_tokens must be >= 1, got {new_tokens}")
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        if ids.numel() == 0:
            raise ValueError("eval.generation.prompts contains an empty prompt")
        out.append(greedy(model, ids, new_tokens)[0].tokens)
    return out


def repetition_rate(tokens: list[int], n: int = NGRAM) -> float:
    """Fraction of the n-grams of ``tokens`` that already occurred earlier in it."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def first_divergence(tokens: list[int], reference: list[int]) -> int:
    for i, (a, b) in enumerate(zip(tokens, reference, strict=True)):
        if a != b:
            return i
    return len(reference)


def _rates(generations: list[list[int]], prefix: str) -> dict[str, float]:
    rates = [repetition_rate(g) for g in generations]
    return {
        f"{prefix}gen_repetition_rate": sum(rates) / len(rates),
        f"{prefix}gen_degenerate_frac": sum(r >= DEGENERATE for r in rates) / len(rates),
    }


def agreement(generations: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    """The ``gen_*`` metrics of ``generations`` against the reference's for the same prompts."""
    if len(generations) != len(reference) or any(len(g) != len(r) for g, r in zip(generations, reference)):
        raise ValueError("generations and reference generations differ in number or length; rerun the reference")
    matches = sum(a == b for g, r in zip(generations, reference) for a, b in zip(g, r))
    total = sum(len(r) for r in reference)
    divergences = [first_divergence(g, r) for g, r in zip(generations, reference)]
    return {
        "gen_match_rate": matches / total,
        "gen_first_divergence": sum(divergences) / len(divergences),
        **_rates(generations, ""),
        **_rates(reference, "ref_"),
    }


def samples(tokenizer, prompts: list[str], generations: list[list[int]], reference: list[list[int]]) -> list[dict]:
    """Readable side-by-side generations for the run's artifact."""
    return [
        {
            "prompt": prompt,
            "reference": tokenizer.decode(r),
            "output": tokenizer.decode(g),
            "first_divergence": first_divergence(g, r),
            "repetition_rate": round(repetition_rate(g), 3),
        }
        for prompt, g, r in zip(prompts, generations, reference)
    ]
