"""Greedy generation and its agreement metrics."""

import pytest
import torch

from pipeline import generation
from tests.conftest import tiny_llama


def test_greedy_matches_transformers_generate():
    model = tiny_llama().eval()
    prompt = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = generation.greedy(model, prompt, 6)
    theirs = model.generate(prompt, do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    assert [g.tokens for g in ours] == theirs[:, 7:].tolist()


def test_repetition_rate_and_first_divergence():
    assert generation.repetition_rate([1, 2, 3, 4, 5]) == 0.0
    assert generation.repetition_rate([7, 7, 7, 7, 7]) == pytest.approx(2 / 3)  # 3 trigrams, 1 distinct
    assert generation.repetition_rate([1, 2]) == 0.0  # shorter than one n-gram
    assert generation.first_divergence([1, 2, 3], [1, 2, 3]) == 3
    assert generation.first_divergence([1, 9, 3], [1, 2, 3]) == 1


def test_agreement_against_the_reference():
    reference = [[1, 2, 3, 4], [5, 6, 7, 8]]
    metrics = generation.agreement([[1, 2, 9, 4], [5, 6, 7, 8]], reference)
    assert metrics["gen_match_rate"] == pytest.approx(7 / 8)
    assert metrics["gen_first_divergence"] == pytest.approx((2 + 4) / 2)
    assert metrics["gen_repetition_rate"] == 0.0 and metrics["ref_gen_degenerate_frac"] == 0.0
    looping = generation.agreement([[1, 1, 1, 1], [5, 6, 7, 8]], reference)
    assert looping["gen_degenerate_frac"] == 0.5
    with pytest.raises(ValueError, match="differ in number or length"):
        generation.agreement([[1, 2, 3]], reference)


def test_generate_from_text_prompts(tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer)).eval()
    out = generation.generate(model, tokenizer, ["Hello there", "Another prompt"], 5)
    assert [len(g) for g in out] == [5, 5]
    texts = generation.samples(tokenizer, ["Hello there", "Another prompt"], out, out)
    assert texts[0]["first_divergence"] == 5 and texts[0]["output"] == texts[0]["reference"]
    with pytest.raises(ValueError, match="new_tokens must be >= 1"):
        generation.generate(model, tokenizer, ["Hello"], 0)
