"""Whole-model memory as shipped: kept layers in layers.keep_dtype, embeddings quantized by layers.embeddings
(a tied table once), and memory_metrics counting what is stored, each tensor once, in its real dtype."""

import pytest
import torch
from conftest import layers_cfg, method_cfg, tiny_llama

from pipeline import kept, layers, profile, quantize
from pipeline.quant.embedding import QuantEmbedding
from pipeline.quant.linear import QuantLinear

IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
INT8_ROWS = "layers.embeddings={bits:8,symmetric:true,granularity:per_channel}"
INT4_GROUPS = "layers.embeddings={bits:4,symmetric:false,granularity:group,group_size:32}"
NORM_BYTES_BF16 = (2 * 2 + 1) * 64 * 2  # two norms per block and the final one, 64 weights each


def untied_llama():
    model = tiny_llama()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 0.01)
    return model


def _quantize(model, *overrides, method="group_wise", method_overrides=()):
    footprint = profile.parameter_footprint(model)
    records = quantize.quantize_model(model, method_cfg(method, *method_overrides), layers_cfg(*overrides))
    return records, profile.memory_metrics(model, *footprint)


def test_kept_parameters_are_stored_in_keep_dtype_and_counted_there():
    model = tiny_llama()
    records, m = _quantize(model)
    float_params = [p for p in model.parameters() if p.is_floating_point()]
    assert {p.dtype for p in float_params} == {torch.bfloat16}  # embedding (tied lm_head) and norms
    assert m["kept_bytes"] == NORM_BYTES_BF16 and m["embedding_bytes"] == 512 * 64 * 2
    assert m["embedding_bits_per_weight"] == 16
    assert m["weight_bytes"] == m["embedding_bytes"] + m["quantized_bytes"] + m["kept_bytes"]
    rows = {r.layer: r for r in records if not r.quantized}
    assert rows["model.embed_tokens.weight"].dtype == "bfloat16"
    assert rows["model.embed_tokens.weight"].weight_bytes == 512 * 64 * 2
    assert rows["lm_head"].weight_bytes == 0 and "tied to model.embed_tokens.weight" in rows["lm_head"].reason
    assert kept.describe_kept(model) == "embed_tokens+lm_head (tied) bfloat16; 5 norms bfloat16"

    wide = tiny_llama()
    _, m32 = _quantize(wide, "layers.keep_dtype=float32")
    assert {p.dtype for p in wide.parameters()} == {torch.float32}
    assert m32["kept_bytes"] == 2 * m["kept_bytes"] and m32["embedding_bytes"] == 2 * m["embedding_bytes"]
    assert m32["mem_reduction_vs_fp16_pct"] < m["mem_reduction_vs_fp16_pct"]


