"""The start-up probe (sagellm.model.probe): what a model hands the attention is recorded per layer,
and anything the paged attention does not implement stops loading with one line naming the model
type and the feature. Tiny random-weight models from transformers configurations."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from families import build, config_for
from sagellm.model import attention
from sagellm.errors import ModelLoadError
from sagellm.model import probe


def tiny(config) -> torch.nn.Module:
    attention.register()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                            attn_implementation=attention.ATTN_IMPLEMENTATION).eval()


def refusal(model) -> str:
    with pytest.raises(ModelLoadError) as info:
        probe.check(model, None, "cpu")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"model type {model.config.model_type}: ")
    return message


def test_records_each_layers_window_softcap_and_sinks():
    layers = probe.check(tiny(config_for("gemma2")), None, "cpu")
    assert [a["sliding_window"] for a in layers] == [32, None, 32, None]  # alternating layers
    assert {a["softcap"] for a in layers} == {5.0} and {a["scaling"] for a in layers} == {48 ** -0.5}
    sinks = probe.check(tiny(config_for("gpt_oss")), None, "cpu")
    assert all(a["s_aux"].shape == (4,) for a in sinks)


def test_an_argument_the_attention_does_not_know_is_refused():
    """As a future transformers release adding an attention argument would: refused, not ignored."""
    model = tiny(config_for("llama"))
    for layer in model.model.layers:
        forward = layer.self_attn.forward
        layer.self_attn.forward = lambda *a, _f=forward, **kw: _f(*a, **kw, attention_temperature=0.7)
    assert "argument(s) ['attention_temperature']" in refusal(model)


def test_the_same_argument_at_serve_time_fails_the_step_not_silently():
    meta = attention.StepMetadata(None, None, 0, None, None, [])
    with pytest.raises(attention.UnsupportedAttention, match="attention_temperature"):
        attention.paged_attention(None, None, None, None, None, sagellm_meta=meta, attention_temperature=0.7)


def test_a_layer_whose_attention_skips_the_interface_is_refused():
    model = tiny(config_for("llama"))
    model.model.layers[2].self_attn.forward = lambda hidden_states, **kw: (torch.zeros_like(hidden_states), None)
    assert "layer(s) [2] does not go through" in refusal(model)


def test_chunked_and_bidirectional_attention_are_refused():
    llama4 = transformers.Llama4TextConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, intermediate_size_mlp=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, attention_chunk_size=64, num_local_experts=2,
        max_position_embeddings=4096)
    assert "query 64 sees keys 64..64, not 0..64" in refusal(tiny(llama4))
    assert "not causal" in refusal(tiny(config_for("gemma3_text", use_bidirectional_attention=True)))


def test_kv_shapes_the_cache_was_not_sized_for_are_refused():
    config = transformers.GPTNeoXConfig(vocab_size=1000, hidden_size=256, num_attention_heads=4,
                                        num_hidden_layers=2, intermediate_size=256)
    config.num_key_value_heads = 2  # a stray attribute the engine would size its cache by
    assert "has 4 KV heads of 64 dims, not the 2 of 64" in refusal(tiny(config))


def test_the_fast_decoder_takes_the_sliding_window(tmp_path):
    from sagellm.model.bundled import bundled_model_dir
    from sagellm.model.loader import load_weights
    from sagellm.settings import Settings

    folder = build("mistral", tmp_path, bundled_model_dir())
    model = load_weights(str(folder), Settings(dtype="float32"), "cpu")
    assert [layer.attention_arguments["sliding_window"] for layer in model.fast.layers] == [32] * 4


def test_sinks_not_split_with_the_heads_are_refused():
    """gpt-oss under tensor parallelism: transformers' plan splits the heads but not the sinks."""
    call = dict(layer=0, causal=True, heads=2, kv_heads=1, head_dim=64, mask=None, arguments=dict(
        scaling=0.125, dropout=0.0, sliding_window=None, softcap=None, s_aux=torch.zeros(6)))
    assert "not one per query head (2)" in probe._problem(call, 1, 64)
    assert "SM_NUM_GPUS=1" in probe._problem(call, 1, 64)
