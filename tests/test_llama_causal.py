"""Plain LLaMA causal LMs (HF `LlamaForCausalLM`) as the text-only `LlavaConfig`: parity of the
logits and of greedy decoding with transformers, the converter both ways, the config round trip,
and the refusals (unknown attributes, images handed to a text-only model, foreign tensors)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert.hf import CheckpointError, key_map, load_hf_llava, save_hf_llava
from ellava_jax.config import ConfigError, LlavaConfig, TextConfig, get_preset
from ellava_jax.model import embed_inputs, forward, generate, init_params, param_shapes

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Small random LlamaConfigs: GQA 3:1 with tied embeddings, MHA untied, and a head_dim that is
# not hidden / heads (with another RoPE theta).
CASES = {
    "gqa3-tied": dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "head-dim-12": dict(
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=12,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
}


def _hf_llama(case: str, seed: int = 0):
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,  # 0.02 leaves attention near uniform: a wrong head would hide
    )
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, **CASES[case]))
    with torch.no_grad():  # norms start at 1: perturb them so the parity test sees them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _batch(vocab: int, seed: int = 0, width: int = 9, pads=(3, 0, 5)):
    """Left-padded input_ids / attention_mask [B, width]."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (len(pads), width)).astype(np.int64)
    mask = (np.arange(width)[None] >= np.array(pads)[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, 0), mask


def _hf_logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return out.logits.numpy()


def _saved(model, tmp_path, name="hf"):
    d = tmp_path / name
    model.save_pretrained(d)
    (d / "tokenizer_config.json").write_text('{"model_max_length": 128}')  # a side file
    return d


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    model = _hf_llama(case, seed=1)
    cfg, params = load_hf_llava(_saved(model, tmp_path))
    assert cfg.is_text_only and cfg.num_image_tokens == 0 and cfg.image_token_index is None
    hc = model.config
    t = cfg.text
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (
        hc.num_attention_heads,
        hc.num_key_value_heads,
        hc.head_dim,
    )
    assert t.tie_word_embeddings == hc.tie_word_embeddings
    assert ("lm_head" in params) == (not hc.tie_word_embeddings)
    assert set(params) <= {"language_model", "lm_head"}
    ids, mask = _batch(t.vocab_size, seed=2)
    ours = np.asarray(forward(cfg, params, ids, None, mask))
    ref = _hf_logits(model, ids, mask)
    valid = mask.astype(bool)  # padding positions are garbage in both
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=1e-4)


def test_greedy_generate_matches_transformers(tmp_path):
    model = _hf_llama("gqa3-tied", seed=3)
    cfg, params = load_hf_llava(_saved(model, tmp_path))
    ids, mask = _batch(cfg.text.vocab_size, seed=4, width=6, pads=(2, 0))
    model.generation_config.eos_token_id = None  # run all six steps in both
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=6,
        ).numpy()
    cfg_no_eos = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, eos_token_id=None))
    ours = generate(cfg_no_eos, params, ids, None, mask, max_new_tokens=6)
    np.testing.assert_array_equal(ours, ref)


