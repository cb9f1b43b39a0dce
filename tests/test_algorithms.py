"""The calibration-driven methods on tiny models: the property that defines each, and bad input."""

import copy

import pytest
import torch
from conftest import layers_cfg, method_cfg, tiny_llama

from pipeline import layers, quantize, steps, train
from pipeline.algorithms import awq, lowrank, sequential
from pipeline.quant.primitives import QuantSpec

BATCHES = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))


def outlier_llama():
    """A tiny Llama whose norms create a few large activation channels, as real LLMs have."""
    model = tiny_llama()
    with torch.no_grad():
        for block in model.model.layers:
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight[:4] = 20.0
    return model


def _logit_error(model, reference):
    with torch.no_grad():
        return float((model(input_ids=BATCHES).logits - reference).norm() / reference.norm())


def test_decoder_blocks_and_recorded_inputs():
    model = tiny_llama()
    prefix, blocks = sequential.decoder_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 2
    names = list(layers.select_layers(model, layers_cfg())[0])
    seen = {}
    sequential.run_blocks(model, names, BATCHES, lambda b, inputs, _s, _f: seen.update(inputs), hessian=True)
    q, o, down = (seen[f"model.layers.0.{n}"] for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"))
    assert q.producer == "input_layernorm" and o.producer is None and down.producer is None
    assert q.hessian.hessian.shape == (64, 64) and down.hessian.hessian.shape == (128, 128)
    assert q.rows == 8 * 32 and q.channel_abs_mean.shape == (64,) and (q.channel_abs_mean > 0).all()


def test_awq_scale_search_beats_no_scaling_on_outlier_channels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=gen)
    x[:, :4] *= 30
    w = torch.randn(64, 128, generator=gen)
    s, errors = awq.search_scale(x.T @ x, x.abs().mean(0), [w], QuantSpec(4, False), [(1, 32)], grid=20)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert min(errors) < 0.9 * errors[0]  # errors[0] is alpha = 0: plain RTN


def test_awq_keeps_the_function_at_8_bits_and_beats_rtn_at_3():
    """Folding into norms and explicit input scales must not change what the model computes."""
    model = outlier_llama()
    with torch.no_grad():
        reference = model(input_ids=BATCHES).logits
    near_lossless = copy.deepcopy(model)
    records = quantize.quantize_model(
        near_lossless, method_cfg("activation_aware", "method.bits=8"), layers_cfg(), calibration=BATCHES
    )
    assert _logit_error(near_lossless, reference) < 0.02
    assert any(r.weight_bytes > 0 for r in records)
    errors = {}
    for name in ("group_wise", "activation_aware"):
        m = copy.deepcopy(model)
        quantize.quantize_model(
            m, method_cfg(name, "method.bits=3", "method.group_size=32"), layers_cfg(), calibration=BATCHES
        )
        errors[name] = _logit_error(m, reference)
    assert errors["activation_aware"] < errors["group_wise"]


def test_awq_counts_explicit_input_scales():
    model = tiny_llama()
    quantize.quantize_model(model, method_cfg("activation_aware"), layers_cfg(), calibration=BATCHES)
    o_proj, q_proj = model.model.layers[0].self_attn.o_proj, model.model.layers[0].self_attn.q_proj
    assert q_proj.input_scale is None  # folded into input_layernorm
    assert o_proj.input_scale is not None and o_proj.input_scale.dtype == torch.float16
    rtn = tiny_llama()
    quantize.quantize_model(rtn, method_cfg("group_wise"), layers_cfg())
    assert o_proj.weight_bytes == rtn.model.layers[0].self_attn.o_proj.weight_bytes + 64 * 2


def test_gptq_beats_rtn_on_the_model_output():
    model = outlier_llama()
    with torch.no_grad():
        reference = model(input_ids=BATCHES).logits
    errors = {}
    for name, extra in (("group_wise", []), ("gptq", []), ("gptq_act_order", ["method.gptq.act_order=true"])):
        m = copy.deepcopy(model)
        method = method_cfg("group_wise" if name == "group_wise" else "gptq", "method.bits=3", *extra)
        quantize.quantize_model(m, method, layers_cfg(), calibration=BATCHES)
        errors[name] = _logit_error(m, reference)
    assert errors["gptq"] < errors["group_wise"] and errors["gptq_act_order"] < errors["group_wise"]


