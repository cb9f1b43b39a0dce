"""Stage tests on tiny models built from configs (no download, seconds each)."""

import itertools
import math

import pytest
import torch
from conftest import layers_cfg, method_cfg, tiny_llama

from pipeline import bandwidth, calibrate, evaluate, layers, profile, quantize, reference_store, steps
from pipeline.quant.kernels import cpp
from pipeline.quant.linear import QuantLinear

METHODS = [
    "fp",
    "ptq_static",
    "ptq_dynamic",
    "weight_only",
    "per_tensor",
    "symmetric",
    "group_wise",
    "per_channel",
    "asymmetric",
]


def _stats(model, names, seed=0):
    batches = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(seed))
    return calibrate.collect_activation_stats(model, names, batches, seed=seed)


def test_no_two_presets_are_the_same_config():
    configs = {name: {k: v for k, v in method_cfg(name).items() if k not in ("name", "family")} for name in METHODS}
    for a, b in itertools.combinations(METHODS, 2):
        assert configs[a] != configs[b], f"{a} and {b} are the same configuration"


def test_default_selection_is_every_decoder_linear_and_keeps_lm_head(llama):
    selected, kept = layers.select_layers(llama, layers_cfg())
    assert len(selected) == 2 * 7  # q k v o gate up down per block
    assert kept == {"model.embed_tokens.weight": layers.INPUT_EMBEDDING, "lm_head": layers.LM_HEAD}
    selected, kept = layers.select_layers(llama, layers_cfg("layers.exclude=[.*mlp.*]"))
    assert len(selected) == 2 * 4
    assert {k for k, reason in kept.items() if reason == "matched by layers.exclude"} == {
        f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj", "down_proj")
    }


def test_selection_that_matches_nothing_says_what_layers_exist(llama):
    with pytest.raises(ValueError, match=r"no layer matches .* named like: .*q_proj"):
        layers.select_layers(llama, layers_cfg("layers.include=[nothing]"))


@pytest.mark.parametrize("name", METHODS)
def test_every_preset_quantizes_and_runs(name, llama):
    method = method_cfg(name)
    names = list(layers.select_layers(llama, layers_cfg())[0])
    stats = _stats(llama, names) if steps.needs_calibration(method) else None
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    before = llama(input_ids=ids).logits
    batches = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(4))
    records = quantize.quantize_model(llama, method, layers_cfg(), stats, calibration=batches)
    after = llama(input_ids=ids).logits
    assert torch.isfinite(after).all()
    quantized = [r for r in records if r.quantized]
    if name == "fp":
        assert not quantized and torch.equal(before, after)
        return
    assert len(quantized) == 14 and all(r.kernel and r.rel_error > 0 for r in quantized)
    assert sum(isinstance(m, QuantLinear) for m in llama.modules()) == 14
    assert not torch.equal(before, after)
    # 8-bit methods stay close to the reference; 4-bit ones less so, but still the same model
    assert (after - before).norm() / before.norm() < {8: 0.05, 4: 0.5, 2: 1.0}[method["bits"]]


def test_group_size_that_does_not_divide_names_the_layer_and_valid_sizes(llama):
    with pytest.raises(
        ValueError, match=r"group_size 48 does not divide in_features 64 of layer .*q_proj.*: 8, 16, 32, 64"
    ):
        quantize.quantize_model(llama, method_cfg("group_wise", "method.group_size=48"), layers_cfg())
    assert not any(isinstance(m, QuantLinear) for m in llama.modules()), "nothing replaced before the check"


def test_group_size_on_a_per_channel_method_is_an_error():
    with pytest.raises(ValueError, match="only applies to granularity=group"):
        quantize.check_granularity(method_cfg("per_channel", "method.group_size=64"))


def test_override_bits_and_granularity_on_any_method(llama):
    method = method_cfg("per_channel", "method.bits=3", "method.granularity=group", "method.group_size=32")
    records = quantize.quantize_model(llama, method, layers_cfg())
    kernel = "lowbit_cpu" if cpp.build("lowbit_cpu").ok else "dequant"  # the fused 3-bit kernel, where it was built
    assert {(r.bits, r.block_size, r.kernel) for r in records if r.quantized} == {(3, "(1, 32)", kernel)}


def test_observers_order_and_static_scale(llama):
    names = list(layers.select_layers(llama, layers_cfg())[0])
    stats = _stats(llama, names)
    s = stats[names[0]]
    spec = quantize.activation_quant(method_cfg("ptq_static")).spec
    minmax = calibrate.observe_range(s, spec, "minmax")[1]
    assert minmax == pytest.approx(s.absmax)
    assert calibrate.observe_range(s, spec, "percentile", 99.0)[1] < minmax
    assert calibrate.observe_range(s, spec, "mse")[1] <= minmax
    with pytest.raises(ValueError, match="allowed: minmax, percentile, mse"):
        calibrate.observe_range(s, spec, "kl")


