"""The reference cache: exact where it fits, top-k within its stated bound elsewhere, safe under concurrent writers."""

import json
import multiprocessing
import os
import time

import pytest
import torch
from conftest import tiny_llama
from torch.nn import functional as F

from pipeline import cachefile, evaluate, reference_store
from pipeline.reference_store import Store

EVAL = {
    "context": 32,
    "stride": 32,
    "kl_tokens": 96,
    "batch_size": 2,
    "tokens": 128,
    "add_special_tokens": False,
    "reference_store": "auto",
    "reference_cache_max_mb": 512,
}
DATA = {"corpora": {"wikipedia": {"kind": "builtin"}}, "evaluation": {"corpus": "wikipedia"}}


def _peaked(vocab: int, seed: int) -> torch.nn.Module:
    """A tiny model whose next-token distributions are peaked like a trained LM's (a random init is near uniform)."""
    model = tiny_llama(vocab_size=vocab, seed=seed)
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)  # sharper logits; the (tied) embedding stays as it was
    return model


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy with noise on every weight but the (tied) embedding: stands in for a quantized model."""
    generator = torch.Generator().manual_seed(seed)
    copy = _peaked(model.config.vocab_size, 0)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in copy.named_parameters():
            if "embed" not in name and "lm_head" not in name:  # blocks and norms
                p.add_(torch.randn(p.shape, generator=generator) * p.abs().mean() * 0.3)
    return copy


def _exact_kl(reference: torch.nn.Module, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) per target the way evaluate computed it before the cache had forms (full fp32)."""
    ref = evaluate.score(reference, tokens, EVAL, store=Store(None)).distribution.logprobs
    rows = []
    for begin in range(0, tokens.numel(), EVAL["context"]):
        logits = model(input_ids=tokens[None, begin : begin + EVAL["context"]]).logits[0, :-1].float()
        rows.append(F.log_softmax(logits, -1))
    logprobs = torch.cat(rows)[: ref.shape[0]]
    return (ref.exp() * (ref - logprobs)).sum(-1)


@pytest.fixture(scope="module")
def pair():
    vocab = 8192
    reference = _peaked(vocab, seed=1)
    tokens = torch.randint(0, vocab, (EVAL["tokens"],), generator=torch.Generator().manual_seed(2))
    return reference, _perturbed(reference, 3), tokens


def test_auto_keeps_the_full_vocabulary_where_it_fits_and_top_k_within_the_budget():
    assert reference_store.resolve_store({**EVAL, "kl_tokens": 2048}, 49152).name == "full_fp32"  # 384 MiB
    assert reference_store.resolve_store({**EVAL, "kl_tokens": 2048}, 128256).name == "topk(k=32768)"
    assert reference_store.resolve_store({**EVAL, "reference_store": "topk"}, 8192).k == 8191
    with pytest.raises(ValueError, match="full_fp32 needs 1002 MiB .* > eval.reference_cache_max_mb=512"):
        reference_store.resolve_store({**EVAL, "kl_tokens": 2048, "reference_store": "full_fp32"}, 128256)
    with pytest.raises(ValueError, match="eval.reference_store must be one of auto, full_fp32, topk"):
        reference_store.check_store({**EVAL, "reference_store": "fp8"})