def test_sequential_methods_need_calibration_and_block_layers():
    with pytest.raises(ValueError, match="needs calibration batches"):
        quantize.quantize_model(tiny_llama(), method_cfg("gptq"), layers_cfg())
    model = tiny_llama()
    model.model.adapter = torch.nn.Linear(64, 64)  # a linear layer of the decoder outside its blocks
    with pytest.raises(ValueError, match="model.adapter is outside model.layers"):
        quantize.quantize_model(
            model,
            method_cfg("gptq"),
            layers_cfg(r"layers.include=['.*layers\.\d+\..*','model\.adapter']"),
            calibration=BATCHES,
        )


def test_lowrank_counts_its_factors_and_improves_with_rank():
    errors, sizes = {}, {}
    for rank in (2, 8, 24):
        m = tiny_llama()
        records = quantize.quantize_model(m, method_cfg("lowrank_w4", f"method.lowrank.rank={rank}"), layers_cfg())
        q = [r for r in records if r.quantized]
        errors[rank] = sum(r.rel_error for r in q)
        sizes[rank] = sum(r.weight_bytes for r in q)
    assert errors[2] > errors[8] > errors[24] and sizes[2] < sizes[8] < sizes[24]
    # rank 8 on a 64x64 layer adds 8 * (64 + 64) fp16 values
    assert sizes[8] - sizes[2] == 6 * 2 * sum(
        o + i for o, i in [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2
    )


def test_lowrank_rank_larger_than_the_layer_is_refused():
    with pytest.raises(ValueError, match=r"rank must be in 1\.\.63 for a layer of shape"):
        quantize.quantize_model(tiny_llama(), method_cfg("lowrank_w4", "method.lowrank.rank=100"), layers_cfg())


def test_w2_group_beats_2_bit_rtn_and_layer_overrides_keep_layers_wider():
    model = outlier_llama()
    with torch.no_grad():
        reference = model(input_ids=BATCHES).logits
    rtn, w2 = copy.deepcopy(model), copy.deepcopy(model)
    quantize.quantize_model(rtn, method_cfg("group_wise", "method.bits=2", "method.group_size=32"), layers_cfg())
    quantize.quantize_model(w2, method_cfg("w2_group"), layers_cfg(), calibration=BATCHES)
    assert _logit_error(w2, reference) < _logit_error(rtn, reference)
    records = quantize.quantize_model(
        tiny_llama(),
        method_cfg("w2_group", "method.layer_overrides=[{pattern: '.*down_proj', bits: 4}]"),
        layers_cfg(),
        calibration=BATCHES,
    )
    bits = {r.layer.rsplit(".", 1)[-1]: r.bits for r in records if r.quantized}
    assert bits["down_proj"] == 4 and bits["q_proj"] == 2


# w2_group without its AWQ and GPTQ steps, with HQQ's options (the ones w2_group.yaml's comment names)
HQQ_ALONE = ("method.awq=null", "method.gptq=null", "+method.hqq={iters: 20, lp_norm: 0.7, beta: 10.0, kappa: 1.01}")


def test_hqq_lowers_the_weight_error_of_float_zero_rtn():
    hqq_method = ("method.steps=[hqq]", "method.zero_point_domain=float", *HQQ_ALONE)
    errors = {}
    rtn_method = ("method.steps=[rtn]", "method.zero_point_domain=float", "method.awq=null", "method.gptq=null")
    for name, overrides in (("rtn", rtn_method), ("hqq", hqq_method)):
        records = quantize.quantize_model(tiny_llama(), method_cfg("w2_group", *overrides), layers_cfg())
        errors[name] = sum(r.rel_error for r in records if r.quantized)
    assert errors["hqq"] < errors["rtn"]


def test_hqq_refuses_an_integer_zero_point():
    with pytest.raises(ValueError, match="zero_point_domain=float"):
        quantize.quantize_model(tiny_llama(), method_cfg("w2_group", "method.steps=[hqq]", *HQQ_ALONE), layers_cfg())


def test_a_qat_step_changes_weights_and_scales_and_lowers_the_loss():
    model = tiny_llama()
    selected, _ = layers.select_layers(model, layers_cfg())
    method = method_cfg(
        "qat", "method.train.steps=8", "method.train.lr=1e-3", "method.train.loss=ce", "method.train.warmup_fraction=0"
    )
    fakes = train.prepare(model, selected, method, True, layers.float_weight, quantize.weight_spec(method))
    batch = BATCHES[:2]
    fake = next(iter(fakes.values()))
    weight, scale = fake.weight.detach().clone(), fake.scale.detach().clone()
    with torch.no_grad():
        before = float(train.loss_on(model, batch, "ce"))
    logged = []
    losses = train.fit(model, fakes, batch, method["train"], seed=0, log_step=lambda s, m: logged.append((s, m)))
    with torch.no_grad():
        after = float(train.loss_on(model, batch, "ce"))
    assert after < before and len(losses) == 8 and {"train_loss", "lr"} <= set(logged[0][1])
    assert not torch.equal(fake.weight, weight) and not torch.equal(fake.scale, scale)
    assert all(p.grad is None for n, p in model.named_parameters() if "embed" in n)
    # conversion packs what training converged to: rtn rounds each layer onto its trained grid
    trained = steps.ModelResult(fixed_grid_layers=frozenset(fakes))
    records = quantize.quantize_model(model, method, layers_cfg(), prepared=trained)
    assert sum(r.quantized for r in records) == 14
    with torch.no_grad():
        packed = float(train.loss_on(model, batch, "ce"))
    assert packed == pytest.approx(after, rel=0.05)


@pytest.mark.parametrize("bits", [2, 3])
def test_qat_runs_at_low_bits_with_distillation(bits):
    model = tiny_llama()
    method = method_cfg("qat", f"method.bits={bits}", "method.group_size=32", "method.train.steps=2")
    selected, _ = layers.select_layers(model, layers_cfg())
    fakes = train.prepare(model, selected, method, False, layers.float_weight, quantize.weight_spec(method))
    losses = train.fit(model, fakes, BATCHES, method["train"], seed=0)
    assert len(losses) == 2 and all(loss >= 0 for loss in losses)


def test_the_distillation_teacher_is_the_float_model_in_the_same_memory():
    """QAT's teacher is the student with its original weights: the float model's logits exactly, after
    training moved the student, and without a copy of any weight."""
    model, float_model = tiny_llama(), tiny_llama()
    method = method_cfg("qat", "method.train.steps=3", "method.train.lr=1e-2")
    selected, _ = layers.select_layers(model, layers_cfg())
    loaded = {name: layers.float_weight(module) for name, module in selected.items()}
    fakes = train.prepare(model, selected, method, True, layers.float_weight, quantize.weight_spec(method))
    train.fit(model, fakes, BATCHES, method["train"], seed=0)
    batch = BATCHES[:2]
    with torch.no_grad():
        expected = float_model(input_ids=batch).logits
        student = model(input_ids=batch).logits
    with train.float_teacher(model, fakes) as teacher:
        taught = teacher(input_ids=batch).logits
    assert torch.equal(taught, expected)
    assert not torch.allclose(student, expected)  # the student itself is quantized and trained
    assert all(fakes[n].teacher_weight.data_ptr() == loaded[n].data_ptr() for n in fakes)  # no copy
    assert model.training is False and not any(f.as_float for f in fakes.values())


@pytest.mark.parametrize(
    "override,message",
    [
        ("method.train.steps=0", "steps > 0"),
        ("method.train.loss=mse", "loss must be one of ce, kd"),
        ("method.train.lr=0", "lr must be positive"),
    ],
)
def test_bad_qat_settings_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        train.check_options(method_cfg("qat", override)["train"])


def test_awq_scores_output_error_exactly_through_the_gram_matrix():
    gen = torch.Generator().manual_seed(1)
    x, diff = torch.randn(300, 16, generator=gen, dtype=torch.float64), torch.randn(8, 16, generator=gen)
    direct = float((x @ diff.double().T).pow(2).sum())
    assert awq._output_error((x.T @ x).float(), diff) == pytest.approx(direct, rel=1e-4)


def tiny_gpt2():
    """GPT-2 keeps its weights in transformers' Conv1D, as (in, out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("build", [tiny_gpt2, outlier_llama], ids=["gpt2_conv1d", "llama_linear"])
def test_awq_scaling_and_folding_keep_the_float_function(build):
    """AWQ's rescaling alone (no clipping, no rounding) must leave the float model's outputs unchanged."""
    model = build()
    with torch.no_grad():
        reference = model(input_ids=BATCHES).logits
    names = list(layers.select_layers(model, layers_cfg())[0])
    method = method_cfg("activation_aware")
    spec = quantize.weight_spec(method)
    options = {**method["awq"], "clip": False}
    folded = {}

    def scale_block(block_name, inputs, _state, _float_outputs):
        block = model.get_submodule(block_name)
        for name, (s, was_folded) in awq.apply_awq(block, block_name, inputs, spec, "group", 64, options).items():
            folded[name] = was_folded
            if not was_folded:  # what QuantLinear's explicit input scale does
                model.get_submodule(name).register_forward_pre_hook(lambda _m, a, s=s: (a[0] / s.to(a[0].dtype),))

    sequential.run_blocks(model, names, BATCHES, scale_block, hessian=True)
    assert any(folded.values()) and not all(folded.values())  # norms fold; attention/MLP outputs stay explicit
    assert _logit_error(model, reference) < 1e-4


def test_awq_runs_end_to_end_on_gpt2():
    model = tiny_gpt2()
    with torch.no_grad():
        reference = model(input_ids=BATCHES).logits
    records = quantize.quantize_model(
        model, method_cfg("activation_aware", "method.bits=8"), layers_cfg(), calibration=BATCHES
    )
    assert sum(r.quantized for r in records) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert model.transformer.h[0].attn.c_attn.input_scale is None  # folded into ln_1
    assert _logit_error(model, reference) < 0.02


def test_awq_folds_its_scales_into_the_norms_of_a_bf16_model():
    model = outlier_llama().to(torch.bfloat16)
    with torch.no_grad():
        reference = model(input_ids=BATCHES).logits.float()
    quantize.quantize_model(model, method_cfg("activation_aware", "method.bits=8"), layers_cfg(), calibration=BATCHES)
    for block in model.model.layers:
        for layer in (block.self_attn.q_proj, block.self_attn.k_proj, block.mlp.gate_proj, block.mlp.up_proj):
            assert layer.input_scale is None, "the scale should fold into the preceding RMSNorm"
    with torch.no_grad():
        error = (model(input_ids=BATCHES).logits.float() - reference).norm() / reference.norm()
    assert error < 0.05


def test_awq_does_not_fold_into_a_norm_that_scales_by_one_plus_weight():
    class OnePlusNorm(torch.nn.Module):  # Gemma's form: y = x * (1 + weight)
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(8))

        def forward(self, x):
            return x * (1 + self.weight)

    norm, s = OnePlusNorm(), torch.linspace(0.5, 2.0, 8)
    assert not awq.fold_into_norm(norm, s) and torch.equal(norm.weight, torch.zeros(8))
    rms = torch.nn.RMSNorm(8).to(torch.bfloat16)
    assert awq.fold_into_norm(rms, s) and torch.allclose(rms.weight.float(), 1 / s, rtol=1e-2)


@pytest.mark.parametrize("shape", [(48, 160), (160, 48)])
def test_lowrank_factors_are_the_truncated_svd_without_a_full_svd(shape):
    generator = torch.Generator().manual_seed(0)
    residual = torch.randn(shape, generator=generator) * torch.logspace(0, -2, shape[1])
    u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
    a, b = lowrank._factors(residual, 8, torch.float32)
    best = (u[:, :8] * s[:8]) @ vh[:8]  # the best rank-8 approximation (Eckart-Young)
    assert torch.allclose((a @ b).double(), best, rtol=0, atol=1e-5 * float(best.abs().max()))
    # balanced as before: A = U sqrt(S), B = sqrt(S) Vh, so both factors have the same column/row norms
    assert torch.allclose(a.norm(dim=0), b.norm(dim=1), rtol=1e-4)


@pytest.mark.parametrize(
    "method,steps",
    [
        ("gptq", {"block_forward", "hessian", "sweep", "pack"}),
        ("activation_aware", {"block_forward", "awq_search", "rtn", "pack"}),
        ("lowrank_w4", {"lowrank", "pack"}),
    ],
)
def test_quantization_reports_the_seconds_of_each_step(method, steps):
    timings = {}
    quantize.quantize_model(tiny_llama(), method_cfg(method), layers_cfg(), calibration=BATCHES, timings=timings)
    assert set(timings) == steps and all(seconds > 0 for seconds in timings.values())
