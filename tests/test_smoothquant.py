"""SmoothQuant: exact folds (the float model is unchanged), flatter activations, clear config errors."""

import pytest
import torch
from conftest import layers_cfg, method_cfg, tiny_llama
from torch import nn

from pipeline import calibrate, layers, quantize, steps
from pipeline.algorithms import smoothquant
from pipeline.run import check_method


def _outlier_llama():
    """The tiny Llama in float32 with a few hidden channels made outliers (as real LLMs have):
    the norms' weights on those channels are large, so every q/k/v and gate/up input carries them."""
    model = tiny_llama().float()
    with torch.no_grad():
        for block in model.model.layers:
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight[[3, 17, 40]] = torch.tensor([25.0, -18.0, 30.0])
            block.mlp.up_proj.weight[:8] *= 20  # outliers on down_proj's input channels too
            block.self_attn.v_proj.weight[:4] *= 20  # and on o_proj's
    return model


def _batches(n=4, seq=32, vocab=512, seed=1):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _selected(model):
    return list(layers.select_layers(model, layers_cfg())[0])


def _flatness(model, names, batches):
    """Per smoothed layer: max / mean of its input's per-channel abs-max."""
    stats, _ = smoothquant.collect_input_stats(model, batches, seed=0)
    return {n: float(stats[n].absmax.max() / stats[n].absmax.mean()) for n in names}


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_smoothing_keeps_logits_and_flattens_activations(alpha):
    model = _outlier_llama()
    names, batches = _selected(model), _batches()
    with torch.no_grad():
        before = model(input_ids=batches).logits
    ratio_before = _flatness(model, names, batches)
    result = smoothquant.smooth_model(model, names, batches, alpha)
    with torch.no_grad():
        after = model(input_ids=batches).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    ratio_after = _flatness(model, names, batches)
    assert {r.layer for r in result.records} == set(names)
    assert not result.input_scales  # every producer of a Llama block takes the fold
    for name in names:
        assert ratio_after[name] < ratio_before[name], (name, ratio_before[name], ratio_after[name])
    folded = {r.layer: r.folded_into for r in result.records}
    assert folded["model.layers.0.self_attn.q_proj"] == "model.layers.0.input_layernorm"
    assert folded["model.layers.0.mlp.gate_proj"] == "model.layers.0.post_attention_layernorm"
    assert folded["model.layers.0.mlp.down_proj"] == "model.layers.0.mlp.up_proj"
    assert folded["model.layers.1.self_attn.o_proj"] == "model.layers.1.self_attn.v_proj"


def test_gqa_v_to_o_fold_is_exact_and_shared_per_kv_head():
    # 4 query heads over 2 kv heads: o_proj's channels of query heads 0 and 1 read kv head 0.
    model = _outlier_llama()
    attention = model.model.layers[0].self_attn
    assert attention.num_key_value_groups == 2
    name = "model.layers.0.self_attn.o_proj"
    batches = _batches()
    outputs = {}
    hook = attention.register_forward_hook(lambda _m, _a, out: outputs.__setitem__("attn", out[0].detach().clone()))
    with torch.no_grad():
        model(input_ids=batches)
        before = outputs["attn"]
        o_before, v_before = attention.o_proj.weight.clone(), attention.v_proj.weight.clone()
        smoothquant.smooth_model(model, [name], batches, 0.5)
        model(input_ids=batches)
    hook.remove()
    torch.testing.assert_close(outputs["attn"], before, rtol=1e-4, atol=1e-5)
    s_o = (attention.o_proj.weight / o_before)[0].view(4, -1)  # the column scales, per query head
    s_v = (v_before / attention.v_proj.weight)[:, 0].view(2, -1)  # the row divisors, per kv head
    torch.testing.assert_close(s_o[0], s_o[1])  # query heads sharing a kv head share the scale
    torch.testing.assert_close(s_o[2], s_o[3])
    torch.testing.assert_close(s_o[0], s_v[0])
    torch.testing.assert_close(s_o[2], s_v[1])
    assert not torch.allclose(s_o[0], torch.ones_like(s_o[0]))  # it did rescale


def test_smoothing_scales_formula():
    act, weight = torch.tensor([4.0, 1.0, 9.0]), torch.tensor([1.0, 4.0, 1.0])
    torch.testing.assert_close(smoothquant.smoothing_scales(act, weight, 0.5), torch.tensor([2.0, 0.5, 3.0]))
    torch.testing.assert_close(smoothquant.smoothing_scales(act, weight, 1.0), act)
    torch.testing.assert_close(smoothquant.smoothing_scales(act, weight, 0.0), 1 / weight)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "0.5", True, None, [0.5]])