def test_ours_saved_loads_in_transformers_with_the_same_logits(tmp_path):
    for name in ("tiny-llama", "untied"):
        cfg = get_preset("tiny-llama")
        if name == "untied":
            cfg = LlavaConfig.text_only(dataclasses.replace(cfg.text, tie_word_embeddings=False))
        params = init_params(cfg, jax.random.key(5))
        params = jax.tree_util.tree_map(  # norms away from 1
            lambda x: x + 0.1 * jax.random.normal(jax.random.key(6), x.shape), params
        )
        src = tmp_path / f"src-{name}"
        src.mkdir()
        (src / "tokenizer.json").write_text("{}")
        out = tmp_path / f"ours-{name}"
        save_hf_llava(out, cfg, params, copy_from=src)
        assert (out / "tokenizer.json").exists()
        written = json.loads((out / "config.json").read_text())
        assert written["architectures"] == ["LlamaForCausalLM"]
        assert written["model_type"] == "llama"
        keys = set(load_file(out / "model.safetensors"))
        assert ("lm_head.weight" in keys) == (name == "untied")
        assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
        model, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        ids, mask = _batch(cfg.text.vocab_size, seed=7)
        ref = _hf_logits(model.eval(), ids, mask)
        ours = np.asarray(forward(cfg, params, ids, None, mask))
        valid = mask.astype(bool)
        np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=1e-4)
        # ... and back: the same config, every leaf bit for bit
        cfg2, params2 = load_hf_llava(out)
        assert cfg2 == cfg
        jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_config_round_trip_and_transformers_reads_ours():
    for cfg in (
        get_preset("tiny-llama"),
        LlavaConfig.text_only(TextConfig(vocab_size=64, hidden_size=32, head_dim=8)),
    ):
        d = cfg.to_hf_config()
        assert LlavaConfig.from_hf_config(json.loads(json.dumps(d))) == cfg
        hc = transformers.LlamaConfig(**d)
        t = cfg.text
        assert hc.head_dim == t.head_dim and hc.num_key_value_heads == t.num_key_value_heads
        assert hc.tie_word_embeddings == t.tie_word_embeddings
        assert hc.rope_parameters["rope_theta"] == t.rope_theta
    # transformers' own config.json reads to what it says
    hc = transformers.LlamaConfig(
        vocab_size=50, hidden_size=24, num_attention_heads=6, num_key_value_heads=2
    )
    d = {**hc.to_dict(), "architectures": ["LlamaForCausalLM"]}
    cfg = LlavaConfig.from_hf_config(d)
    assert cfg.is_text_only and cfg.text.head_dim == 4 and cfg.text.num_key_value_heads == 2
    # the LLaVA form is untouched: image token, vision tower
    tiny = get_preset("tiny")
    assert not tiny.is_text_only and tiny.num_image_tokens == 16
    assert LlavaConfig.from_hf_config(tiny.to_hf_config()) == tiny


def test_text_only_form_has_no_image_token():
    cfg = LlavaConfig(vision=None, text=get_preset("tiny").text, image_token_index=127)
    assert cfg.image_token_index is None and cfg.image_seq_length == 0
    assert cfg.feature_layers == () and cfg.num_image_tokens == 0
    with pytest.raises(ConfigError, match="image_token_index=None"):
        dataclasses.replace(get_preset("tiny"), image_token_index=None)


def test_param_tree_is_the_llava_tree_without_the_image_stages():
    cfg = get_preset("tiny-llama")
    shapes = param_shapes(cfg)
    assert set(shapes) == {"language_model"}  # tied: no lm_head
    lm = shapes["language_model"]
    assert set(lm) == {"embed_tokens", "layers", "norm"}
    attn = lm["layers"]["self_attn"]  # stacked over the 2 layers
    t = cfg.text
    assert attn["q_proj"]["kernel"].shape == (2, t.hidden_size, t.num_attention_heads * t.head_dim)
    assert attn["k_proj"]["kernel"].shape == (2, t.hidden_size, t.num_key_value_heads * t.head_dim)
    # the same language_model subtree as a LLaVA with this decoder
    llava = param_shapes(dataclasses.replace(get_preset("tiny"), text=t))
    assert jax.tree_util.tree_map(lambda s: s.shape, llava["language_model"]) == (
        jax.tree_util.tree_map(lambda s: s.shape, lm)
    )
    assert "model.layers.1.mlp.down_proj.weight" in key_map(cfg)


def test_pixel_values_to_a_text_only_model_are_refused():
    cfg = get_preset("tiny-llama")
    params = init_params(cfg, jax.random.key(0))
    ids = np.array([[3, 4, 5]])
    pix = np.zeros((1, 3, 16, 16), np.float32)
    for call in (
        lambda: forward(cfg, params, ids, pix),
        lambda: generate(cfg, params, ids, pix, max_new_tokens=2),
        lambda: embed_inputs(cfg, params, jnp.asarray(ids), pix),
    ):
        with pytest.raises(ValueError, match="text-only LLaMA"):
            call()
    assert forward(cfg, params, ids).shape == (1, 3, cfg.text.vocab_size)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    model = _hf_llama("mha-untied", seed=8)
    d = tmp_path_factory.mktemp("llama") / "hf"
    model.save_pretrained(d)
    return d