def test_calibration_is_reproducible(llama):
    names = list(layers.select_layers(llama, layers_cfg())[0])[:2]
    a, b = _stats(llama, names, seed=5), _stats(llama, names, seed=5)
    assert torch.equal(torch.cat(a[names[0]].samples), torch.cat(b[names[0]].samples))


def test_windows_score_every_target_once():
    assert evaluate.windows(1024, 512, 512) == [(0, 512, 1), (512, 1024, 1)]
    spans = evaluate.windows(1024, 512, 256)
    assert spans == [(0, 512, 1), (256, 768, 256), (512, 1024, 256)]
    with pytest.raises(ValueError, match="stride"):
        evaluate.windows(1024, 512, 600)
    with pytest.raises(ValueError, match="at least eval.context"):
        evaluate.windows(100, 512, 512)


def test_scores_against_itself_and_against_a_quantized_copy(llama):
    eval_cfg = {"context": 32, "stride": 32, "kl_tokens": 40, "batch_size": 2}
    tokens = torch.randint(0, 512, (128,), generator=torch.Generator().manual_seed(0))
    ref = evaluate.score(llama, tokens, eval_cfg, store=reference_store.Store(None))
    assert ref.nll.numel() == 4 * 31 and ref.distribution.logprobs.shape == (40, 512)
    same = evaluate.compare(ref, ref)
    assert same["kl_vs_ref"] == 0 and same["top1_agree"] == 1 and same["ppl"] == same["ppl_ref"]
    quantize.quantize_model(llama, method_cfg("group_wise", "method.bits=2", "method.group_size=32"), layers_cfg())
    worse = evaluate.compare(evaluate.score(llama, tokens, eval_cfg, reference=ref), ref)
    assert worse["kl_vs_ref"] > 0 and worse["ppl"] != worse["ppl_ref"] and worse["top1_agree"] <= 1


def test_context_longer_than_the_model_is_refused():
    with pytest.raises(ValueError, match="exceeds the model's maximum of 256"):
        evaluate.check_protocol({"context": 512, "stride": 512, "tokens": 1024, "kl_tokens": 8}, 256)


def test_memory_counts_packed_storage(llama):
    n_params, ref_bytes = profile.parameter_footprint(llama)
    fp = profile.memory_metrics(llama, n_params, ref_bytes)
    assert fp["compression_ratio"] == 1 and fp["bits_per_weight"] == 32
    quantize.quantize_model(llama, method_cfg("group_wise"), layers_cfg())
    q = profile.memory_metrics(llama, n_params, ref_bytes)
    assert q["bits_per_weight"] == pytest.approx(4 + 16 / 64 + 4 / 64)
    linear_weights = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)
    # The tied embedding (once) and the norms are stored in layers.keep_dtype (bfloat16): 2 bytes each,
    # not the 4 of the fp32 model they were loaded from.
    embedding_bytes, norm_bytes = 512 * 64 * 2, (2 * 2 + 1) * 64 * 2
    assert q["weight_bytes"] == pytest.approx(linear_weights * 4.3125 / 8 + embedding_bytes + norm_bytes)
    assert (q["embedding_bytes"], q["kept_bytes"]) == (embedding_bytes, norm_bytes)
    assert q["quantized_bytes"] == pytest.approx(linear_weights * 4.3125 / 8)
    assert q["mem_reduction_vs_fp16_pct"] == pytest.approx(100 * (1 - q["weight_bytes"] / (2 * n_params)))
    assert q["compression_ratio"] > 1


def test_speed_metrics_give_ratios(llama):
    reference = tiny_llama()
    tokens = torch.randint(0, 512, (64,))
    cfg = {"threads": 1, "prompt_tokens": 8, "decode_tokens": 3, "batch_sizes": [1, 2], "warmup": 0, "repeats": 1}
    m = profile.speed_metrics(llama, reference, tokens, cfg)
    for key in ("prefill_ms", "decode_tok_s", "speedup_vs_ref", "decode_tok_s_b2", "speedup_vs_ref_b2"):
        assert m[key] > 0


