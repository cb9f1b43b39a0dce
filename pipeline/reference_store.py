"""What KL(reference || model) needs of the reference's distribution, kept at a bounded size.

The reference's log-probabilities over the whole vocabulary at the first ``eval.kl_tokens`` scored
targets cost ``kl_tokens x vocab x 4`` bytes (384 MiB at SmolLM2's 49,152 tokens, 1 GiB at
Llama-3's 128,256). Two forms, chosen by ``eval.reference_store`` within
``eval.reference_cache_max_mb``:

- ``full_fp32``: every log-prob, exact. KL is ``sum_v p_v (log p_v - log q_v)`` as before.
- ``topk(k=K)``: the K most likely tokens' log-probs (fp32) and ids (int32), plus the tail mass
  ``T = sum of the other tokens' probabilities``. KL is computed with the tail as one bucket:
  ``sum_top p (log p - log q) + T log(T / Q)``, Q the model's mass on the same tail tokens. By the
  log-sum inequality this never exceeds the exact KL, and the exact KL exceeds it by at most
  ``max over tail distributions with every p_v <= p_K of sum_tail p log(p/q) - T log(T/Q)``
  (p_K the K-th largest probability): the worst tail puts p_K on the tail tokens the model finds
  least likely. That bound is computed per target from the model's log-probs and logged
  (``kl_vs_ref_bound``): exact KL is in [kl_vs_ref, kl_vs_ref + kl_vs_ref_bound].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

STORES = ("auto", "full_fp32", "topk")
MIB = 2**20
TOPK_BYTES = 8  # an fp32 log-prob and an int32 token id per kept token
BOUND_CHUNK = 64  # targets per chunk when sorting the model's tail for the bound: bounded memory


@dataclass(frozen=True)
class Store:
    """The resolved storage form: ``k`` is None for the full vocabulary."""

    k: int | None

    @property
    def name(self) -> str:
        return "full_fp32" if self.k is None else f"topk(k={self.k})"


FULL = Store(None)


def check_store(eval_cfg: Mapping) -> None:
    """The settings alone (the vocabulary is known once the model is loaded)."""
    mode, budget_mb = eval_cfg["reference_store"], eval_cfg["reference_cache_max_mb"]
    if mode not in STORES:
        raise ValueError(f"eval.reference_store must be one of {', '.join(STORES)}; got {mode!r}")
    if isinstance(budget_mb, bool) or not isinstance(budget_mb, int | float) or budget_mb <= 0:
        raise ValueError(f"eval.reference_cache_max_mb must be a positive number of MiB, got {budget_mb!r}")


def resolve_store(eval_cfg: Mapping, vocab: int) -> Store:
    """``eval.reference_store`` for this vocabulary within ``eval.reference_cache_max_mb`` (MiB).

    ``auto``: the full vocabulary where it fits, else the largest top-k that fits. ``full_fp32``:
    the full vocabulary (an error if it does not fit). ``topk``: the largest top-k that fits.
    """
    check_store(eval_cfg)
    mode, budget_mb = eval_cfg["reference_store"], eval_cfg["reference_cache_max_mb"]
    rows, budget = int(eval_cfg["kl_tokens"]), float(budget_mb) * MIB
    full_bytes = rows * vocab * 4
    if mode == "full_fp32" or (mode == "auto" and full_bytes <= budget):
        if full_bytes > budget:
            raise ValueError(
                f"eval.reference_store=full_fp32 needs {full_bytes / MIB:.0f} MiB ({rows} kl_tokens x {vocab} vocab "
                f"x 4 bytes) > eval.reference_cache_max_mb={budget_mb}; raise the budget, lower eval.kl_tokens "
                "or use eval.reference_store=topk"
            )
        return FULL
    k = min(vocab - 1, int(budget // (rows * TOPK_BYTES)))
    if k < 1:
        raise ValueError(
            f"eval.reference_cache_max_mb={budget_mb} holds not even the top-1 of {rows} kl_tokens; raise it"
        )
    return Store(k)


@dataclass
class ReferenceDist:
    """The reference's distribution at consecutive scored targets, in a ``Store``'s form."""

    logprobs: torch.Tensor  # (n, vocab) or (n, k) fp32
    indices: torch.Tensor | None = None  # (n, k) int32 token ids of the top-k; None: full vocabulary
    tail_mass: torch.Tensor | None = None  # (n,) the probability outside the top-k

    @property
    def rows(self) -> int:
        return self.logprobs.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"logprobs": self.logprobs}
        if self.indices is not None:
            out |= {"topk_indices": self.indices, "tail_mass": self.tail_mass}
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> ReferenceDist:
        return cls(tensors["logprobs"], tensors.get("topk_indices"), tensors.get("tail_mass"))

    @classmethod
    def cat(cls, parts: list[ReferenceDist]) -> ReferenceDist:
        if parts[0].indices is None:
            return cls(torch.cat([p.logprobs for p in parts]))
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("logprobs", "indices", "tail_mass")))


def keep(logprobs: torch.Tensor, store: Store) -> ReferenceDist:
    """The ``store`` form of full log-probs (n, vocab)."""
    if store.k is None:
        return ReferenceDist(logprobs.clone())
    top, idx = torch.topk(logprobs, store.k, dim=-1)
    tail = logprobs.scatter(-1, idx, -math.inf)
    return ReferenceDist(top.contiguous(), idx.to(torch.int32), torch.logsumexp(tail, -1).exp())


def kl_rows(reference: ReferenceDist, start: int, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(reference || model) at targets ``start..start+n`` and the bound on its error (zero when exact).

    ``logprobs`` (n, vocab): the model's log-probs at those targets.
    """
    ref = reference.logprobs[start : start + logprobs.shape[0]]
    if reference.indices is None:
        return (ref.exp() * (ref - logprobs)).sum(-1), torch.zeros(logprobs.shape[0])
    idx = reference.indices[start : start + logprobs.shape[0]].long()
    tail_mass = reference.tail_mass[start : start + logprobs.shape[0]]
    head = (ref.exp() * (ref - logprobs.gather(-1, idx))).sum(-1)
    model_tail = logprobs.scatter(-1, idx, -math.inf)  # the model's log-probs on the reference's tail
    log_q = torch.logsumexp(model_tail, -1)
    log_t = tail_mass.log()
    bucket = torch.where(tail_mass > 0, tail_mass * (log_t - log_q), 0.0)
    bounds = [
        _worst_tail(model_tail[i : i + BOUND_CHUNK], tail_mass[i : i + BOUND_CHUNK], ref[i : i + BOUND_CHUNK, -1])
        for i in range(0, logprobs.shape[0], BOUND_CHUNK)
    ]
    return head + bucket, (torch.cat(bounds) - bucket).clamp_min(0.0)


def _worst_tail(model_tail: torch.Tensor, tail_mass: torch.Tensor, log_pk: torch.Tensor) -> torch.Tensor:
    """max sum_tail p log(p/q) over tails with mass T and every p <= p_K: p_K on the least likely tokens."""
    p_k = log_pk.exp()
    # how many tail tokens the worst case fills (the last one partly); never more than the tail has
    fill = torch.ceil(tail_mass / p_k).nan_to_num(nan=1.0).clamp(min=1, max=model_tail.shape[-1]).long()
    lowest = torch.topk(model_tail.nan_to_num(neginf=math.inf), int(fill.max()), dim=-1, largest=False).values
    j = torch.arange(lowest.shape[-1])
    weight = (tail_mass[:, None] - j * p_k[:, None]).clamp(min=0.0).minimum(p_k[:, None])
    terms = torch.where(weight > 0, weight * (weight.log() - lowest), 0.0)
    return terms.sum(-1)
