"""Intervals on synthetic data with a known answer: paired bootstraps, the t interval, speed noise."""

import math

import pytest
import torch
from conftest import tiny_llama

from pipeline import evaluate, profile, stats, tasks

CI = {"resamples": 1000, "seed": 0, "kl_block_tokens": 4}


def _scores(nll: torch.Tensor, window: torch.Tensor, logprobs: torch.Tensor) -> evaluate.Scores:
    """Scores whose KL targets (as many as ``logprobs`` rows) all agree with the reference: KL 0."""
    kl = torch.zeros(logprobs.shape[0])
    return evaluate.Scores(nll, torch.zeros_like(window), kl, window, kl_bound=kl)


def test_unit_sums_and_resampled_means_are_token_weighted():
    sums, counts = stats.unit_sums(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 1]))
    assert sums.tolist() == [4.0, 5.0] and counts.tolist() == [2.0, 1.0]
    # drawing unit 0 twice and unit 1 once: (4 + 4 + 5) / (2 + 2 + 1)
    assert stats.resampled_means(sums, counts, torch.tensor([[0, 0, 1]])).tolist() == [pytest.approx(13 / 5)]


def test_bootstrap_interval_of_a_mean_matches_the_normal_interval():
    # 400 independent units with sd 1: the mean's 95% interval is about +-1.96 / sqrt(400) = +-0.098
    values = torch.randn(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draws = values[stats.resample_indices(400, 4000, stats.seeded(0))].mean(-1)
    low, high = stats.percentile_interval(draws)
    half = 1.96 * float(values.std()) / 20
    assert low == pytest.approx(float(values.mean()) - half, abs=0.012)
    assert high == pytest.approx(float(values.mean()) + half, abs=0.012)


def test_paired_dppl_interval_is_tight_when_the_models_differ_by_a_constant():
    # 16 windows of very different difficulty; the model is worse by exactly 0.1 nats everywhere.
    # Unpaired, the window spread would dominate; paired, dppl is exactly 100 * (e^0.1 - 1).
    generator = torch.Generator().manual_seed(0)
    window = torch.arange(16).repeat_interleave(8)
    ref_nll = torch.rand(16, generator=generator).repeat_interleave(8) * 4
    logprobs = torch.log_softmax(torch.randn(32, 10, generator=generator), -1)
    reference = _scores(ref_nll, window, logprobs)
    metrics = evaluate.compare(_scores(ref_nll + 0.1, window, logprobs), reference, CI)
    expected = 100 * (math.exp(0.1) - 1)
    for key in ("dppl_pct", "dppl_pct_ci_low", "dppl_pct_ci_high"):
        assert metrics[key] == pytest.approx(expected, rel=1e-5)  # nll is float32
    assert metrics["ppl_ci_low"] < metrics["ppl"] < metrics["ppl_ci_high"]  # the model alone is not paired
    assert metrics["kl_vs_ref"] == metrics["kl_vs_ref_ci_low"] == metrics["kl_vs_ref_ci_high"] == 0.0
    again = evaluate.compare(_scores(ref_nll + 0.1, window, logprobs), reference, CI)
    assert again == metrics  # seeded: a rerun gives the same interval


def test_dppl_interval_resamples_windows_not_tokens():
    # Two windows: the model is better on one and worse on the other. Resampling windows, a draw
    # can hold only the worse window, so the interval reaches its full +-; resampling tokens would
    # average the two halves away.
    window = torch.tensor([0] * 50 + [1] * 50)
    ref_nll = torch.ones(100)
    nll = torch.cat([torch.full((50,), 0.5), torch.full((50,), 1.5)])
    logprobs = torch.log_softmax(torch.zeros(8, 4), -1)
    metrics = evaluate.compare(_scores(nll, window, logprobs), _scores(ref_nll, window, logprobs), CI)
    assert metrics["dppl_pct"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["dppl_pct_ci_low"] == pytest.approx(100 * (math.exp(-0.5) - 1))
    assert metrics["dppl_pct_ci_high"] == pytest.approx(100 * (math.exp(0.5) - 1))


def test_kl_blocks_never_cross_a_window():
    window = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2])
    assert evaluate.kl_blocks(window, 2).tolist() == [0, 0, 1, 1, 2, 3, 3, 4, 5]
    assert evaluate.kl_blocks(window, 64).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 2]