def test_full_store_gives_the_same_kl_as_before_bit_for_bit(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    reference, model, tokens = pair
    store = reference_store.resolve_store(EVAL, 8192)
    assert store.k is None
    path = evaluate.reference_cache_path(str(tmp_path), "float32", EVAL, DATA, None, store)
    ref = evaluate.load_or_compute_reference(path, reference, tokens, EVAL, None, store)
    cached = evaluate.load_or_compute_reference(path, reference, tokens, EVAL, None, store)
    scores = evaluate.score(model, tokens, EVAL, reference=cached)
    assert torch.equal(scores.kl, _exact_kl(reference, model, tokens))
    assert torch.equal(cached.distribution.logprobs, ref.distribution.logprobs)
    # a run reads it back after quantizing (never recomputing it from the quantized model)
    reread = evaluate.read_reference(path, tokens, EVAL, None)
    assert torch.equal(reread.distribution.logprobs, ref.distribution.logprobs) and torch.equal(reread.nll, ref.nll)
    with pytest.raises(RuntimeError, match="is gone"):
        evaluate.read_reference(tmp_path / "missing.safetensors", tokens, EVAL, None)
    metrics = evaluate.compare(scores, cached)
    assert metrics["kl_vs_ref"] > 0.05 and metrics["kl_vs_ref_bound"] == 0.0
    # the size is what the design says: kl_tokens x vocab x 4 bytes, plus a few small vectors
    assert 96 * 8192 * 4 < path.stat().st_size < 96 * 8192 * 4 + 8192


@pytest.mark.parametrize("k", [64, 512])
def test_top_k_kl_is_within_its_stated_bound_of_the_exact_kl(pair, tmp_path, monkeypatch, k):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    reference, model, tokens = pair
    budget_mb = EVAL["kl_tokens"] * k * reference_store.TOPK_BYTES / 2**20
    cfg = {**EVAL, "reference_store": "topk", "reference_cache_max_mb": budget_mb}
    store = reference_store.resolve_store(cfg, 8192)
    assert store == Store(k)
    path = evaluate.reference_cache_path(str(tmp_path), "float32", cfg, DATA, None, store)
    evaluate.load_or_compute_reference(path, reference, tokens, cfg, None, store)
    cached = evaluate.load_or_compute_reference(path, reference, tokens, cfg, None, store)
    scores = evaluate.score(model, tokens, cfg, reference=cached)
    exact = _exact_kl(reference, model, tokens)
    slack = 1e-5 * (1 + exact.abs())  # fp32 sums in another order
    # per target: the top-k KL is a lower bound and the exact KL lies within the stated bound above it
    assert (scores.kl <= exact + slack).all()
    assert (exact <= scores.kl + scores.kl_bound + slack).all()
    assert (scores.kl_bound > 0).any()
    # the size is what the design says: an fp32 log-prob and an int32 id per kept token, the tail mass per target
    assert path.stat().st_size <= budget_mb * 2**20 + 96 * 4 * 4 + 8192
    assert path.stat().st_size < 96 * 8192 * 4 / 4  # far below the full form's


def _ask_for_entry(path: str, log_path: str, start_at: float) -> str:
    """One process asking for the cache entry: computing it appends a line to ``log_path``."""

    def compute() -> dict:
        with open(log_path, "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough that every other process arrives while this one computes
        return {"pid": os.getpid(), "payload": list(range(1000))}

    time.sleep(max(0.0, start_at - time.time()))
    from pathlib import Path

    cachefile.compute_once(
        Path(path),
        compute,
        write=lambda result, tmp: tmp.write_text(json.dumps(result)),
        read=lambda p: json.loads(p.read_text()),
    )
    return Path(path).read_bytes().hex()


def test_concurrent_processes_compute_a_cache_entry_once_and_read_the_same_bytes(tmp_path):
    path, log_path = tmp_path / "ref" / "entry.json", tmp_path / "computed.log"
    start_at = time.time() + 1.0  # all start together
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.starmap(_ask_for_entry, [(str(path), str(log_path), start_at)] * 4)
    assert len(log_path.read_text().split()) == 1  # one computed
    assert len(set(results)) == 1  # all read the same bytes
    assert sorted(p.name for p in path.parent.iterdir()) == ["entry.json", "entry.json.lock"]  # no temporary left


def test_a_failed_write_leaves_no_entry_and_no_temporary_file(tmp_path):
    path = tmp_path / "entry.json"

    def write(_result, tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cachefile.compute_once(path, lambda: {}, write, lambda p: p.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json.lock"]
    with pytest.raises(RuntimeError, match="boom"), cachefile.atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json.lock"]
