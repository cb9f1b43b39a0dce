"""Every weight matrix is either quantized or listed with its reason; too little coverage is refused.

Tiny random-init models built from configs: Mixture-of-Experts models whose experts are fused 3-D
parameters (transformers 5), and a vision-language model whose vision tower also has `layers.N`.
"""

import re

import pytest
import torch
from conftest import layers_cfg, method_cfg, tiny_llama

from pipeline import layers, quantize
from pipeline.algorithms import sequential
from pipeline.quant.linear import QuantLinear

TINY = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
BATCHES = torch.randint(0, 120, (4, 16), generator=torch.Generator().manual_seed(0))


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(
        MixtralConfig(**TINY, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
    ).eval()


def tiny_qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        **TINY,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return Qwen2MoeForCausalLM(config).eval()


def tiny_llava():
    """Its vision tower has more blocks (3) than its text decoder (2), and both are named `layers.N`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(**TINY, intermediate_size=64)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    return LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=127))


def _matrix_params(model):
    """(parameter name, owning module name) of every floating parameter with 2+ dimensions."""
    out = []
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and p.is_floating_point():
                out.append((f"{module_name}.{name}" if module_name else name, module_name))
    return out


def _assert_every_matrix_listed(model, records):
    names = [r.layer for r in records]
    assert len(names) == len(set(names)), "a matrix is listed twice"
    for param, module in _matrix_params(model):
        assert param in names or module in names, f"{param} is missing from the layer table"


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_qwen2_moe])
def test_fused_moe_experts_are_refused_with_their_names_and_the_way_out(build):
    model = build()
    with pytest.raises(ValueError, match="max_unquantized_share") as refused:
        quantize.quantize_model(model, method_cfg("group_wise", "method.group_size=32"), layers_cfg())
    message = str(refused.value)
    assert "model.layers.0.mlp.experts.gate_up_proj" in message and "fused MoE experts" in message
    assert not any(isinstance(m, QuantLinear) for m in model.modules()), "refused before any layer is replaced"
    # the message's own override is a knowing exclusion that lets the run go ahead
    override = re.search(r"layers\.exclude=\[.*\]$", message).group(0)
    records = quantize.quantize_model(model, method_cfg("group_wise", "method.group_size=32"), layers_cfg(override))
    reasons = {r.layer: r.reason for r in records}
    assert reasons["model.layers.1.mlp.experts.down_proj"] == (
        "matched by layers.exclude (fused MoE experts (3-D parameter): no QuantLinear for it)"
    )
    assert reasons["model.layers.0.self_attn.q_proj"] == "selected"
    _assert_every_matrix_listed(model, records)
    assert torch.isfinite(model(input_ids=BATCHES).logits).all()


def test_moe_reference_run_needs_no_exclusion():
    records = quantize.quantize_model(tiny_mixtral(), method_cfg("fp"), layers_cfg())
    assert not any(r.quantized for r in records)
    assert {r.reason for r in records if "experts" in r.layer} == {
        "fused MoE experts (3-D parameter): no QuantLinear for it"
    }


def test_coverage_figures_say_what_share_of_the_decoder_is_quantized():
    model = tiny_mixtral()
    experts = r"layers.exclude=['.*\.experts\..*', '.*\.mlp\.gate\.weight']"
    quantize.quantize_model(model, method_cfg("group_wise", "method.group_size=32"), layers_cfg(experts))
    attention = 2 * (32 * 32 + 16 * 32 + 16 * 32 + 32 * 32)
    experts_and_router = 2 * (4 * 128 * 32 + 4 * 32 * 64 + 4 * 32)
    embeddings = 2 * 128 * 32  # embed_tokens and an untied lm_head
    metrics = layers.coverage_metrics(model)
    assert metrics["quantized_weight_share"] == pytest.approx(attention / (attention + experts_and_router + embeddings))
    assert metrics["quantized_weight_share_excl_embeddings"] == pytest.approx(
        attention / (attention + experts_and_router)
    )
    assert metrics["unquantized_decoder_params"] == experts_and_router + embeddings


def test_coverage_of_a_dense_model_counts_tied_embeddings_once(llama):
    quantize.quantize_model(llama, method_cfg("group_wise"), layers_cfg())
    linear = 2 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 64 * 128)
    metrics = layers.coverage_metrics(llama)
    assert metrics["quantized_weight_share"] == pytest.approx(linear / (linear + 512 * 64))
    assert metrics["quantized_weight_share_excl_embeddings"] == 1.0
    assert metrics["unquantized_decoder_params"] == 512 * 64


def test_a_narrow_include_is_refused_unless_the_rest_is_excluded_knowingly(llama):
    with pytest.raises(ValueError, match=r"67% of the text decoder's weights .* not matched by layers.include"):
        layers.select_layers(llama, layers_cfg("layers.include=[.*self_attn.*]"))
    selected, kept = layers.select_layers(
        llama, layers_cfg("layers.include=[.*self_attn.*]", "layers.exclude=[.*mlp.*]")
    )
    assert len(selected) == 8 and kept["model.layers.1.mlp.up_proj"] == "matched by layers.exclude"
    # or a looser limit
    layers.select_layers(llama, layers_cfg("layers.include=[.*self_attn.*]", "layers.max_unquantized_share=0.7"))


def test_vision_tower_is_left_out_by_default_and_listed():
    model = tiny_llava()
    selected, kept = layers.select_layers(model, layers_cfg())
    assert len(selected) == 2 * 7 and all(n.startswith("model.language_model.layers.") for n in selected)
    assert kept["model.vision_tower.encoder.layers.0.self_attn.q_proj"] == "vision tower (outside the text decoder)"
    assert kept["model.vision_tower.embeddings.patch_embedding.weight"] == "vision tower (outside the text decoder)"
    assert kept["model.multi_modal_projector.linear_1"] == "outside the text decoder"
    assert kept["model.language_model.embed_tokens.weight"] == layers.INPUT_EMBEDDING
    records = quantize.quantize_model(model, method_cfg("group_wise", "method.group_size=32"), layers_cfg())
    _assert_every_matrix_listed(model, records)
    every = layers.select_layers(tiny_llava(), layers_cfg("layers.scope=all"))[0]
    assert "model.vision_tower.encoder.layers.2.mlp.fc1" in every and len(every) == 2 * 7 + 3 * 6


def test_unknown_scope_is_refused(llama):
    with pytest.raises(ValueError, match="layers.scope must be one of text_decoder, all"):
        layers.select_layers(llama, layers_cfg("layers.scope=vision"))


def test_block_calibration_runs_in_the_text_decoder_of_a_vlm():
    model = tiny_llava()
    assert sequential.decoder_blocks(model)[0] == "model.language_model.layers"
    records = quantize.quantize_model(
        model, method_cfg("gptq", "method.group_size=32"), layers_cfg(), calibration=BATCHES
    )
    assert sum(r.quantized for r in records) == 2 * 7


def test_every_matrix_of_a_dense_model_is_listed():
    model = tiny_llama()
    _assert_every_matrix_listed(model, quantize.quantize_model(model, method_cfg("group_wise"), layers_cfg()))