def test_paired_intervals_refuse_different_windows():
    logprobs = torch.log_softmax(torch.zeros(2, 4), -1)
    a = _scores(torch.ones(4), torch.tensor([0, 0, 1, 1]), logprobs)
    b = _scores(torch.ones(4), torch.tensor([0, 1, 1, 1]), logprobs)
    with pytest.raises(ValueError, match="same windows"):
        evaluate.compare(a, b, CI)


def test_score_records_the_window_of_every_target_and_the_protocol_string(llama):
    eval_cfg = {"context": 32, "stride": 16, "kl_tokens": 40, "batch_size": 2, "tokens": 128, "ci": CI}
    tokens = torch.randint(0, 512, (128,), generator=torch.Generator().manual_seed(0))
    scores = evaluate.score(llama, tokens, eval_cfg)
    assert scores.window.tolist() == [0] * 31 + [i for i in range(1, 7) for _ in range(16)]
    params = evaluate.protocol_params(eval_cfg, None)
    assert params["eval.bos_used"] == "false"
    assert "over 7 windows" in params["eval.ci_method"] and "B=1000" in params["eval.ci_method"]
    assert "over 11 blocks" in params["eval.ci_method"]  # kl: 31 -> 8 blocks of 4, then 9 -> 3


def test_acc_drop_interval_pairs_documents_and_aggregates_like_acc_avg():
    # copa (commonsense) and lambada (language_modeling): the model loses exactly doc 0 of 10 on
    # copa and nothing else. acc_avg = mean of groups, so the drop is (0.05 / ref_avg) wherever the
    # draw lands doc 0, and 0 where it does not.
    ref = {"copa": {str(i): 1.0 for i in range(10)}, "lambada": {str(i): float(i % 2) for i in range(10)}}
    model = {"copa": {**ref["copa"], "0": 0.0}, "lambada": dict(ref["lambada"])}
    out = tasks.acc_drop_interval(model, ref, resamples=2000, seed=0)
    assert out["acc_drop_pct_ci_low"] == 0.0 and out["acc_drop_pct_ci_high"] > 0
    assert out["acc_drop_significant"] == 0.0
    # every copa document lost: the drop is large and certain
    lost = {"copa": {str(i): 0.0 for i in range(10)}, "lambada": dict(ref["lambada"])}
    certain = tasks.acc_drop_interval(lost, ref, resamples=2000, seed=0)
    assert certain["acc_drop_pct_ci_low"] > 0 and certain["acc_drop_significant"] == 1.0
    same = tasks.acc_drop_interval(ref, ref, resamples=200, seed=0)
    assert same == {"acc_drop_pct_ci_low": 0.0, "acc_drop_pct_ci_high": 0.0, "acc_drop_significant": 0.0}
    with pytest.raises(ValueError, match="different documents"):
        tasks.acc_drop_interval({"copa": {"0": 1.0}}, {"copa": {"1": 1.0}}, resamples=200, seed=0)


def test_acc_drop_interval_matches_the_normal_approximation():
    # One task, 400 documents, discordant pairs: model right / ref wrong on 40, the reverse on 80.
    ref = {"copa": {str(i): float(i < 200) for i in range(400)}}
    model_docs = {str(i): float(i < 200) for i in range(400)}
    for i in range(80):
        model_docs[str(i)] = 0.0  # ref right, model wrong
    for i in range(200, 240):
        model_docs[str(i)] = 1.0  # ref wrong, model right
    out = tasks.acc_drop_interval({"copa": model_docs}, ref, resamples=4000, seed=0)
    # paired difference d in {-1, 0, 1}: mean 0.1, sd of the mean sqrt((120/400 - 0.01) / 400)
    se = math.sqrt((120 / 400 - 0.1**2) / 400)
    # drop % = 100 * d / 0.5 (the reference's measured accuracy)
    assert out["acc_drop_pct_ci_low"] == pytest.approx(200 * (0.1 - 1.96 * se), abs=1.5)
    assert out["acc_drop_pct_ci_high"] == pytest.approx(200 * (0.1 + 1.96 * se), abs=1.5)
    assert out["acc_drop_significant"] == 1.0