def test_kept_bfloat16_layers_keep_float32_activations_and_stay_close():
    wide, narrow = tiny_llama(), tiny_llama()
    _quantize(wide, "layers.keep_dtype=float32")
    _quantize(narrow)
    hidden = narrow.model.embed_tokens(IDS)
    assert hidden.dtype == torch.float32  # rows looked up in bf16, returned in the activation dtype
    assert narrow.model.norm(hidden).dtype == torch.float32  # HF's RMSNorm: bf16 weight x fp32 state -> fp32
    out = narrow(input_ids=IDS, output_hidden_states=True)
    assert out.logits.dtype == torch.float32 and {h.dtype for h in out.hidden_states} == {torch.float32}
    ref = wide(input_ids=IDS).logits
    kl = torch.nn.functional.kl_div(out.logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum")
    assert 0 < kl / IDS.numel() < 1e-3  # bf16 storage changes the logits, slightly


def test_method_fp_keeps_the_model_as_loaded():
    model = tiny_llama()
    records, m = _quantize(model, INT8_ROWS, method="fp")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(isinstance(x, (QuantLinear, QuantEmbedding)) for x in model.modules())
    assert m["bits_per_weight"] == 32 and m["compression_ratio"] == 1 and not any(r.quantized for r in records)


def test_tied_embedding_is_quantized_once_and_shared():
    model = tiny_llama()
    records, m = _quantize(model, INT8_ROWS)
    embed, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embed, QuantEmbedding) and isinstance(head, QuantLinear)
    for name in ("packed", "scale"):
        assert getattr(embed, name).data_ptr() == getattr(head, name).data_ptr()
    stored = 512 * 64 + 512 * 2  # int8 codes + one fp16 scale per row, once
    assert head.weight_bytes == stored and m["embedding_bytes"] == stored
    assert m["embedding_bits_per_weight"] == pytest.approx(8 + 16 / 64)
    assert m["weight_bytes"] == stored + m["quantized_bytes"] + NORM_BYTES_BF16
    # a lookup returns the dequantized rows of the table the lm_head computes with
    assert torch.equal(embed(IDS), head.dequantized_weight()[IDS])
    rows = {r.layer: r for r in records}
    assert rows["lm_head"].weight_bytes == stored and rows["model.embed_tokens.weight"].weight_bytes == 0
    assert rows["lm_head"].grid == "int8 sym [-128,127]" and rows["lm_head"].rel_error < 0.01
    assert sum(r.weight_bytes for r in records) == m["weight_bytes"] - NORM_BYTES_BF16  # norms have no row
    assert (
        kept.describe_kept(model) == "embed_tokens+lm_head (tied) int8 sym [-128,127] block (1, 64); 5 norms bfloat16"
    )
    assert torch.isfinite(model(input_ids=IDS).logits).all()


def test_untied_embeddings_are_quantized_each_on_its_own():
    model = untied_llama()
    embed_weight, head_weight = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    records, m = _quantize(model, INT4_GROUPS)
    embed, head = model.model.embed_tokens, model.lm_head
    assert embed.packed.data_ptr() != head.packed.data_ptr()
    one_table = 512 * 64 // 2 + 512 * 2 * 2 + 512 * 2 // 2  # int4 codes, fp16 scales, int4 zeros (2 groups/row)
    assert head.weight_bytes == embed.weight_bytes == one_table and m["embedding_bytes"] == 2 * one_table
    assert head.kernel in ("lowbit_cpu", "aten_int4_groupwise")  # ours where it is built
    # each table is its own weight's round trip, rows gathered from the packed codes
    assert torch.equal(embed(IDS), embed.dequantized_weight()[IDS])
    assert (embed.dequantized_weight() - embed_weight).abs().max() < 0.05
    assert (head.dequantized_weight() - head_weight).abs().max() < 0.05
    assert not torch.equal(embed.dequantized_weight(), head.dequantized_weight())
    assert {r.layer for r in records if r.quantized and r.bits == 4 and r.granularity == "group"} >= {
        "lm_head",
        "model.embed_tokens.weight",
    }
    assert kept.describe_kept(model).startswith("embed_tokens int4 asym [0,15] int-zero block (1, 32); lm_head int4")


def test_lm_head_at_8_bits_per_row_runs_a_real_kernel():
    model = tiny_llama()
    records, m = _quantize(model, INT8_ROWS)
    (row,) = [r for r in records if r.layer == "lm_head"]
    assert row.kernel == model.lm_head.kernel and row.kernel in ("lowbit_cpu", "aten_int8_weight_only")
    assert m["kernel_cache_bytes"] >= model.lm_head.kernel_cache_bytes > 0
    x = torch.randn(3, 64)
    expected = x @ model.lm_head.dequantized_weight().T
    assert torch.allclose(model.lm_head(x), expected, atol=0.05, rtol=0.02)  # bf16 activations