def test_bad_alpha_is_refused_before_work(alpha):
    with pytest.raises(ValueError, match="method.smooth.alpha must be a number in \\[0, 1\\] or 'search'"):
        check_method({**method_cfg("smoothquant_static"), "smooth": {"alpha": alpha}})


def test_smooth_needs_activation_quantization_and_a_rtn_style_algorithm():
    with pytest.raises(ValueError, match="needs method.activations"):
        check_method({**method_cfg("weight_only"), "steps": ["smooth", "rtn"], "smooth": {"alpha": 0.5}})
    with pytest.raises(ValueError, match="not combined with gptq"):
        gptq = {**method_cfg("gptq"), "steps": ["smooth", "gptq"], "activations": {"mode": "dynamic"}}
        smoothquant.check_in_method({**gptq, "smooth": {"alpha": 0.5}})
    with pytest.raises(ValueError, match="takes only 'alpha'"):
        check_method({**method_cfg("smoothquant_static"), "smooth": {"alpha": 0.5, "beta": 1}})


def test_unknown_producer_is_refused():
    class Block(nn.Module):  # a linear layer reading a GELU's output: nothing to fold 1/s into
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.layers = nn.Embedding(32, 8), nn.ModuleList([Block(), Block()])

        def forward(self, input_ids, use_cache=False):
            x = self.embed(input_ids)
            for block in self.layers:
                x = block(x)
            return x

    with pytest.raises(ValueError, match="cannot tell what produces the input of layers.0.fc2"):
        smoothquant.smooth_model(Toy(), ["layers.0.fc2"], torch.randint(0, 32, (2, 5)), 0.5)


class OnePlusNorm(nn.Module):
    """Gemma-style RMSNorm, x_hat * (1 + w): dividing w by s does not divide the output by s."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def test_unfoldable_norm_keeps_an_explicit_multiplier_and_the_same_function():
    model = _outlier_llama()
    block = model.model.layers[0]
    block.input_layernorm = OnePlusNorm(64)
    with torch.no_grad():
        block.input_layernorm.weight[[3, 17]] = 20.0
    names, batches = _selected(model), _batches()
    with torch.no_grad():
        before = model(input_ids=batches).logits
    result = smoothquant.smooth_model(model, names, batches, 0.5)
    with torch.no_grad():
        after = model(input_ids=batches).logits
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-3)
    explicit = {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    assert set(result.input_scales) == explicit
    assert all(r.folded_into == "input_scale" for r in result.records if r.layer in explicit)
    # quantized with the multiplier: the layer's effective weight is the float function's
    prepared = steps.ModelResult(input_scales=dict(result.input_scales))
    quantize.quantize_model(model, method_cfg("ptq_dynamic"), layers_cfg(), prepared=prepared)
    q = model.model.layers[0].self_attn.q_proj
    assert q.input_scale is not None and q.input_scale.dtype == torch.float16


def test_static_w8a8_error_drops_with_smoothing():
    """The point of it: on outlier activations, smoothed W8A8 static logits are closer to float."""
    errors = {}
    for smooth in (False, True):
        model = _outlier_llama()
        names, batches = _selected(model), _batches()
        with torch.no_grad():
            reference = model(input_ids=batches).logits
        method = method_cfg("smoothquant_static" if smooth else "ptq_static")
        prepared = steps.ModelResult()
        if smooth:
            result = smoothquant.smooth_for_method(model, method, names, batches, seed=0)
            prepared = steps.ModelResult(input_scales=dict(result.input_scales))
        stats = calibrate.collect_activation_stats(model, names, batches, seed=0)
        store = layers_cfg("layers.keep_dtype=float32")
        quantize.quantize_model(model, method, store, stats, kernels="dequant", prepared=prepared)
        with torch.no_grad():
            errors[smooth] = float((model(input_ids=batches).logits - reference).pow(2).mean())
    assert errors[True] < errors[False] / 2, errors


def test_alpha_search_picks_from_the_grid_and_logs_every_candidate():
    model = _outlier_llama()
    method = {**method_cfg("smoothquant_static"), "smooth": {"alpha": "search"}}
    result = smoothquant.smooth_for_method(model, method, _selected(model), _batches(), seed=0)
    assert set(result.search_errors) == set(smoothquant.ALPHA_GRID)
    assert result.alpha == min(result.search_errors, key=result.search_errors.get)


def test_describe_algorithm_names_the_smoothing():
    assert steps.describe_steps(method_cfg("smoothquant_static")) == "smooth(alpha=0.5)+rtn"
    assert steps.describe_steps(method_cfg("smoothquant_dynamic", "method.smooth.alpha=search")) == (
        "smooth(alpha=search)+rtn"
    )
    assert steps.needs_calibration(method_cfg("smoothquant_dynamic"))
