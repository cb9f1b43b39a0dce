"""Evaluate stage: perplexity, and agreement with the reference model on the same tokens.

Protocol (logged with every number): evaluation documents joined by blank lines, tokenized with
an explicit ``add_special_tokens``, the first ``tokens`` tokens cut into windows of ``context``
tokens advanced by ``stride``; a window scores only targets no earlier window scored. Perplexity
is exp(mean token NLL). KL(reference || model) is averaged over the first ``kl_tokens`` scored
targets; top-1 agreement over all of them.

The reference's outputs are computed once per (model, evaluation config) and cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from pipeline.assets import cache_dir
from pipeline.data import load_corpus, split_half, token_stream

log = logging.getLogger(__name__)


@dataclass
class Scores:
    nll: torch.Tensor  # (n_scored,) per-target negative log-likelihood
    argmax: torch.Tensor  # (n_scored,) top-1 prediction at each target
    logprobs: torch.Tensor  # (kl_tokens, vocab) full log-distribution at the first targets


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position within the window) for a strided sweep."""
    if not 0 < stride <= context:
        raise ValueError(f"eval.stride must be in 1..context ({context}), got {stride}")
    if n_tokens < context:
        raise ValueError(f"eval.tokens ({n_tokens}) must be at least eval.context ({context})")
    out, scored_until = [], 0
    for begin in range(0, n_tokens - context + 1, stride):
        end = begin + context
        out.append((begin, end, max(scored_until - begin, 1)))
        scored_until = end
    return out


def evaluation_tokens(tokenizer, eval_cfg: Mapping, data_cfg: Mapping) -> torch.Tensor:
    docs = split_half(load_corpus(data_cfg["evaluation"]["corpus"], data_cfg["corpora"]), "evaluation")
    return token_stream(tokenizer, docs, int(eval_cfg["tokens"]), bool(eval_cfg["add_special_tokens"]))


def check_protocol(eval_cfg: Mapping, max_positions: int | None) -> None:
    context, kl_tokens = int(eval_cfg["context"]), int(eval_cfg["kl_tokens"])
    for length in eval_cfg.get("context_lengths") or []:
        if not 1 < int(length) <= int(eval_cfg["tokens"]):
            raise ValueError(f"eval.context_lengths entry {length} must be in 2..eval.tokens ({eval_cfg['tokens']})")
        if max_positions and int(length) > max_positions:
            raise ValueError(f"eval.context_lengths entry {length} exceeds the model's maximum of {max_positions}")
    if context <= 1:
        raise ValueError(f"eval.context must be > 1, got {context}")
    if max_positions and context > max_positions:
        raise ValueError(f"eval.context {context} exceeds the model's maximum of {max_positions} positions")
    if kl_tokens <= 0:
        raise ValueError(f"eval.kl_tokens must be positive, got {kl_tokens}")
    windows(int(eval_cfg["tokens"]), context, int(eval_cfg["stride"]))
    generation = eval_cfg.get("generation") or {}
    prompts = generation.get("prompts") or []
    if isinstance(prompts, str) or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"eval.generation.prompts must be a list of non-empty strings, got {prompts!r}")
    if prompts and not 1 <= int(generation["new_tokens"]) <= (max_positions or math.inf):
        raise ValueError(
            f"eval.generation.new_tokens must be in 1..{max_positions or 'any'}, got {generation['new_tokens']}"
        )


@torch.no_grad()
def score(model, tokens: torch.Tensor, eval_cfg: Mapping) -> Scores:
    """Run every window through ``model``; keep what perplexity and agreement need."""
    spans = windows(tokens.numel(), int(eval_cfg["context"]), int(eval_cfg["stride"]))
    kl_tokens, batch_size = int(eval_cfg["kl_tokens"]), int(eval_cfg["batch_size"])
    nll, argmax, kept = [], [], []
    n_kept = 0
    for i in range(0, len(spans), batch_size):
        batch = spans[i : i + batch_size]
        ids = torch.stack([tokens[b:e] for b, e, _ in batch])
        logits = model(input_ids=ids, use_cache=False).logits.float()
        for row, (_, _, first) in enumerate(batch):
            # position t predicts token t+1: scored targets first..T-1 use logits first-1..T-2
            logprobs = F.log_softmax(logits[row, first - 1 : -1], dim=-1)
            targets = ids[row, first:]
            nll.append(-logprobs.gather(-1, targets[:, None]).squeeze(-1))
            argmax.append(logprobs.argmax(-1))
            if n_kept < kl_tokens:
                kept.append(logprobs[: kl_tokens - n_kept].clone())
                n_kept += kept[-1].shape[0]
    return Scores(torch.cat(nll), torch.cat(argmax), torch.cat(kept))