def test_group_and_average_stderr_propagate_for_unweighted_means():
    metrics = {
        "acc/hellaswag": 0.3,
        "acc_norm/hellaswag": 0.4,
        "acc_stderr/hellaswag": 0.9,  # not the score hellaswag counts by
        "acc_norm_stderr/hellaswag": 0.03,
        "acc/copa": 0.6,
        "acc_stderr/copa": 0.04,
        "acc/lambada": 0.25,
        "acc_stderr/lambada": 0.02,
    }
    out = tasks.aggregate(metrics)
    assert out["acc_stderr/commonsense"] == pytest.approx(math.sqrt(0.03**2 + 0.04**2) / 2)
    assert out["acc_stderr/language_modeling"] == pytest.approx(0.02)
    assert out["acc_avg_stderr"] == pytest.approx(math.sqrt(out["acc_stderr/commonsense"] ** 2 + 0.02**2) / 2)
    del metrics["acc_stderr/lambada"]  # a task without an error: its group and the average have none
    out = tasks.aggregate(metrics)
    assert "acc_stderr/language_modeling" not in out and "acc_avg_stderr" not in out


def test_t_interval_over_repeats():
    low, high = stats.log_ratio_t_interval([2.0, 2.0, 2.0])
    assert low == pytest.approx(2.0) and high == pytest.approx(2.0)
    # logs 0 and log 4: mean log 2, sd log(4)/sqrt 2, t(0.975, 1) = 12.706
    low, high = stats.log_ratio_t_interval([1.0, 4.0])
    half = 12.706 * (math.log(4) / math.sqrt(2)) / math.sqrt(2)
    assert math.log(low) == pytest.approx(math.log(2) - half, rel=1e-3)
    assert math.log(high) == pytest.approx(math.log(2) + half, rel=1e-3)
    with pytest.raises(ValueError, match="at least two positive ratios"):
        stats.log_ratio_t_interval([1.5])


def _timings(paired: list[float], self_ratio: float) -> tuple[list[float], list[float], list[float]]:
    """(ref A, model, ref B) per repeat whose mean(A, B) / model is ``paired`` and A / B ``self_ratio``."""
    ref_b = [2 / (1 + self_ratio)] * len(paired)
    return [self_ratio * b for b in ref_b], [1 / p for p in paired], ref_b


def test_speed_ratio_metrics_define_noise_and_win():
    # ref A / ref B reads 1.03 in every repeat: 3% noise; a 1.05x speed-up with a tight interval
    # clears it, a 1.02x one does not.
    win = profile._ratio_metrics("s", "n", "w", *_timings([1.05, 1.051, 1.049], 1.03))
    assert win["n"] == pytest.approx(3.0) and win["w"] == 1.0 and win["s_ci_low"] > 1.03
    inside = profile._ratio_metrics("s", "n", "w", *_timings([1.02, 1.021, 1.019], 1.03))
    assert inside["s_ci_low"] > 1.0 and inside["w"] == 0.0
    single = profile._ratio_metrics("s", "n", "w", *_timings([1.5], 1.0))
    assert set(single) == {"s", "n"}  # one repeat: no interval, no verdict


def test_speed_metrics_time_the_reference_against_itself():
    model, reference = tiny_llama(seed=1), tiny_llama(seed=2)
    tokens = torch.randint(0, 512, (64,))
    cfg = {"threads": 1, "prompt_tokens": 8, "decode_tokens": 3, "batch_sizes": [1, 2], "warmup": 0, "repeats": 3}
    m = profile.speed_metrics(model, reference, tokens, cfg)
    for suffix in ("", "_b2"):
        for prefix in ("", "prefill_"):
            low, point, high = (m[f"{prefix}speedup_vs_ref{suffix}{end}"] for end in ("_ci_low", "", "_ci_high"))
            assert 0 < low <= high and point > 0
            assert m[f"{prefix}speed_noise_pct{suffix}"] >= 0 and m[f"{prefix}speedup_is_win{suffix}"] in (0.0, 1.0)
    assert "repeats" in profile.ci_method(cfg)
