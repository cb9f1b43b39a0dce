"""The perplexity protocol's BOS: each window starts the way the model expects, scored targets unchanged."""

import pytest
import torch
from conftest import tiny_llama
from torch.nn import functional as F

from pipeline import evaluate

EVAL = {
    "context": 16,
    "stride": 8,
    "kl_tokens": 20,
    "batch_size": 2,
    "tokens": 64,
    "reference_store": "auto",
    "reference_cache_max_mb": 16,
}


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The embedded tokenizer told to add its BOS, as Gemma's and Llama's do by default."""
    from transformers import AutoTokenizer

    from pipeline.assets import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir(), add_bos_token=True)


def _recording(model):
    seen = []
    model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True)
    return seen


def test_auto_follows_the_tokenizer(tokenizer, bos_tokenizer):
    # SmolLM2 under transformers 5 adds no BOS: auto keeps the windows (and the numbers) as they were
    assert evaluate.resolve_bos(tokenizer, "auto") is None
    assert evaluate.resolve_bos(bos_tokenizer, "auto") == bos_tokenizer.bos_token_id == 1
    assert evaluate.resolve_bos(tokenizer, True) == 1 and evaluate.resolve_bos(bos_tokenizer, False) is None
    with pytest.raises(ValueError, match="eval.bos must be one of auto, true, false; got 'yes'"):
        evaluate.resolve_bos(tokenizer, "yes")


def test_bos_true_without_a_bos_token_is_refused():
    class NoBos:
        bos_token_id = None

    with pytest.raises(ValueError, match="defines no bos_token"):
        evaluate.resolve_bos(NoBos(), True)


def test_without_bos_the_windows_and_numbers_are_unchanged(tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer), seed=3)
    seen = _recording(model)
    tokens = torch.randint(3, len(tokenizer), (64,), generator=torch.Generator().manual_seed(0))
    bos = evaluate.resolve_bos(tokenizer, "auto")
    scores = evaluate.score(model, tokens, EVAL, bos)
    spans = evaluate.windows(64, 16, 8)
    assert torch.equal(torch.cat(seen), torch.stack([tokens[b:e] for b, e, _ in spans]))
    # the same numbers as the protocol before eval.bos (no BOS argument at all)
    assert torch.equal(scores.nll, evaluate.score(model, tokens, EVAL).nll)


def test_bos_starts_every_window_and_the_same_targets_are_scored():
    model = tiny_llama(seed=4)
    seen = _recording(model)
    tokens = torch.randint(3, 512, (64,), generator=torch.Generator().manual_seed(1))
    plain = evaluate.score(model, tokens, EVAL)
    seen.clear()
    with_bos = evaluate.score(model, tokens, EVAL, bos_token_id=1)
    spans = evaluate.windows(64, 16, 8)
    inputs = torch.cat(seen)
    assert inputs.shape == (len(spans), 17) and (inputs[:, 0] == 1).all()
    assert torch.equal(inputs[:, 1:], torch.stack([tokens[b:e] for b, e, _ in spans]))
    assert with_bos.nll.shape == plain.nll.shape and torch.equal(with_bos.window, plain.window)
    assert with_bos.bos_token_id == 1 and not torch.equal(with_bos.nll, plain.nll)  # the BOS is seen as context
    # each scored target is the window's token j (first <= j < len), predicted from BOS + tokens before it
    expected = []
    with torch.no_grad():
        for b, e, first in spans:
            ids = torch.cat([torch.tensor([1]), tokens[b:e]])
            logprobs = F.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
            expected += [-logprobs[j, tokens[b + j]] for j in range(first, e - b)]
    assert torch.allclose(with_bos.nll, torch.stack(expected), atol=1e-5)


def test_perplexity_by_context_puts_the_bos_before_each_window():
    model = tiny_llama(seed=5)
    seen = _recording(model)
    tokens = torch.randint(3, 512, (64,), generator=torch.Generator().manual_seed(2))
    plain = evaluate.perplexity_by_context(model, tokens, [16], tokens_per_batch=64)
    seen.clear()
    with_bos = evaluate.perplexity_by_context(model, tokens, [16], tokens_per_batch=64, bos_token_id=1)
    (inputs,) = seen
    assert inputs.shape == (4, 17) and (inputs[:, 0] == 1).all() and torch.equal(inputs[:, 1:], tokens.reshape(4, 16))
    # BOS + disjoint windows of 16 = the strided protocol with context 16 and the same BOS
    strided = evaluate.score(model, tokens, {**EVAL, "stride": 16}, bos_token_id=1)
    assert with_bos["ppl_ctx/16"] == pytest.approx(float(strided.nll.mean().exp()), rel=1e-5)
    assert with_bos["ppl_ctx/16"] != plain["ppl_ctx/16"]


def test_window_plus_bos_must_fit_the_model():
    cfg = {
        **EVAL,
        "context": 256,
        "tokens": 512,
        "bos": "auto",
        "ci": {"resamples": 1000, "seed": 0, "kl_block_tokens": 64},
    }
    evaluate.check_protocol(cfg, 256, None)
    with pytest.raises(ValueError, match=r"eval.context 256 plus the BOS token exceeds .* 256 .*eval.context=255"):
        evaluate.check_protocol(cfg, 256, 1)
    with pytest.raises(ValueError, match=r"context_lengths entry 256 plus the BOS token exceeds"):
        evaluate.check_protocol({**cfg, "context": 64, "context_lengths": [256]}, 256, 1)
    with pytest.raises(ValueError, match="eval.bos must be one of auto, true, false"):
        evaluate.check_protocol({**cfg, "context": 64, "bos": "sometimes"}, 256, None)
    with pytest.raises(ValueError, match="eval.ci.resamples must be an integer >= 100"):
        evaluate.check_protocol({**cfg, "context": 64, "ci": {**cfg["ci"], "resamples": 10}}, 256, None)


def test_reference_cache_is_keyed_by_the_bos_and_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    data = {"corpora": {"wikipedia": {"kind": "builtin"}}, "evaluation": {"corpus": "wikipedia"}}
    cfg = {**EVAL, "add_special_tokens": False}
    without = evaluate.reference_cache_path(str(tmp_path), "float32", cfg, data, None)
    with_bos = evaluate.reference_cache_path(str(tmp_path), "float32", cfg, data, 1)
    assert without != with_bos
    model = tiny_llama(seed=6)
    tokens = torch.randint(3, 512, (64,), generator=torch.Generator().manual_seed(3))
    computed = evaluate.load_or_compute_reference(with_bos, model, tokens, cfg, 1)
    cached = evaluate.load_or_compute_reference(with_bos, model, tokens, cfg, 1)
    assert torch.equal(cached.nll, computed.nll) and torch.equal(cached.window, computed.window)
    assert cached.bos_token_id == 1
    # the tuning probe scores its prefix the way the reference was scored
    proxy = evaluate.kl_on_prefix(model, tokens[:32], cached, cfg)
    assert proxy == pytest.approx(0.0, abs=1e-6)