def test_speed_against_the_reference_timed_before_quantizing_gives_the_same_metrics(llama):
    """profile.reference=before_quantize: the float model timed first, the quantized one alone later; the
    same metric names as the interleaved (reload) timing, and the floor from the reference's bytes."""
    reference = tiny_llama()
    tokens = torch.randint(0, 512, (64,))
    cfg = {"threads": 1, "prompt_tokens": 8, "decode_tokens": 3, "batch_sizes": [1, 2], "warmup": 0, "repeats": 2}
    interleaved = profile.speed_metrics(llama, reference, tokens, cfg)
    timing = profile.time_reference(reference, tokens, {**cfg, "energy": {"source": "estimate", "watts_per_core": 4.4}})
    assert timing.bytes_read_per_token == bandwidth.bytes_read_per_token(reference)
    before = profile.speed_metrics(llama, timing, tokens, cfg)
    assert set(before) == set(interleaved)
    assert all(before[k] > 0 for k in ("decode_tok_s", "decode_tok_s_ref_b2", "speedup_vs_ref_ci_low"))


@pytest.mark.parametrize("weights_mb,mode", [(100, "reload"), (10**7, "before_quantize")])
def test_auto_profile_reference_reloads_only_what_fits(weights_mb, mode):
    cfg = {"reference": "auto"}
    assert profile.reference_mode(cfg, weights_mb * 2**20, torch.device("cpu")) == mode
    assert profile.reference_mode({"reference": "reload"}, 10**15, torch.device("cpu")) == "reload"
    with pytest.raises(ValueError, match="profile.reference must be one of auto, reload, before_quantize"):
        profile.check_reference_mode({"reference": "twice"})


def test_peak_rss_resets():
    profile.reset_peak_rss()
    low = profile.peak_rss_mb()
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB touched
    assert profile.peak_rss_mb() >= low + 60
    del block


def test_peak_rss_starts_from_live_memory_not_from_what_was_freed():
    # Many small tensors live on the heap; with the last one kept the heap cannot shrink by itself.
    chunks = [torch.ones(32 * 2**10, dtype=torch.uint8) for _ in range(8192)]  # 256 MiB touched
    rss_full = profile._status_mb("VmRSS")
    del chunks[:-1]
    assert profile.reset_peak_rss() < rss_full - 150  # the freed 256 MiB went back to the OS
    assert profile.peak_rss_mb() < rss_full - 150


def test_perplexity_by_context_length(llama):
    tokens = torch.randint(0, 512, (256,), generator=torch.Generator().manual_seed(0))
    ppl = evaluate.perplexity_by_context(llama, tokens, [32, 128], tokens_per_batch=128)
    eval_cfg = {"context": 128, "stride": 128, "kl_tokens": 8, "batch_size": 1}
    assert ppl["ppl_ctx/128"] == pytest.approx(math.exp(float(evaluate.score(llama, tokens, eval_cfg).nll.mean())))
    assert set(ppl) == {"ppl_ctx/32", "ppl_ctx/128"}
    with pytest.raises(ValueError, match="exceeds the model's maximum of 256"):
        evaluate.check_protocol(
            {"context": 64, "stride": 64, "tokens": 4096, "kl_tokens": 8, "context_lengths": [128, 512]}, 256
        )


def test_aggregate_repeats():
    from pipeline.run import aggregate_repeats

    out = aggregate_repeats([{"ppl": 10.0, "kl": 1.0, "run_id": "a"}, {"ppl": 14.0, "run_id": "b"}])
    assert out == {"ppl_mean": 12.0, "ppl_std": pytest.approx(2.8284271)}


HQQ = "{iters: 20, lp_norm: 0.7, beta: 10.0, kappa: 1.01}"


@pytest.mark.parametrize(
    "name,overrides,described",
    [
        ("activation_aware", [], "awq_scales+clip+rtn"),
        ("activation_aware", ["method.awq.clip=false"], "awq_scales+rtn"),
        ("w2_group", [], "awq_scales+clip+gptq(act_order)"),
        ("gptq", [], "gptq"),
        ("qat", [], "qat(lsq,kd)+rtn"),
        ("qat", ["method.train.learnable_scale=false", "method.train.loss=ce"], "qat(minmax,ce)+rtn"),
        ("lowrank_w4", [], "lowrank(rank=16)+rtn"),
        ("w2_group", ["method.steps=[hqq]", "method.awq=null", "method.gptq=null", f"+method.hqq={HQQ}"], "hqq"),
        ("group_wise", [], "rtn"),
        ("fp", [], "none"),
    ],
)
def test_algorithm_description_names_every_step_that_runs(name, overrides, described):
    assert steps.describe_steps(method_cfg(name, *overrides)) == described


def test_run_tags_name_what_ran_and_keep_the_configured_steps(tmp_path):
    from conftest import compose_cfg

    from pipeline import run

    cfg = compose_cfg("method=activation_aware", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    _, _, tags, _ = run.prepare(cfg, ["method=activation_aware"])
    assert tags["algorithm"] == "awq_scales+clip+rtn" and list(cfg.method.steps) == ["awq", "rtn"]