def _copy(llama_dir, tmp_path, edit_config=None, edit_tensors=None):
    d = tmp_path / "bad"
    shutil.copytree(llama_dir, d)
    if edit_config:
        c = json.loads((d / "config.json").read_text())
        edit_config(c)
        (d / "config.json").write_text(json.dumps(c))
    if edit_tensors:
        sd = load_file(d / "model.safetensors")
        edit_tensors(sd)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_unknown_llama_attribute_is_named(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path, lambda c: c.update(sliding_window=4096))
    with pytest.raises(
        ConfigError, match=r"bad/config\.json: unsupported attribute.*sliding_window"
    ):
        load_hf_llava(d)
    d2 = _copy(llama_dir, tmp_path / "2", lambda c: c.update(attention_bias=True))
    with pytest.raises(ConfigError, match=r"config\.json: attention_bias=True"):
        load_hf_llava(d2)


def test_llama_without_causal_lm_architecture_is_refused(llama_dir, tmp_path):
    for i, arch in enumerate((None, ["LlamaForSequenceClassification"])):
        d = _copy(llama_dir, tmp_path / str(i), lambda c, a=arch: c.update(architectures=a))
        with pytest.raises(
            ConfigError, match=r"config\.json: model_type='llama'.*LlamaForCausalLM"
        ):
            load_hf_llava(d)


def test_foreign_and_missing_tensors_are_named(llama_dir, tmp_path):
    key = "vision_tower.vision_model.post_layernorm.weight"
    d = _copy(llama_dir, tmp_path / "a", edit_tensors=lambda sd: sd.update({key: np.ones(4)}))
    with pytest.raises(CheckpointError, match=rf"unexpected tensor '{key}'.*LLaMA causal LM"):
        load_hf_llava(d)
    d = _copy(llama_dir, tmp_path / "b", edit_tensors=lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'lm_head\.weight'"):
        load_hf_llava(d)
    # a LLaVA-layout key in a LLaMA directory is not silently renamed
    old = "model.norm.weight"
    d = _copy(
        llama_dir,
        tmp_path / "c",
        edit_tensors=lambda sd: sd.update({"language_model.model.norm.weight": sd.pop(old)}),
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'language_model\.model\.norm"):
        load_hf_llava(d)


def test_params_of_another_form_are_refused_on_save(tmp_path):
    cfg = get_preset("tiny-llama")
    llava_params = init_params(
        dataclasses.replace(get_preset("tiny"), text=cfg.text), jax.random.key(1)
    )
    with pytest.raises(CheckpointError, match="params do not match the config.*extra"):
        save_hf_llava(tmp_path / "out", cfg, llava_params)
    assert not (tmp_path / "out").exists()


def test_sparsegpt_prunes_a_text_only_model_through_the_unchanged_pipeline(tmp_path):
    """The library's pruning walks `language_model/layers` as for a LLaVA; the pruned model
    saves as a LLaMA directory that transformers loads with the same logits."""
    from ellava_jax.prune.hessian import build_calibration_set
    from ellava_jax.prune.masks import policy_to_sparsities, sparsity_summary
    from ellava_jax.prune.pipeline import prune_model

    cfg = get_preset("tiny-llama")
    params = init_params(cfg, jax.random.key(2))
    ids = np.random.default_rng(3).integers(3, cfg.text.vocab_size, (8, 24))
    calib = build_calibration_set(cfg, params, [(ids, np.ones_like(ids), None)])
    sparsities = policy_to_sparsities(cfg, 0.5)
    pruned, _ = prune_model(cfg, params, sparsities, "sparsegpt", calib, progress=False)
    assert abs(sparsity_summary(cfg, pruned)["overall"] - 0.5) < 0.01
    save_hf_llava(tmp_path / "pruned", cfg, pruned)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    ids, mask = _batch(cfg.text.vocab_size, seed=9)
    ours = np.asarray(forward(cfg, pruned, ids, None, mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], _hf_logits(model, ids, mask)[valid], atol=1e-4)