@torch.no_grad()
def perplexity_by_context(model, tokens: torch.Tensor, lengths: list[int], tokens_per_batch: int) -> dict[str, float]:
    """``ppl_ctx/<len>``: perplexity over disjoint windows of each length on the same tokens."""
    out = {}
    for length in lengths:
        n = tokens.numel() // length * length
        windows_ = tokens[:n].reshape(-1, length)
        nll = []
        batch_size = max(1, tokens_per_batch // length)
        for i in range(0, windows_.shape[0], batch_size):
            ids = windows_[i : i + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll.append(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none"))
        out[f"ppl_ctx/{length}"] = math.exp(float(torch.cat(nll).mean()))
    return out


def _model_fingerprint(model_path: str) -> str:
    """Identify a checkpoint by its path and its weight files' names and sizes."""
    files = sorted((p.name, p.stat().st_size) for p in Path(model_path).glob("*.safetensors"))
    return json.dumps([model_path, files])


def reference_cache_path(model_path: str, model_dtype: str, eval_cfg: Mapping, data_cfg: Mapping) -> Path:
    key = json.dumps(
        {
            "model": _model_fingerprint(model_path),
            "dtype": model_dtype,
            "eval": {k: eval_cfg[k] for k in ("tokens", "context", "stride", "add_special_tokens", "kl_tokens")},
            "corpus": data_cfg["corpora"][data_cfg["evaluation"]["corpus"]],
            "corpus_name": data_cfg["evaluation"]["corpus"],
        },
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "reference" / f"{digest}.safetensors"


def cached_json(path: Path, compute) -> dict:
    """A small JSON of reference results, computed once and kept next to the reference logits."""
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(result, sort_keys=True))
    tmp.rename(path)
    return result


def load_or_compute_reference(path: Path, model, tokens: torch.Tensor, eval_cfg: Mapping) -> Scores:
    if path.exists():
        log.info("reference outputs from cache %s", path)
        cached = load_file(path)
        if not torch.equal(cached["tokens"], tokens):
            raise RuntimeError(f"reference cache {path} was built on other tokens; delete it and rerun")
        return Scores(cached["nll"], cached["argmax"], cached["logprobs"])
    log.info("computing reference outputs (cached at %s)", path)
    scores = score(model, tokens, eval_cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file({"tokens": tokens, "nll": scores.nll, "argmax": scores.argmax, "logprobs": scores.logprobs}, tmp)
    tmp.rename(path)
    return scores


def kl_vs_reference(logprobs: torch.Tensor, reference: Scores) -> float:
    """Mean KL(reference || model) over the first ``len(logprobs)`` scored targets."""
    ref_logprobs = reference.logprobs[: logprobs.shape[0]]
    return float((ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1).mean())


def kl_on_prefix(model, tokens: torch.Tensor, reference: Scores, eval_cfg: Mapping) -> float:
    """KL vs the reference on the windows of a prefix of the evaluation tokens: a cheap proxy of ``kl_vs_ref``."""
    return kl_vs_reference(score(model, tokens, eval_cfg).logprobs, reference)


def compare(scores: Scores, reference: Scores) -> dict[str, float]:
    """The language-modeling metrics of a model against the reference's cached outputs."""
    return {
        "ppl": math.exp(float(scores.nll.mean())),
        "ppl_ref": math.exp(float(reference.nll.mean())),
        "kl_vs_ref": kl_vs_reference(scores.logprobs, reference),
        "top1_agree": float((scores.argmax == reference.argmax).float().mean()),
        "eval_tokens_scored": float(scores.nll.numel()),
    }