def test_coverage_counts_a_quantized_tied_table_once():
    body = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128)
    model = tiny_llama()
    _quantize(model)
    c = layers.coverage_metrics(model)
    assert c["quantized_weight_share"] == pytest.approx(body / (body + 512 * 64))
    assert c["quantized_weight_share_excl_embeddings"] == 1.0 and c["unquantized_decoder_params"] == 512 * 64
    model = tiny_llama()
    _quantize(model, INT8_ROWS)
    c = layers.coverage_metrics(model)
    assert c["quantized_weight_share"] == 1.0 and c["unquantized_decoder_params"] == 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("layers.keep_dtype=int8", "layers.keep_dtype must be one of bfloat16, float16, float32, got 'int8'"),
        ("layers.embeddings={bits:9,symmetric:true,granularity:per_channel}", "layers.embeddings: bits must be"),
        ("layers.embeddings={bits:8,symmetric:true,granularity:per_tensor}", "must be one of per_channel, group"),
        ("layers.embeddings={bits:8,symmetric:true,granularity:group}", "group_size goes with granularity=group"),
        ("layers.embeddings={bits:8,symmetric:true,granularity:per_channel,group:4}", r"unknown: \['group'\]"),
        ("layers.embeddings={bits:8,granularity:per_channel}", r"missing: \['symmetric'\]"),
        ("layers.embeddings=8", "must be null or a mapping"),
        ("layers.embeddings={bits:4,symmetric:true,granularity:group,group_size:48}", "does not divide the embedding"),
    ],
)
def test_bad_storage_config_is_refused_before_any_work(override, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        quantize.quantize_model(model, method_cfg("group_wise"), layers_cfg(override))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_storage_config_is_checked_without_a_model():
    quantize.check_storage(layers_cfg(INT8_ROWS))
    with pytest.raises(ValueError, match="layers.keep_dtype must be one of"):
        quantize.check_storage(layers_cfg("layers.keep_dtype=fp8"))
    with pytest.raises(ValueError, match="layers.quantize_lm_head is gone: .* layers.embeddings"):
        quantize.check_storage(layers_cfg("+layers.quantize_lm_head=true"))


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=32,
    )
    return Gemma3ForCausalLM(config).eval()


def test_scaled_embeddings_keep_their_scale_when_quantized_or_kept():
    """Gemma multiplies looked-up rows by sqrt(hidden); a QuantEmbedding must too, and kept storage keeps fp32 out."""
    model = tiny_gemma3()
    scale = float(model.model.embed_tokens.embed_scale)
    reference = model(input_ids=IDS).logits
    kept_model = tiny_gemma3()
    _quantize(kept_model)
    assert kept_model.model.embed_tokens(IDS).dtype == torch.float32
    assert kept_model.model.embed_tokens.weight.dtype == torch.bfloat16
    _quantize(model, INT8_ROWS)
    embed = model.model.embed_tokens
    assert isinstance(embed, QuantEmbedding) and embed.embed_scale == pytest.approx(scale) and scale != 1
    assert torch.allclose(embed(IDS), embed.dequantized_weight()[IDS] * scale)
    logits = model(input_ids=IDS).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
    assert agree > 0.5  # 4-bit layers and an 8-bit table still track the float model


def test_a_kept_vision_tower_is_stored_16_bit_and_still_runs():
    from test_layer_coverage import tiny_llava

    model = tiny_llava().eval()
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, 16), 127), torch.tensor([[5, 6, 7]])], 1)  # 16 patches
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = model(input_ids=ids, pixel_values=pixels).logits
    _quantize(model, method_overrides=["method.group_size=32"])
    tower = model.model.vision_tower
    assert {p.dtype for p in tower.parameters()} == {torch.bfloat16}
    logits = model(input_ids=ids, pixel_values=pixels).logits
    assert logits.dtype == torch.float32 and (logits - reference).abs().max() < 0.2


def test_a_kept_lm_head_reads_its_16_bit_weight_at_any_number_of_rows():
    model = tiny_llama()
    _quantize(model)
    head = model.lm_head
    stored = head.weight.detach().float()  # the bf16 values, exactly
    for rows in (1, 16, 17, 300):  # decode multiplies in bf16; more rows upcast the weight (pipeline.kept)
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
        y = head(x)
        assert y.dtype == torch.float32 and y.shape == (rows, 512)
        tolerance = 0.05 if rows <= 16 else 1e-5
        assert torch.allclose(y, x @ stored.T, atol=tolerance, rtol=0.02)
