"""Evaluate stage: perplexity, and agreement with the reference model on the same tokens.

Protocol (logged with every number): evaluation documents joined by blank lines, tokenized with
an explicit ``add_special_tokens``, the first ``tokens`` tokens cut into windows of ``context``
tokens advanced by ``stride``; a window scores only targets no earlier window scored. Each window
starts the way the model expects: with ``eval.bos`` on (``auto``: where the tokenizer adds a BOS
token), a BOS token is put before the window as context only, so the same targets are scored with
or without it. Perplexity is exp(mean token NLL). KL(reference || model) is averaged over the
first ``kl_tokens`` scored targets; top-1 agreement over all of them.

Intervals (95%) compare with the reference on the same targets: perplexity and Δppl% by a paired
bootstrap over evaluation windows (targets within a window share context, so windows are the
independent units), KL by a bootstrap over blocks of ``eval.ci.kl_block_tokens`` consecutive
scored targets (KL covers only the first ``kl_tokens`` targets, a few windows: too few units).

The reference's outputs are computed once per (model, evaluation config, BOS, storage form) and
cached on disk; its distribution at the KL targets is kept in the form ``pipeline.reference_store``
chooses within ``eval.reference_cache_max_mb``. A model's KL is computed window by window as it is
scored, so no more than one batch's logits and one window's log-probs exist at once.
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

from pipeline import cachefile, stats
from pipeline.assets import cache_dir
from pipeline.data import load_corpus, split_half, token_stream
from pipeline.device import module_device
from pipeline.progress import progress
from pipeline.reference_store import FULL, ReferenceDist, Store, check_store, keep, kl_rows

log = logging.getLogger(__name__)


BOS_MODES = ("auto", True, False)


KL_CHUNK = 128  # targets per KL step: bounds the temporaries of a top-k reference's bound


@dataclass
class Scores:
    nll: torch.Tensor  # (n_scored,) per-target negative log-likelihood
    argmax: torch.Tensor  # (n_scored,) top-1 prediction at each target
    kl: torch.Tensor | None = None  # (n_kl,) KL(reference || model) at the first targets; None: not scored
    window: torch.Tensor | None = None  # (n_scored,) index of the window that scored each target
    bos_token_id: int | None = None  # the BOS put before every window, None: none
    kl_bound: torch.Tensor | None = None  # (n_kl,) how far the exact KL may exceed ``kl`` (0: exact)
    distribution: ReferenceDist | None = None  # the reference's own, at the first kl_tokens targets


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


def window_index(spans: list[tuple[int, int, int]]) -> torch.Tensor:
    """(n_scored,) the window each scored target belongs to, in scoring order."""
    return torch.cat(
        [torch.full((end - begin - first,), i, dtype=torch.long) for i, (begin, end, first) in enumerate(spans)]
    )


def resolve_bos(tokenizer, mode: str | bool) -> int | None:
    """The BOS token id to put before every window, or None.

    ``auto``: the tokenizer's own convention, i.e. a BOS where ``add_special_tokens=True`` puts one
    in front of the text (Gemma, Llama-2/3); None where it does not (SmolLM2 under transformers 5).
    ``true``: the tokenizer's ``bos_token_id`` (an error if it has none). ``false``: never.
    """
    if mode not in BOS_MODES:
        raise ValueError(f"eval.bos must be one of auto, true, false; got {mode!r}")
    bos = tokenizer.bos_token_id
    if mode is False:
        return None
    if mode is True:
        if bos is None:
            raise ValueError("eval.bos=true but the tokenizer defines no bos_token; use eval.bos=auto or false")
        return int(bos)
    probe = "The quick brown fox"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    adds_bos = bos is not None and special[:1] == [bos] and special[1 : 1 + len(plain)] == plain
    return int(bos) if adds_bos else None


def evaluation_tokens(tokenizer, eval_cfg: Mapping, data_cfg: Mapping) -> torch.Tensor:
    docs = split_half(load_corpus(data_cfg["evaluation"]["corpus"], data_cfg["corpora"]), "evaluation")
    return token_stream(tokenizer, docs, int(eval_cfg["tokens"]), bool(eval_cfg["add_special_tokens"]))


def check_protocol(eval_cfg: Mapping, max_positions: int | None, bos_token_id: int | None = None) -> None:
    """Refuse a protocol that cannot run; ``max_positions`` and the BOS once the model is loaded."""
    context, kl_tokens = int(eval_cfg["context"]), int(eval_cfg["kl_tokens"])
    # A BOS before the window takes one position; the context is not shortened to make room.
    extra, with_bos = (1, " plus the BOS token") if bos_token_id is not None else (0, "")
    fix = " (or eval.bos=false)" if extra else ""
    for length in eval_cfg.get("context_lengths") or []:
        if not 1 < int(length) <= int(eval_cfg["tokens"]):
            raise ValueError(f"eval.context_lengths entry {length} must be in 2..eval.tokens ({eval_cfg['tokens']})")
        if max_positions and int(length) + extra > max_positions:
            raise ValueError(
                f"eval.context_lengths entry {length}{with_bos} exceeds the model's maximum of {max_positions}{fix}"
            )
    if context <= 1:
        raise ValueError(f"eval.context must be > 1, got {context}")
    if max_positions and context + extra > max_positions:
        raise ValueError(
            f"eval.context {context}{with_bos} exceeds the model's maximum of {max_positions} positions; "
            f"set eval.context={max_positions - extra}{fix}"
        )
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
    if eval_cfg["bos"] not in BOS_MODES:
        raise ValueError(f"eval.bos must be one of auto, true, false; got {eval_cfg['bos']!r}")
    check_ci(eval_cfg["ci"])
    check_store(eval_cfg)


def check_ci(ci: Mapping) -> None:
    resamples, block = ci["resamples"], ci["kl_block_tokens"]
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"eval.ci.resamples must be an integer >= 100 (a 95% interval needs tails), got {resamples!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"eval.ci.kl_block_tokens must be a positive integer, got {block!r}")
    if isinstance(ci["seed"], bool) or not isinstance(ci["seed"], int):
        raise ValueError(f"eval.ci.seed must be an integer, got {ci['seed']!r}")


def vocab_size(model) -> int:
    """The number of logits the model outputs per position (its lm_head's rows)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def _with_bos(ids: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    if bos_token_id is None:
        return ids
    return torch.cat([torch.full((ids.shape[0], 1), bos_token_id, dtype=ids.dtype), ids], dim=1)


@torch.no_grad()
def score(
    model,
    tokens: torch.Tensor,
    eval_cfg: Mapping,
    bos_token_id: int | None = None,
    *,
    reference: Scores | None = None,
    store: Store | None = None,
) -> Scores:
    """Run every window through ``model``; keep what perplexity and agreement need.

    With ``bos_token_id`` each window gets that token in front as context; the scored targets stay
    the same tokens. With ``reference`` the KL against it at the first ``kl_tokens`` targets is
    computed as each window is scored (the model's distribution is never kept); with ``store`` the
    model is the reference and keeps its own distribution there in that form.
    """
    spans = windows(tokens.numel(), int(eval_cfg["context"]), int(eval_cfg["stride"]))
    kl_tokens, batch_size = int(eval_cfg["kl_tokens"]), int(eval_cfg["batch_size"])
    if reference is not None:
        kl_tokens = min(kl_tokens, reference.distribution.rows)
    offset = 0 if bos_token_id is None else 1
    nll, argmax, kl, bound, kept = [], [], [], [], []
    n_kl = 0
    device = module_device(model)
    for i in progress(range(0, len(spans), batch_size), f"evaluate: batches of {batch_size} windows", "batch"):
        batch = spans[i : i + batch_size]
        ids = _with_bos(torch.stack([tokens[b:e] for b, e, _ in batch]), bos_token_id).to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        for row, (_, _, first) in enumerate(batch):
            # position t predicts token t+1: scored targets first..T-1 of the window sit at
            # first+offset.. in ids and use the logits one position earlier
            logprobs = F.log_softmax(logits[row, first - 1 + offset : -1].float(), dim=-1)
            targets = ids[row, first + offset :]
            # Scores live on the CPU (the reference cache, the bootstrap): one copy per window.
            nll.append(-logprobs.gather(-1, targets[:, None]).squeeze(-1).cpu())
            argmax.append(logprobs.argmax(-1).cpu())
            for c in range(0, min(kl_tokens - n_kl, logprobs.shape[0]), KL_CHUNK):
                chunk = logprobs[c : min(c + KL_CHUNK, kl_tokens - n_kl)].cpu()
                if reference is not None:
                    kl_chunk, bound_chunk = kl_rows(reference.distribution, n_kl + c, chunk)
                    kl.append(kl_chunk)
                    bound.append(bound_chunk)
                if store is not None:
                    kept.append(keep(chunk, store))
            n_kl = min(kl_tokens, n_kl + logprobs.shape[0])
        del logits
    scores = Scores(torch.cat(nll), torch.cat(argmax), window=window_index(spans), bos_token_id=bos_token_id)
    if reference is not None:
        scores.kl, scores.kl_bound = torch.cat(kl), torch.cat(bound)
    if store is not None:  # the reference against itself: KL exactly 0
        scores.distribution = ReferenceDist.cat(kept)
        scores.kl, scores.kl_bound = torch.zeros(n_kl), torch.zeros(n_kl)
    return scores


@torch.no_grad()
def perplexity_by_context(
    model, tokens: torch.Tensor, lengths: list[int], tokens_per_batch: int, bos_token_id: int | None = None
) -> dict[str, float]:
    """``ppl_ctx/<len>``: perplexity over disjoint windows of each length on the same tokens.

    A window scores its tokens 1..len-1; with ``bos_token_id`` the BOS before it is context only.
    """
    offset = 0 if bos_token_id is None else 1
    out = {}
    for length in lengths:
        n = tokens.numel() // length * length
        windows_ = tokens[:n].reshape(-1, length)
        nll = []
        batch_size = max(1, tokens_per_batch // length)
        batch_starts = range(0, windows_.shape[0], batch_size)
        for i in progress(batch_starts, f"perplexity at context {length}: batches of {batch_size} windows", "batch"):
            ids = _with_bos(windows_[i : i + batch_size], bos_token_id).to(module_device(model))
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll.append(
                F.cross_entropy(logits[:, offset:-1].flatten(0, 1), ids[:, offset + 1 :].flatten(), reduction="none")
            )
        out[f"ppl_ctx/{length}"] = math.exp(float(torch.cat(nll).mean()))
    return out


def _model_fingerprint(model_path: str) -> str:
    """Identify a checkpoint by its path and its weight files' names and sizes."""
    files = sorted((p.name, p.stat().st_size) for p in Path(model_path).glob("*.safetensors"))
    return json.dumps([model_path, files])


def reference_cache_path(
    model_path: str,
    model_dtype: str,
    eval_cfg: Mapping,
    data_cfg: Mapping,
    bos_token_id: int | None,
    store: Store = FULL,
) -> Path:
    key = {
        "model": _model_fingerprint(model_path),
        "dtype": model_dtype,
        "bos_token_id": bos_token_id,
        "eval": {k: eval_cfg[k] for k in ("tokens", "context", "stride", "add_special_tokens", "kl_tokens")},
        "corpus": data_cfg["corpora"][data_cfg["evaluation"]["corpus"]],
        "corpus_name": data_cfg["evaluation"]["corpus"],
    }
    if store.k is not None:  # the full form keeps the key it always had: existing caches stay valid
        key["store"] = store.name
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir() / "reference" / f"{digest}.safetensors"


def cached_json(path: Path, compute) -> dict:
    """A small JSON of reference results, computed once (by one process) and kept next to the reference logits."""
    return cachefile.compute_once(
        path,
        compute,
        write=lambda result, tmp: tmp.write_text(json.dumps(result, sort_keys=True)),
        read=lambda p: json.loads(p.read_text()),
    )


def load_or_compute_reference(
    path: Path, model, tokens: torch.Tensor, eval_cfg: Mapping, bos_token_id: int | None, store: Store = FULL
) -> Scores:
    """The reference's scores; ``path`` (``reference_cache_path``) is keyed by the BOS and ``store`` as well.

    Computed by one process; others asking at the same time wait for it and read its file.
    """

    def compute() -> Scores:
        log.info("computing reference outputs (%s, cached at %s)", store.name, path)
        return score(model, tokens, eval_cfg, bos_token_id, store=store)

    def write(scores: Scores, tmp: Path) -> None:
        save_file({"tokens": tokens, "nll": scores.nll, "argmax": scores.argmax, **scores.distribution.tensors()}, tmp)

    return cachefile.compute_once(
        path, compute, write, lambda cached: read_reference(cached, tokens, eval_cfg, bos_token_id)
    )


def read_reference(path: Path, tokens: torch.Tensor, eval_cfg: Mapping, bos_token_id: int | None) -> Scores:
    """The reference's scores as ``load_or_compute_reference`` cached them at ``path`` (never computed here:
    a run reads them back after quantizing, when the model is no longer the reference)."""
    if not path.exists():
        raise RuntimeError(f"reference cache {path} is gone (deleted while the run was quantizing?); rerun")
    log.info("reference outputs from cache %s", path)
    cached = load_file(path)
    if not torch.equal(cached["tokens"], tokens):
        raise RuntimeError(f"reference cache {path} was built on other tokens; delete it and rerun")
    distribution = ReferenceDist.from_tensors(cached)
    rows = distribution.rows
    # The windows follow from the protocol, which the cache key holds.
    spans = windows(tokens.numel(), int(eval_cfg["context"]), int(eval_cfg["stride"]))
    return Scores(
        cached["nll"],
        cached["argmax"],
        torch.zeros(rows),
        window_index(spans),
        bos_token_id,
        torch.zeros(rows),
        distribution,
    )


def kl_on_prefix(model, tokens: torch.Tensor, reference: Scores, eval_cfg: Mapping) -> float:
    """KL vs the reference on the windows of a prefix of the evaluation tokens: a cheap proxy of ``kl_vs_ref``.

    The windows start the way the reference's did (with its BOS, if any).
    """
    return float(score(model, tokens, eval_cfg, reference.bos_token_id, reference=reference).kl.mean())


def kl_blocks(window: torch.Tensor, block_tokens: int) -> torch.Tensor:
    """Block labels 0..K-1 for scored targets: runs of ``block_tokens`` targets, never across a window."""
    starts = torch.ones_like(window, dtype=torch.bool)
    starts[1:] = window[1:] != window[:-1]
    first_of_window = torch.cummax(torch.where(starts, torch.arange(window.numel()), 0), 0).values
    offset = torch.arange(window.numel()) - first_of_window
    block_starts = starts | (offset % block_tokens == 0)
    return torch.cumsum(block_starts.long(), 0) - 1


def compare(scores: Scores, reference: Scores, ci: Mapping | None = None) -> dict[str, float]:
    """The language-modeling metrics of a model against the reference's cached outputs.

    With ``ci`` (``eval.ci``) also their 95% intervals: ``ppl_ci_*``, ``dppl_pct_ci_*`` (paired
    bootstrap over windows) and ``kl_vs_ref_ci_*`` (bootstrap over blocks of targets).
    """
    ppl, ppl_ref = math.exp(float(scores.nll.mean())), math.exp(float(reference.nll.mean()))
    metrics = {
        "ppl": ppl,
        "ppl_ref": ppl_ref,
        "dppl_pct": 100.0 * (ppl / ppl_ref - 1.0),
        "kl_vs_ref": float(scores.kl.mean()),
        # the exact KL is in [kl_vs_ref, kl_vs_ref + kl_vs_ref_bound]; 0 where the reference is stored in full
        "kl_vs_ref_bound": float(scores.kl_bound.mean()),
        "top1_agree": float((scores.argmax == reference.argmax).float().mean()),
        "eval_tokens_scored": float(scores.nll.numel()),
    }
    if ci is not None:
        metrics |= intervals(scores, reference, ci)
    return metrics


def intervals(scores: Scores, reference: Scores, ci: Mapping) -> dict[str, float]:
    """95% percentile-bootstrap intervals, paired with the reference on the same resamples."""
    if scores.window is None or reference.window is None or not torch.equal(scores.window, reference.window):
        raise ValueError("paired intervals need the model and the reference scored on the same windows")
    resamples, seed = int(ci["resamples"]), int(ci["seed"])
    sums, counts = stats.unit_sums(scores.nll, scores.window)
    ref_sums, _ = stats.unit_sums(reference.nll, reference.window)
    indices = stats.resample_indices(counts.numel(), resamples, stats.seeded(seed))
    mean_nll = stats.resampled_means(sums, counts, indices)
    ref_mean_nll = stats.resampled_means(ref_sums, counts, indices)
    ppl_low, ppl_high = stats.percentile_interval(mean_nll.exp())
    dppl_low, dppl_high = stats.percentile_interval(100.0 * (torch.exp(mean_nll - ref_mean_nll) - 1.0))

    kl = scores.kl
    blocks = kl_blocks(scores.window[: kl.numel()], int(ci["kl_block_tokens"]))
    kl_sums, kl_counts = stats.unit_sums(kl, blocks)
    kl_draws = stats.resampled_means(
        kl_sums, kl_counts, stats.resample_indices(kl_counts.numel(), resamples, stats.seeded(seed))
    )
    kl_low, kl_high = stats.percentile_interval(kl_draws)
    return {
        "ppl_ci_low": ppl_low,
        "ppl_ci_high": ppl_high,
        "dppl_pct_ci_low": dppl_low,
        "dppl_pct_ci_high": dppl_high,
        "kl_vs_ref_ci_low": kl_low,
        "kl_vs_ref_ci_high": kl_high,
    }


def protocol_params(eval_cfg: Mapping, bos_token_id: int | None) -> dict[str, str]:
    """The resolved parts of the protocol, logged as run parameters next to the config."""
    spans = windows(int(eval_cfg["tokens"]), int(eval_cfg["context"]), int(eval_cfg["stride"]))
    ci = eval_cfg["ci"]
    kl_window = window_index(spans)[: int(eval_cfg["kl_tokens"])]
    n_blocks = int(kl_blocks(kl_window, int(ci["kl_block_tokens"])).max()) + 1
    return {
        "eval.bos_used": "false" if bos_token_id is None else "true",
        "eval.bos_token_id": "none" if bos_token_id is None else str(bos_token_id),
        "eval.ci_method": (
            f"95% percentile bootstrap, B={ci['resamples']}, seed {ci['seed']}: ppl and dppl_pct paired with the "
            f"reference over {len(spans)} windows; kl_vs_ref over {n_blocks} blocks of up to "
            f"{ci['kl_block_tokens']} scored tokens"
        ),
    }
