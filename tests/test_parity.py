"""Parity with HF transformers (PyTorch, CPU): logits and greedy generation on tiny configs."""

from __future__ import annotations

import numpy as np
import pytest

from convert.hf import load_hf_llava
from ellava_jax.model import forward, generate
from tests.conftest import hf_model, prompt_batch, tiny_config

torch = pytest.importorskip("torch")

CASES = {
    "gqa-default-l-2": {},
    "mha": {"text_num_key_value_heads": 4},
    "layer-1": {"vision_feature_layer": -1},
    "layer+1-full": {"vision_feature_layer": 1, "vision_feature_select_strategy": "full"},
    "full": {"vision_feature_select_strategy": "full"},
    "tied": {"text_tie_word_embeddings": True},
    "multi-layer": {"vision_feature_layer": (-3, -1)},
    "theta": {"text_rope_theta": 500000.0},
}


def _ours_from_hf(model, tmp_path):
    model.save_pretrained(tmp_path / "hf")
    return load_hf_llava(tmp_path / "hf")


def _hf_logits(model, ids, mask, pix):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            pixel_values=None if pix is None else torch.tensor(pix),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case, tmp_path):
    config = tiny_config(**CASES[case])
    model = hf_model(config, seed=1)
    cfg, params = _ours_from_hf(model, tmp_path)
    assert cfg == config
    ids, mask, pix = prompt_batch(config, images_per_row=(1, 1), pad=(3, 0))
    ours = np.asarray(forward(cfg, params, ids, pix, mask))
    ref = _hf_logits(model, ids, mask, pix)
    valid = mask.astype(bool)  # padding positions are garbage in both
    assert ours.shape == ref.shape
    np.testing.assert_array_less(np.abs(ours - ref)[valid].max(), 1e-4)


def test_several_images_per_row_and_text_only(tmp_path):
    config = tiny_config()
    model = hf_model(config, seed=2)
    cfg, params = _ours_from_hf(model, tmp_path)
    ids, mask, pix = prompt_batch(config, images_per_row=(2, 1), pad=(0, 4), seed=3)
    ours = np.asarray(forward(cfg, params, ids, pix, mask))
    ref = _hf_logits(model, ids, mask, pix)
    assert np.abs(ours - ref)[mask.astype(bool)].max() < 1e-4
    # Text only: no pixel_values, no placeholders.
    ids_t = np.array([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]])
    mask_t = (np.arange(5)[None] >= np.array([[0], [2]])).astype(np.int64)
    ours = np.asarray(forward(cfg, params, ids_t, None, mask_t))
    ref = _hf_logits(model, ids_t, mask_t, None)
    assert np.abs(ours - ref)[mask_t.astype(bool)].max() < 1e-4


@pytest.mark.parametrize("case", ["gqa-default-l-2", "mha", "tied"])
def test_greedy_generate_matches_hf(case, tmp_path):
    config = tiny_config(**CASES[case])
    model = hf_model(config, seed=4)
    cfg, params = _ours_from_hf(model, tmp_path)
    ids, mask, pix = prompt_batch(config, images_per_row=(1, 1), pad=(2, 0), seed=5)
    ours = generate(cfg, params, ids, pix, mask, max_new_tokens=8)
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            pixel_values=torch.tensor(pix),
            do_sample=False,
            max_new_tokens=8,
        ).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_generate_eos_padding_and_early_stop_match_hf(tmp_path):
    """Pick as eos a token the model emits mid-sequence: rows pad after it, and HF stops once
    every row has finished; ours must give the same array."""
    import dataclasses

    config = tiny_config()
    model = hf_model(config, seed=6)
    cfg, params = _ours_from_hf(model, tmp_path)
    ids, mask, pix = prompt_batch(config, seed=7)
    free = generate(cfg, params, ids, pix, mask, max_new_tokens=8)[:, ids.shape[1] :]
    for rows in ([0, 1], [0]):  # a batch where one row finishes early; a single row that stops
        eos = int(free[0, 3])
        cfg_eos = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, eos_token_id=eos))
        ours = generate(cfg_eos, params, ids[rows], pix[rows], mask[rows], max_new_tokens=8)
        model.generation_config.eos_token_id = eos
        with torch.no_grad():
            ref = model.generate(
                input_ids=torch.tensor(ids[rows]),
                attention_mask=torch.tensor(mask[rows]),
                pixel_values=torch.tensor(pix[rows]),
                do_sample=False,
                max_new_tokens=8,
            ).numpy()
        np.testing.assert_array_equal(ours, ref)
    assert ours.shape[1] < ids.shape[1] + 8  # the single row stopped early


def test_placeholder_mismatch_is_a_clear_error(tiny):
    import jax

    from ellava_jax.model import init_params

    params = init_params(tiny, jax.random.key(0))
    ids, mask, pix = prompt_batch(tiny, images_per_row=(1, 1))
    with pytest.raises(ValueError, match="placeholder tokens .* do not match"):
        forward(tiny, params, ids, pix[:1], mask)


def test_bfloat16_params_run_close_to_float32(tmp_path):
    import jax.numpy as jnp

    config = tiny_config()
    model = hf_model(config, seed=8)
    model.save_pretrained(tmp_path / "hf")
    cfg, p32 = load_hf_llava(tmp_path / "hf")
    _, p16 = load_hf_llava(tmp_path / "hf", dtype=jnp.bfloat16)
    ids, mask, pix = prompt_batch(config)
    l32 = np.asarray(forward(cfg, p32, ids, pix, mask))
    l16 = np.asarray(forward(cfg, p16, ids, pix, mask)).astype(np.float32)
    assert np.isfinite(l16).all()
    valid = mask.astype(bool)
    assert np.abs(l32 - l16)[valid].max() < 0.1 * np.abs(l32[valid]).max() + 0.05
