"""Config: HF config.json in and out, presets, real sizes via eval_shape, unsupported attributes."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from ellava_jax.config import ConfigError, LlavaConfig, get_preset
from ellava_jax.model import param_shapes


def _n_params(config) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(param_shapes(config))))


def test_hf_round_trip_through_transformers_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = get_preset("tiny")
    hf = transformers.LlavaConfig(**ours.to_hf_config())
    hf.save_pretrained(tmp_path)
    back = LlavaConfig.from_hf_config(tmp_path)
    assert back == ours
    assert LlavaConfig.from_hf_config(back.to_hf_config()) == ours


def test_7b_preset_has_the_hf_parameter_count_without_allocating():
    config = get_preset("llava-1.5-7b")
    assert _n_params(config) == 7_063_427_072
    lm = param_shapes(config)["language_model"]["layers"]  # stacked over the 32 layers
    assert lm["self_attn"]["q_proj"]["kernel"].shape == (32, 4096, 4096)
    linears = sum(
        np.prod(m[name]["kernel"].shape) for m in (lm["self_attn"], lm["mlp"]) for name in m
    )
    assert linears == 6_476_005_376  # the 224 decoder linear weights


@pytest.mark.parametrize("preset", ["llava-1.5-7b", "llava-1.5-13b"])
def test_presets_match_hf_meta_model_counts(preset):
    torch = pytest.importorskip("torch")
    import transformers

    config = get_preset(preset)
    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration(
            transformers.LlavaConfig(**config.to_hf_config())
        )
    assert _n_params(config) == sum(p.numel() for p in model.parameters())


def _hf_dict(**changes):
    d = get_preset("tiny").to_hf_config()
    for k, v in changes.items():
        if "." in k:
            sub, key = k.split(".")
            d[sub][key] = v
        else:
            d[k] = v
    return d


@pytest.mark.parametrize(
    "changes, names",
    [
        (
            {
                "text_config.rope_parameters": {
                    "rope_type": "linear",
                    "factor": 2.0,
                    "rope_theta": 1e4,
                }
            },
            "linear",
        ),
        ({"text_config.rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"projector_hidden_act": "tanh"}, "projector_hidden_act"),
        ({"vision_feature_select_strategy": "cls_patch"}, "vision_feature_select_strategy"),
        ({"vision_feature_layer": 7}, "vision_feature_layer"),
        ({"text_config.attention_bias": True}, "attention_bias"),
        ({"text_config.hidden_act": "gelu"}, "hidden_act"),
        ({"text_config.sliding_window": 4096}, "sliding_window"),
        ({"vision_config.model_type": "siglip_vision_model"}, "siglip"),
        ({"some_new_knob": 1}, "some_new_knob"),
    ],
)
def test_unsupported_attribute_is_an_error_that_names_it(changes, names):
    with pytest.raises(ConfigError, match=names):
        LlavaConfig.from_hf_config(_hf_dict(**changes))


def test_non_llava_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match=r"config\.json.*model_type='llama'"):
        LlavaConfig.from_hf_config(tmp_path)


def test_legacy_rope_theta_and_hub_style_config():
    """The llava-hf/llava-1.5-7b-hf config.json style: sparse keys, rope_theta absent."""
    d = {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": 32000,
        "model_type": "llava",
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": 32064,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.36.0.dev0",
        "vision_config": {
            "hidden_size": 1024,
            "image_size": 336,
            "intermediate_size": 4096,
            "model_type": "clip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": 14,
            "projection_dim": 768,
            "vocab_size": 32000,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": 32064,
    }
    c = LlavaConfig.from_hf_config(d)
    assert c.text.rope_theta == 10000.0 and c.text.num_key_value_heads == 32
    assert _n_params(c) == 7_063_427_072


def test_checkpoint_metadata_passes_and_quantised_weights_are_refused():
    """A text config as transformers writes it after loading a GGUF (issue 23's first contact):
    metadata passes; a quantisation that leaves the weights quantised is refused by name."""
    from ellava_jax.config import TextConfig

    d = get_preset("tiny").to_hf_config()["text_config"]
    meta = {
        "_model_name_or_path": "/models/smol",
        "unk_token_id": 0,
        "quantization_config": {"quant_method": "gguf"},
    }
    assert TextConfig.from_hf_config(d | meta) == TextConfig.from_hf_config(d)
    with pytest.raises(ConfigError, match=r"quantization_config \(quant_method='gptq'\)"):
        TextConfig.from_hf_config(d | {"quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ConfigError, match=r"unsupported attribute\(s\) \['sliding_window'\]"):
        TextConfig.from_hf_config(d | {"sliding_window": 4096})
